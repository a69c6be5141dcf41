"""Sampled teacher caches: an adaptive exact head plus a systematic sample of the tail whose weights are unbiased
for the teacher's probabilities, so the forward KL's gradient is unbiased for the full-vocabulary one."""

import math

import pytest
import torch
from tiny import TokenDataset, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, DistillationEngine, TeacherCache
from kd_plugins.distill.cache_select import inclusion_threshold, sampled_support, select_support
from kd_plugins.distill.offline_cache import cache_teacher
from kd_plugins.losses.logit import kl_divergence


def _teacher_rows(n=6, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vocab, generator=g) * 2.0, dim=-1)


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_rows_have_the_exact_head_then_distinct_drawn_tokens_summing_to_one(scale):
    lp = torch.log_softmax(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * scale, dim=-1)
    idx, lw = sampled_support(lp, 12, torch.Generator().manual_seed(0))
    assert idx.shape == lw.shape == (32, 12)
    count, tau = inclusion_threshold(lp.exp().topk(12).values, lp.exp().sum(-1), 12)
    top_lp, top_idx = lp.topk(12, dim=-1)
    for r in range(32):
        c = int(count[r])
        assert 1 <= c <= 12 and len(set(idx[r].tolist())) == 12  # no token twice: the tail bucket stays right
        assert torch.equal(idx[r, :c], top_idx[r, :c]) and torch.equal(lw[r, :c], top_lp[r, :c])  # exact head
        if c < 12:  # every drawn token has inclusion probability p / tau < 1 and weight tau
            assert float(top_lp[r, c].exp()) < float(tau[r])
            torch.testing.assert_close(lw[r, c:].exp(), torch.full((12 - c,), float(tau[r])))
            assert not set(idx[r, c:].tolist()) & set(top_idx[r, :c].tolist())
    torch.testing.assert_close(lw.exp().sum(-1), torch.ones(32))
    assert torch.equal(idx[:, 0], lp.argmax(-1))  # slot 0 holds the teacher's top-1, as in a top-k row


def test_weights_and_kl_gradient_are_unbiased():
    """Averaged over draws, the weights equal the teacher's probabilities and the sparse KL's gradient equals the
    dense one (a fixed seed: the check is deterministic; the tolerance is over 5 standard errors)."""
    lp = _teacher_rows()
    student = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    draws = 3000
    mean_w, mean_grad = torch.zeros(6, 64), torch.zeros(6, 64)
    for _ in range(draws):
        idx, lw = sampled_support(lp, 12, g)
        mean_w.scatter_add_(-1, idx, lw.exp() / draws)
        s = student.clone().requires_grad_(True)
        kl_divergence(s, teacher_topk=(idx, lw), reduction="sum").backward()
        mean_grad += s.grad / draws
    s = student.clone().requires_grad_(True)
    kl_divergence(s, lp, reduction="sum").backward()
    assert (mean_w - lp.exp()).abs().max() < 0.005
    assert (mean_grad - s.grad).abs().max() < 0.005
    # the top-k cache of the same size is biased: its tail bucket leaves the tail's shape to the student
    idx, lw = select_support(lp, 12, "topk")
    t = student.clone().requires_grad_(True)
    kl_divergence(t, teacher_topk=(idx, lw), reduction="sum").backward()
    assert (t.grad - s.grad).abs().max() > 0.02


def test_full_vocabulary_and_underflowed_tails():
    lp = _teacher_rows(vocab=10)
    idx, lw = select_support(lp, 10, "sampled")  # k = V: the whole distribution, nothing drawn
    assert torch.equal(lw, lp.topk(10).values) and torch.equal(idx, lp.topk(10).indices)
    idx, lw = select_support(lp, 1, "sampled")  # one slot: the top-1, exact
    assert torch.equal(idx, lp.topk(1).indices) and torch.equal(lw, lp.topk(1).values)
    peaked = torch.log_softmax(torch.tensor([[0.0, -200.0, -300.0, -400.0, -500.0]]), dim=-1)  # tail exp() == 0
    idx, lw = sampled_support(peaked, 3, torch.Generator().manual_seed(0))
    assert torch.equal(idx, peaked.topk(3).indices) and torch.equal(lw, peaked.topk(3).values)  # top-k, exact


def _cache(path, selection="sampled", seed=0, **kw):
    ds = TokenDataset(pad_last=3)
    kw = dict(top_k=16, temperature=2.0, progress=False, **kw)
    return cache_teacher(tiny_llama(seed=1), ds, path, selection=selection, seed=seed, **kw), ds


def test_sampled_cache_is_reproducible_and_recorded(tmp_path):
    a, ds = _cache(tmp_path / "a")
    b, _ = _cache(tmp_path / "b", batch_size=3)  # draws are seeded per example: batching does not change them
    c, _ = _cache(tmp_path / "c", seed=1)
    batch = {k: torch.stack([ds[i][k] for i in (0, 5)]) for k in ("input_ids", "attention_mask")}
    ia, la = a.lookup(batch)["teacher_topk"]
    ib, lb = b.lookup(batch)["teacher_topk"]
    ic, _ = c.lookup(batch)["teacher_topk"]
    assert torch.equal(ia, ib) and torch.equal(la, lb) and not torch.equal(ia, ic)
    assert a.metadata["selection"] == "sampled" and a.metadata["sample_seed"] == 0


def test_callback_trains_from_a_sampled_cache_fused_and_plain_alike(tmp_path, tmp_out):
    cache, ds = _cache(tmp_path / "c")
    finals = []
    for fused in (True, False):
        student = tiny_llama(seed=2)
        cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=0.5, fused_loss=fused)
        cb = DistillationCallback(TeacherCache(tmp_path / "c"), cfg)
        args = training_args(tmp_out + str(fused), max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
        trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[cb])
        trainer.train()
        assert cb.fused.enabled is fused
        assert all(math.isfinite(h["kd_kl"]) for h in trainer.state.log_history if "kd_kl" in h)
        finals.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-6)


def test_sampled_cache_refuses_what_it_cannot_estimate(tmp_path):
    cache, _ = _cache(tmp_path / "c")
    student = tiny_llama(seed=2)
    for terms, kwargs, match in [
        ("reverse_kl", None, "forward KL and soft cross-entropy only"),
        ("jsd", None, "forward KL and soft cross-entropy only"),
        ("kl", {"kl": {"topk_tail": "renormalize"}}, "renormalize"),
    ]:
        engine = DistillationEngine(cache, DistillationConfig(loss_terms=terms, temperature=2.0, loss_kwargs=kwargs))
        with pytest.raises(ValueError, match=match):
            engine.setup(student)
    DistillationEngine(cache, DistillationConfig(loss_terms="soft_ce", temperature=2.0)).setup(student)
    with pytest.raises(ValueError, match="value_format='bf16' or 'fp32'"):
        _cache(tmp_path / "d", value_format="head_tail")
    with pytest.raises(ValueError, match="selection must be one of"):
        cache_teacher(tiny_llama(seed=1), TokenDataset(), tmp_path / "f", selection="random")
    assert not (tmp_path / "d").exists() and not (tmp_path / "f").exists()


def test_in_memory_sampled_cache_equals_the_sharded_one(tmp_path):
    from kd_plugins import build_teacher_cache, load_teacher_cache, save_teacher_cache

    teacher, ds = tiny_llama(seed=1), TokenDataset(pad_last=3)
    kw = dict(top_k=16, temperature=2.0, selection="sampled", seed=5, progress=False)
    memory = build_teacher_cache(teacher, ds, kind="topk", batch_size=32, **kw)
    disk = cache_teacher(teacher, ds, tmp_path / "c", value_format="fp32", batch_size=32, **kw)
    batch = {k: torch.stack([ds[i][k] for i in (1, 4, 9)]) for k in ("input_ids", "attention_mask")}
    (im, lm), (idk, ld) = memory.lookup(batch)["teacher_topk"], disk.lookup(batch)["teacher_topk"]
    assert torch.equal(im, idk)
    torch.testing.assert_close(lm, ld)
    assert memory.metadata["selection"] == "sampled"
    save_teacher_cache(memory, tmp_path / "m")  # the kind travels with the saved cache: refusals still apply
    reloaded = load_teacher_cache(tmp_path / "m")
    with pytest.raises(ValueError, match="forward KL and soft cross-entropy only"):
        DistillationEngine(reloaded, DistillationConfig(loss_terms="tvd", temperature=2.0)).setup(tiny_llama(seed=2))
    with pytest.raises(ValueError, match="selection must be one of"):
        build_teacher_cache(teacher, ds, kind="topk", selection="top")
