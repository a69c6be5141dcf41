"""Low-rank teacher caches: exact head + a tail rebuilt from the teacher's PCA-coded final hidden state."""

import pytest
import torch
import torch.nn.functional as F
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
    build_teacher_cache,
    load_teacher_cache,
    save_teacher_cache,
)
from kd_plugins.distill.cache_lowrank import encode_hidden, fit_hidden_basis, rebuild_log_probs


def _teacher():
    teacher = tiny_llama(seed=1)
    with torch.no_grad():  # a peaked teacher: a head and a tail worth telling apart
        teacher.lm_head.weight.mul_(8.0)
    return teacher


def _teacher_log_probs(teacher, batch, temperature):
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.log_softmax(logits / temperature, -1)


def test_rebuilt_rows_are_distributions_with_the_exact_head():
    torch.manual_seed(0)
    hidden, weight = torch.randn(200, 16), torch.randn(50, 16) * 3
    mean, basis = fit_hidden_basis(hidden, rank=4)
    codes, scale = encode_hidden(hidden, mean, basis)
    logp = F.log_softmax(hidden @ weight.T, -1)
    head = logp.topk(5, -1)
    out = rebuild_log_probs(head.indices, head.values, codes, scale, weight @ mean, weight @ basis.T)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(200), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.gather(1, head.indices), head.values)
    # full rank: the tail is the teacher's up to the int8 rounding of the code
    mean, basis = fit_hidden_basis(hidden, rank=16)
    codes, scale = encode_hidden(hidden, mean, basis)
    out = rebuild_log_probs(head.indices, head.values, codes, scale, weight @ mean, weight @ basis.T)
    kl = (logp.exp() * (logp - out)).sum(-1)
    assert float(kl.max()) < 1e-3


def test_fit_hidden_basis_refuses_impossible_ranks():
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 16\]"):
        fit_hidden_basis(torch.randn(100, 16), rank=17)
    with pytest.raises(ValueError, match="fitting tokens"):
        fit_hidden_basis(torch.randn(8, 16), rank=12)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "tvd"])
def test_full_rank_cache_rebuilds_the_teacher_and_its_loss(loss):
    teacher, student = _teacher(), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="lowrank", top_k=8, rank=32, temperature=2.0, progress=False)
    assert cache.kind == "lowrank" and cache.top_k == 8 and cache.metadata["rank"] == 32
    batch = collate_tokens(ds, [3, 0, 7, 10])
    want = _teacher_log_probs(teacher, batch, 2.0)
    got = F.log_softmax(cache.lookup(batch)["logits"] / 2.0, -1)
    valid = batch["attention_mask"].bool()
    kl = (want.exp() * (want - got)).sum(-1)[valid]
    assert float(kl.max()) < 1e-3
    cfg = DistillationConfig(loss_terms=loss, temperature=2.0, fused_loss=False)
    losses = []
    for source in (teacher, cache):
        engine = DistillationEngine(source, cfg)
        engine.setup(student)
        with torch.no_grad():
            out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses.append(float(engine.compute(batch, out).loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_low_rank_cache_keeps_more_of_the_tail_than_a_top_k_cache():
    teacher = _teacher()
    ds = TokenDataset(pad_last=3)
    batch = collate_tokens(ds, list(range(16)))
    want = _teacher_log_probs(teacher, batch, 1.0)
    valid = batch["attention_mask"].bool()
    low = build_teacher_cache(teacher, ds, kind="lowrank", top_k=4, rank=16, progress=False).lookup(batch)["logits"]
    idx, lp = build_teacher_cache(teacher, ds, kind="topk", top_k=4, progress=False).lookup(batch)["teacher_topk"]
    tail = (-torch.expm1(torch.logsumexp(lp, -1, keepdim=True))) / (96 - 4)  # the top-k row's tail, spread evenly
    flat = tail.expand(*lp.shape[:-1], 96).clone().scatter(-1, idx, lp.exp())
    kl_low = (want.exp() * (want - low)).sum(-1)[valid].mean()
    kl_top = (want.exp() * (want - flat.log())).sum(-1)[valid].mean()
    assert float(kl_low) < 0.5 * float(kl_top)


def test_lowrank_cache_trains_with_an_unmodified_trainer_and_round_trips(tmp_out, tmp_path):
    teacher, student = _teacher(), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="lowrank", top_k=8, rank=4, progress=False)
    path = save_teacher_cache(cache, tmp_path / "c")
    back = load_teacher_cache(path, teacher=teacher, dataset=ds, kind="lowrank")
    assert back.metadata == cache.metadata
    for name, v in cache.tensors.items():
        assert back.tensors[name].dtype == v.dtype and torch.equal(back.tensors[name], v), name
    cb = DistillationCallback(back, loss_terms="kl", hard_label_weight=0.5)
    trainer = Trainer(model=student, args=training_args(tmp_out, max_steps=4), train_dataset=ds, callbacks=[cb])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_kl" in h]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["kd_kl"])) for h in hist)
    assert cb.teacher is None and cb.fused.enabled  # the kernel reads the rebuilt rows as dense teacher logits


def test_left_padded_rows_at_padding_are_skipped():
    teacher, student = _teacher(), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    cache = build_teacher_cache(teacher, ds, kind="lowrank", top_k=4, rank=4, progress=False)
    engine = DistillationEngine(cache, DistillationConfig(loss_terms="kl"))
    engine.setup(student)
    batch = collate_tokens(ds, [0, 1, 2, 3], left=True)
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    _, _, _, mask = engine._aligned_logits(out, engine.teacher_forward(batch), batch["labels"], batch["attention_mask"])
    assert int(mask.sum()) == int((batch["attention_mask"].sum(1) - 1).sum())
    assert torch.isfinite(engine.compute(batch, out).loss)


def test_bad_lowrank_requests_are_refused(tmp_out):
    ds = TokenDataset(pad_last=3)
    teacher = _teacher()
    with pytest.raises(ValueError, match="no get_output_embeddings"):
        build_teacher_cache(tiny_bert("BertModel"), TokenDataset(labels=None), kind="lowrank", progress=False)
    with pytest.raises(ValueError, match="transforms its logits after the head"):  # MLM head: dense + norm first
        build_teacher_cache(tiny_bert("BertForMaskedLM"), ds, kind="lowrank", top_k=4, rank=4, progress=False)
    with pytest.raises(ValueError, match="must be below the vocabulary"):
        build_teacher_cache(teacher, ds, kind="lowrank", top_k=96, progress=False)
    with pytest.raises(ValueError, match="needs top_k >= 1"):
        build_teacher_cache(teacher, ds, kind="lowrank", top_k=None, progress=False)
    scaled = _teacher()
    scaled.register_forward_hook(lambda m, i, out: out.__setitem__("logits", out["logits"] * 2.0) or out)
    with pytest.raises(ValueError, match="transforms its logits after the head"):
        build_teacher_cache(scaled, ds, kind="lowrank", top_k=4, rank=4, progress=False)
    cache = build_teacher_cache(teacher, ds, kind="lowrank", top_k=4, rank=4, progress=False)
    engine = DistillationEngine(cache, DistillationConfig(loss_terms="logit_mse"))
    with pytest.raises(ValueError, match="compares raw teacher logits"):
        engine.setup(tiny_llama(seed=2))


def test_sharded_lowrank_cache_streams_what_the_in_memory_one_holds(tmp_path, tmp_out):
    from kd_plugins import TeacherCache, cache_teacher

    teacher, ds = _teacher(), TokenDataset(pad_last=3)
    memory = build_teacher_cache(teacher, ds, kind="lowrank", top_k=8, rank=4, fit_tokens=1000, progress=False)
    disk = cache_teacher(
        teacher, ds, tmp_path / "c", kind="lowrank", top_k=8, rank=4, fit_tokens=1000, value_format="fp32",
        shard_tokens=20, progress=False,
    )  # fmt: skip
    manifest = disk.store.manifest
    assert len(manifest["shards"]) > 1 and manifest["encoding"]["extras"] == ["coefficients", "scales"]
    assert TeacherCache(tmp_path / "c").kind == "lowrank" and disk.metadata["rank"] == 4
    batch = collate_tokens(ds, [5, 0, 9, 2])
    valid = batch["attention_mask"].bool()
    a, b = (F.log_softmax(c.lookup(batch)["logits"], -1)[valid] for c in (memory, disk))
    torch.testing.assert_close(b.exp(), a.exp(), rtol=0, atol=2e-3)  # bf16 vs fp32 head values
    # a basis fitted mid-stream (60 tokens): the rows buffered before the fit are written too, in order
    mid = cache_teacher(teacher, ds, tmp_path / "m", kind="lowrank", top_k=8, rank=4, fit_tokens=60, progress=False)
    rebuilt = F.log_softmax(mid.lookup(batch)["logits"], -1)[valid]
    want = _teacher_log_probs(teacher, batch, 1.0)[valid]
    head = want.topk(8, -1)  # each row's head is its own example's (the waiting rows kept their order)
    torch.testing.assert_close(rebuilt.gather(-1, head.indices).exp(), head.values.exp(), rtol=2**-7, atol=1e-6)
    cb = DistillationCallback(disk, loss_terms="kl")
    trainer = Trainer(
        model=tiny_llama(seed=2), args=training_args(tmp_out, max_steps=2), train_dataset=ds, callbacks=[cb]
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["kd_kl"])) for h in trainer.state.log_history if "kd_kl" in h)
    with pytest.raises(ValueError, match="use selection='topk' with it"):
        cache_teacher(teacher, ds, tmp_path / "d", kind="lowrank", selection="sampled", progress=False)


@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_fused_path_with_a_lowrank_cache_matches_the_plain_path(tmp_out, loss):
    """Two Trainer steps (SGD, GA 2, uneven lengths) give the same student through the fused kernel (reading the
    rebuilt rows as dense teacher logits) and through the plain path."""
    cache = build_teacher_cache(_teacher(), TokenDataset(pad_last=3), kind="lowrank", top_k=8, rank=8,
                                temperature=2.0, progress=False)  # fmt: skip

    def callback(fused):
        return DistillationCallback(cache, loss_terms=loss, temperature=2.0, hard_label_weight=0.5, fused_loss=fused)

    runs = fused_and_plain_runs(lambda: tiny_llama(seed=2), callback, TokenDataset(pad_last=3), tmp_out)
    assert_same_training(runs, loss)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_kernel_rebuilds_exact_head_rows_chunk_by_chunk(divergence):
    """fused_linear_kd_loss(teacher_exact_head=...) equals the same loss given the rebuilt rows as dense logits."""
    from kd_plugins.kernels import FusedLinearKDLoss, fused_linear_kd_loss
    from kd_plugins.kernels._spec import spread_tail

    g = torch.Generator().manual_seed(0)
    n, d, v, r, h, t = 10, 8, 40, 4, 5, 2.0
    hs = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    code, tw, tb = torch.randn(n, r, generator=g), torch.randn(v, r, generator=g) * 3, torch.randn(v, generator=g)
    head = F.log_softmax(torch.randn(n, v, generator=g) * 3 / t, -1).topk(h, -1)
    dense = spread_tail((code @ tw.T + tb) / t, head.indices, head.values) * t  # logits whose softmax at T is the row
    mask = torch.arange(n) % 4 != 1
    kw = dict(divergence=divergence, temperature=t, mask=mask, chunk_size=3)
    grads = []
    for teacher in (
        dict(
            teacher_hidden=code,
            teacher_head_weight=tw,
            teacher_head_bias=tb,
            teacher_exact_head=(head.indices, head.values),
        ),
        dict(teacher_logits=dense),
    ):
        loss = fused_linear_kd_loss(hs, w, **teacher, **kw)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (hs, w))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    module = FusedLinearKDLoss(divergence=divergence, temperature=t, chunk_size=3)  # the nn.Module form
    as_module = module(hs, w, code, tw, teacher_head_bias=tb, teacher_exact_head=(head.indices, head.values), mask=mask)
    torch.testing.assert_close(as_module.detach(), grads[0][0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="refines a dense teacher"):
        fused_linear_kd_loss(
            hs, w, teacher_topk=(head.indices, head.values), teacher_exact_head=(head.indices, head.values)
        )
    with pytest.raises(ValueError, match="teacher_exact_head indices must lie"):  # errors name the argument
        fused_linear_kd_loss(hs, w, teacher_logits=dense, teacher_exact_head=(head.indices + v, head.values))
    with pytest.raises(ValueError, match="backend='torch' only"):
        fused_linear_kd_loss(
            hs, w, teacher_logits=dense, teacher_exact_head=(head.indices, head.values), backend="triton"
        )
