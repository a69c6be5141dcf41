"""TeacherCache: teacher outputs computed once, looked up per batch by the distillation core."""

import pytest
import torch
from tiny import (
    TokenDataset,
    assert_same_training,
    collate_tokens,
    fused_and_plain_runs,
    tiny_bert,
    tiny_llama,
    training_args,
)
from transformers import Trainer

from kd_plugins import (
    DistillationCallback,
    DistillationConfig,
    DistillationEngine,
    TeacherCache,
    build_teacher_cache,
    load_teacher_cache,
    save_teacher_cache,
)
from kd_plugins._checkpoint import CheckpointError

EMB_CFG = dict(task="encoder", loss_terms={"embedding_mse": 1.0, "affinity_kl": 1.0})


def _encoders():
    return tiny_bert("BertModel", seed=1, layers=3, hidden=32), tiny_bert("BertModel", seed=2, layers=2, hidden=32)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def test_save_load_round_trip_is_bit_identical(tmp_path):
    teacher, _ = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    for kind, t in (("embedding", teacher), ("topk", tiny_llama(seed=1))):
        cache = build_teacher_cache(t, ds, kind=kind, top_k=5, temperature=2.0, progress=False)
        path = save_teacher_cache(cache, tmp_path / kind)
        back = load_teacher_cache(path, teacher=t, dataset=ds, kind=kind)
        assert back.metadata == cache.metadata and set(back.tensors) == set(cache.tensors)
        for name, v in cache.tensors.items():
            assert back.tensors[name].dtype == v.dtype and torch.equal(back.tensors[name], v), name
        assert len(back) == 16 and TeacherCache.load(path).kind == kind


def test_mismatched_cache_is_refused(tmp_path):
    teacher, student = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    path = build_teacher_cache(teacher, ds, progress=False).save(tmp_path / "c")
    with pytest.raises(ValueError, match="another teacher"):
        load_teacher_cache(path, teacher=student)
    with pytest.raises(ValueError, match="another dataset"):
        load_teacher_cache(path, dataset=TokenDataset(labels=None, seed=5))
    with pytest.raises(ValueError, match="not 'topk'"):
        load_teacher_cache(path, kind="topk")
    with pytest.raises(CheckpointError, match="teacher cache"):
        load_teacher_cache(tmp_path / "missing")
    # the engine refuses terms the cache does not hold, another pooling, another temperature or vocabulary
    cache = load_teacher_cache(path)
    bad = [
        (DistillationConfig(**EMB_CFG, feature_pairs={"encoder.layer.1": "encoder.layer.2"}), "not cached"),
        (DistillationConfig(**EMB_CFG, pooling="cls"), "pooling"),
    ]
    lm_cache = build_teacher_cache(tiny_llama(seed=1), TokenDataset(), kind="topk", temperature=2.0, progress=False)
    bad_lm = [
        (DistillationConfig(loss_terms="kl", temperature=1.0), "temperature"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            DistillationEngine(cache, cfg).setup(student)
    for cfg, msg in bad_lm:
        with pytest.raises(ValueError, match=msg):
            DistillationEngine(lm_cache, cfg).setup(tiny_llama(seed=2))
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationEngine(lm_cache, DistillationConfig(loss_terms="kl", temperature=2.0)).setup(tiny_llama(vocab=80))


def test_missing_example_names_the_count():
    teacher, _ = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    cache = build_teacher_cache(teacher, ds, progress=False)
    batch = collate_tokens(ds, [0, 1, 2])
    batch["input_ids"][1, 0] += 1  # an example the cache never saw
    with pytest.raises(KeyError, match="1 of the 3 examples .* Rebuild it with build_teacher_cache"):
        cache.lookup(batch)


def test_shuffled_and_left_padded_batches_find_their_entries():
    teacher, _ = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    emb = build_teacher_cache(teacher, ds, progress=False)
    topk = build_teacher_cache(tiny_llama(seed=1), ds, kind="topk", top_k=4, progress=False)
    order = [5, 2, 9, 0, 13, 7]
    right, left = collate_tokens(ds, order), collate_tokens(ds, order, left=True)
    one_by_one = torch.cat([emb.lookup(collate_tokens(ds, [i]))["pooled_embedding"] for i in order])
    assert torch.equal(emb.lookup(right)["pooled_embedding"], one_by_one)
    assert torch.equal(emb.lookup(left)["pooled_embedding"], one_by_one)
    # the top-k rows sit on the unpadded positions whatever the padding side
    (ri, rl), (li, ll) = topk.lookup(right)["teacher_topk"], topk.lookup(left)["teacher_topk"]
    rm, lm = right["attention_mask"].bool(), left["attention_mask"].bool()
    assert torch.equal(ri[rm], li[lm]) and torch.equal(rl[rm], ll[lm])
    # and they are the teacher's own top-k of the unpadded example
    with torch.no_grad():
        logits = tiny_llama(seed=1)(input_ids=ds[order[1]]["input_ids"][None]).logits[0]
    n = int(ds[order[1]]["attention_mask"].sum())
    expect = torch.log_softmax(logits[:n], -1).topk(4)
    assert torch.equal(ri[1, :n], expect.indices) and torch.allclose(rl[1, :n], expect.values, atol=1e-6)


def _one_step(tmp_out, teacher_or_cache, ds):
    _, student = _encoders()
    cb = DistillationCallback(teacher_or_cache, DistillationConfig(**EMB_CFG))
    args = training_args(tmp_out, max_steps=1, remove_unused_columns=False)
    trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "kd_loss" in h)
    return logs, {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_embedding_cache_trainer_step_equals_live_teacher(tmp_out):
    teacher, _ = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    cache = build_teacher_cache(teacher, ds, batch_size=5, progress=False)
    live_logs, live_w = _one_step(tmp_out + "live", teacher, ds)
    cache_logs, cache_w = _one_step(tmp_out + "cache", cache, ds)
    for key in ("kd_loss", "kd_embedding_mse", "kd_affinity_kl", "teacher_cosine"):
        assert cache_logs[key] == pytest.approx(live_logs[key], rel=1e-5, abs=1e-7), key
    for name, w in live_w.items():
        torch.testing.assert_close(cache_w[name], w, rtol=1e-5, atol=1e-6, msg=name)


def _lm_loss(teacher_or_cache, student, batch, top_k_cfg):
    engine = DistillationEngine(teacher_or_cache, DistillationConfig(**top_k_cfg))
    engine.setup(student)
    with torch.no_grad():
        out = student(**_inputs(batch))
    return engine.compute(batch, out)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd"])
def test_topk_cache_with_full_vocab_equals_dense_loss(loss):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cfg = dict(loss_terms=loss, temperature=2.0, fused_loss=False)
    batch = collate_tokens(ds, [3, 0, 7, 10])
    dense = _lm_loss(teacher, student, batch, cfg)
    full = build_teacher_cache(teacher, ds, kind="topk", top_k=None, temperature=2.0, progress=False)
    assert full.top_k == 96 and full.vocab_size == 96
    cached = _lm_loss(full, student, batch, cfg)
    # the cache ran the teacher on other batch shapes (sorted, padded otherwise): float32 noise of about 1e-5
    assert float(cached.loss) == pytest.approx(float(dense.loss), rel=1e-4)
    assert cached.metrics["agreement"] == dense.metrics["agreement"]
    # fewer tokens: the tail bucket gives a lower bound of the full divergence
    if loss == "kl":
        few = build_teacher_cache(teacher, ds, kind="topk", top_k=8, temperature=2.0, progress=False)
        assert float(_lm_loss(few, student, batch, cfg).loss) <= float(dense.loss) + 1e-6


def test_topk_cache_trains_causal_lm_with_unmodified_trainer(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="topk", top_k=16, temperature=2.0, progress=False)
    cb = DistillationCallback(cache, loss_terms="kl", temperature=2.0, hard_label_weight=0.5)
    args = training_args(tmp_out, max_steps=8)  # two epochs over the 16 examples, one cache
    trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(hist) == 8 and all({"kd_kl", "task_loss", "agreement"} <= set(h) for h in hist)
    assert cb.teacher is None and cb.fused.enabled  # the fused kernel reads the cache's top-k rows


@pytest.mark.parametrize(("loss", "tail"), [("kl", "bucket"), ("jsd", "renormalize")])
def test_fused_path_with_a_cache_matches_the_plain_path(tmp_out, loss, tail):
    """Two Trainer steps (SGD, GA 2, uneven lengths) give the same student through the fused kernel and the plain
    path, both reading one top-k cache."""
    teacher = tiny_llama(seed=1)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="topk", top_k=8, temperature=2.0, progress=False)

    def student():
        model = tiny_llama(seed=1)
        with torch.no_grad():  # the teacher's weights with a perturbed head: agreement strictly between 0 and 1
            model.lm_head.weight.add_(
                torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05
            )
        return model

    def callback(fused):
        kwargs = {loss: {"topk_tail": tail}}
        return DistillationCallback(
            cache, loss_terms=loss, temperature=2.0, hard_label_weight=0.5, fused_loss=fused, loss_kwargs=kwargs
        )

    runs = fused_and_plain_runs(student, callback, ds, tmp_out)
    assert_same_training(runs, loss)
    assert any(0.0 < h["agreement"] < 1.0 for h in runs[0][1])
    # (task_loss: the plain path logs the Trainer's GA-scaled value times the steps, the fused path the
    # micro-batch mean; under uneven lengths they differ by design, the optimised losses do not)


def test_fused_path_with_a_cache_refuses_what_it_cannot_compute(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="topk", top_k=8, temperature=2.0, progress=False)
    symmetric = {"kl": {"topk_tail": "symmetric"}}
    cb = DistillationCallback(cache, loss_terms="kl", temperature=2.0, loss_kwargs=symmetric)
    Trainer(model=student, args=training_args(tmp_out, max_steps=1), train_dataset=ds, callbacks=[cb]).train()
    assert cb.fused.enabled is False and any("topk_tail" in r for r in cb.fused.reasons)  # fell back
    cb = DistillationCallback(cache, loss_terms="kl", temperature=2.0, loss_kwargs=symmetric, fused_loss=True)
    with pytest.raises(ValueError, match="topk_tail"):
        Trainer(model=student, args=training_args(tmp_out, max_steps=1), train_dataset=ds, callbacks=[cb]).train()
    # a left-padded labelled row: the kernel's mask would drop it from the task loss, so it is refused
    from kd_plugins.distill.fused import _cache_rows

    am = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded"):
        _cache_rows(am[:, 1:].reshape(-1).bool(), am, torch.tensor([[-100, 5, 6, 7]]))


def test_topk_cache_of_sequence_classifier_has_one_row_per_example():
    teacher = tiny_bert("BertForSequenceClassification", seed=1, layers=3, num_labels=5)
    student = tiny_bert("BertForSequenceClassification", seed=2, num_labels=5)
    teacher.eval(), student.eval()
    ds = TokenDataset(labels="seq", num_labels=5, pad_last=4)
    cfg = dict(loss_terms="kl", temperature=3.0)
    batch = collate_tokens(ds, [4, 1, 6])
    cache = build_teacher_cache(teacher, ds, kind="topk", top_k=None, temperature=3.0, progress=False)
    assert cache.tensors["indices"].shape == (16, 5) and cache.vocab_size == 5
    dense = _lm_loss(teacher, student, batch, cfg)
    # equal up to the tail bucket's 1e-7 floor (log_prob_pair clamps the covered mass below 1)
    assert float(_lm_loss(cache, student, batch, cfg).loss) == pytest.approx(float(dense.loss), rel=1e-5, abs=1e-6)


def test_collated_batches_give_the_same_cache_as_the_dataset():
    teacher, _ = _encoders()
    ds = TokenDataset(labels=None, pad_last=4)
    from_ds = build_teacher_cache(teacher, ds, progress=False)
    batches = [collate_tokens(ds, range(i, i + 4)) for i in range(0, 16, 4)]  # collated batches, like a DataLoader
    from_batches = build_teacher_cache(teacher, batches, progress=False)
    assert from_batches.metadata == from_ds.metadata
    whole = collate_tokens(ds, range(16))
    torch.testing.assert_close(
        from_batches.lookup(whole)["pooled_embedding"], from_ds.lookup(whole)["pooled_embedding"]
    )


def test_left_padded_causal_rows_at_padding_are_skipped():
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="topk", top_k=4, progress=False)
    engine = DistillationEngine(cache, DistillationConfig(loss_terms="kl"))
    engine.setup(student)
    batch = collate_tokens(ds, [0, 1, 2, 3], left=True)
    with torch.no_grad():
        out = student(**_inputs(batch))
    _, _, _, mask = engine._aligned_logits(out, engine.teacher_forward(batch), batch["labels"], batch["attention_mask"])
    # one next-token row per pair of real neighbours: length - 1 per example, none at a padded position
    assert int(mask.sum()) == int((batch["attention_mask"].sum(1) - 1).sum())
    assert torch.isfinite(engine.compute(batch, out).loss)
