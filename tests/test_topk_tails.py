"""Sparse-teacher tail forms of the logit losses: what "zero" and "symmetric" (DistillKit's forms) compute, equality
with the dense loss at K = V, gradients."""

import math

import pytest
import torch

from kd_plugins.losses._common import TOPK_TAILS, kl_rows, log1mexp, log_mix, log_prob_pair
from kd_plugins.losses.logit import (
    generalized_jsd,
    kl_divergence,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation_distance,
)

T = 2.0
LOSSES = {
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl_divergence,
    "skew_reverse_kl": skew_reverse_kl_divergence,
    "tvd": total_variation_distance,
    "soft_ce": soft_cross_entropy,
}


def _pair(rows=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    return s, t


def _topk(t, k):
    out = torch.log_softmax(t / T, -1).topk(k)
    return out.indices, out.values


@pytest.mark.parametrize("tail", TOPK_TAILS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_tail_form_equals_the_dense_loss_at_k_equal_v(tail, name):
    s, t = _pair()
    dense = LOSSES[name](s, t, temperature=T)
    sparse = LOSSES[name](s, None, temperature=T, teacher_topk=_topk(t, t.shape[-1]), topk_tail=tail)
    if tail == "zero" and name == "reverse_kl":
        # the student's float rounding leaves ~1e-7 of mass where the zero-tail teacher has none: KL(q || p) = inf
        assert math.isinf(sparse.item())
        return
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "soft_ce"])
def test_zero_tail_is_the_dense_loss_against_the_renormalised_teacher(name):
    """'zero' (DistillKit ZERO): the teacher renormalised over its top-k, no mass elsewhere; student unchanged."""
    s, t = _pair()
    idx, lp = _topk(t, 4)
    truncated = torch.full_like(t, float("-inf")).scatter(-1, idx, lp)  # log p~ over the vocabulary (times T below)
    sparse = LOSSES[name](s, None, temperature=T, teacher_topk=(idx, lp), topk_tail="zero")
    dense = LOSSES[name](s, truncated * T, temperature=T)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-6)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_dense,) = torch.autograd.grad(dense, s)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd", "tvd"])
def test_symmetric_tail_is_the_bucket(name):
    """DistillKit SYMMETRIC_UNIFORM: both tails spread uniformly over the V - K missing tokens; computed densely
    here, it equals the bucket form (a divergence sum_i q_i f(p_i / q_i) does not see the spreading)."""
    s, t = _pair()
    idx, lp = _topk(t, 4)
    log_q = torch.log_softmax(s / T, -1)
    missing = torch.ones_like(t, dtype=torch.bool).scatter(-1, idx, False)
    m = missing.sum(-1, keepdim=True).double()

    def spread(log_k_vals, log_full):
        tail = log1mexp(torch.logsumexp(log_k_vals, -1, keepdim=True)) - m.log()
        return torch.where(missing, tail.expand_as(log_full), log_full.scatter(-1, idx, log_k_vals))

    p_sym = spread(lp, torch.zeros_like(t))
    q_sym = spread(log_q.gather(-1, idx), log_q)
    row = {
        "kl": lambda a, b: kl_rows(a, b),
        "reverse_kl": lambda a, b: kl_rows(b, a),
        "jsd": lambda a, b: 0.5 * kl_rows(a, log_mix(a, b, 0.5)) + 0.5 * kl_rows(b, log_mix(a, b, 0.5)),
        "tvd": lambda a, b: 0.5 * (a.exp() - b.exp()).abs().sum(-1),
    }[name]
    by_hand = row(p_sym, q_sym).mean() * (1.0 if name == "tvd" else T**2)
    got = LOSSES[name](s, None, temperature=T, teacher_topk=(idx, lp), topk_tail="symmetric")
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-6)
    bucket = LOSSES[name](s, None, temperature=T, teacher_topk=(idx, lp), topk_tail="bucket")
    assert got.item() == bucket.item()


@pytest.mark.parametrize("tail", TOPK_TAILS)
@pytest.mark.parametrize("name", ["kl", "jsd", "tvd", "soft_ce"])
def test_gradients_of_every_tail_form(tail, name):
    s, t = _pair(rows=3, vocab=7)
    topk = _topk(t, 3)
    fn = LOSSES[name]
    assert torch.autograd.gradcheck(lambda x: fn(x, None, temperature=T, teacher_topk=topk, topk_tail=tail), (s,))


def test_log_prob_pair_supports_and_unknown_tail():
    s, t = _pair()
    idx, lp = _topk(t, 4)
    log_p, log_q = log_prob_pair(s, None, temperature=T, teacher_topk=(idx, lp), topk_tail="zero")
    assert log_p.shape == (6, 5) and bool(torch.isneginf(log_p[:, -1]).all())
    torch.testing.assert_close(torch.logsumexp(log_p, -1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(torch.logsumexp(log_q, -1), torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="topk_tail must be one of .*'zero'"):
        log_prob_pair(s, None, teacher_topk=(idx, lp), topk_tail="uniform")
