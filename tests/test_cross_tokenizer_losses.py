"""kd_plugins.losses.cross_tokenizer: ALM goldens (float64) and properties of chunk_logprobs, ALM, chunk_hidden and
ULD."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.losses import (
    alm_loss,
    chunk_hidden_loss,
    chunk_logprobs,
    get_loss,
    get_loss_function,
    list_losses,
    target_token_logprobs,
    uld_loss,
)

D = torch.float64


def _t(*values):
    return torch.tensor(values, dtype=D)


# ------------------------------------------------------------------------------------------------ ALM
def test_alm_goldens():
    # log P_T = -2, log P_S = -3, tau = 100, eps = 1e-6 (the paper's reference code, binary CE form).
    assert alm_loss(_t(-3.0), _t(-2.0)).item() == pytest.approx(0.0991405, abs=1e-7)
    assert alm_loss(_t(-2.0), _t(-2.0)).item() == pytest.approx(0.0972687, abs=1e-7)  # not 0 at equality
    assert alm_loss(_t(-3.0), _t(-2.0), form="binary_kl").item() == pytest.approx(0.00187176, abs=1e-8)
    assert alm_loss(_t(-3.0), _t(-2.0), form="abs").item() == 1.0
    # Hand formula of the binarised CE.
    a, b = -2.0 / 100 - 1e-6, -3.0 / 100 - 1e-6
    ref = -(math.exp(a) * b + (1 - math.exp(a)) * math.log1p(-math.exp(b)))
    assert alm_loss(_t(-3.0), _t(-2.0)).item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("form", ["binary_ce", "binary_kl", "abs"])
def test_alm_identity_value_and_gradient(form):
    t = _t(-0.01, -2.0, -7.5, -40.0, 0.0)
    s = t.clone().requires_grad_(True)
    loss = alm_loss(s, t, form=form, reduction="sum")
    if form == "binary_ce":  # the teacher's binary entropy: constant in the student
        assert loss.item() > 0
    else:
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
    if form != "abs":  # |x| has no gradient at 0
        (g,) = torch.autograd.grad(loss, s)
        assert torch.allclose(g, torch.zeros_like(g), atol=1e-10)
    # Finite-difference: the binarised forms are minimised at equality.
    if form != "abs":
        for d in (-0.5, 0.5):
            assert alm_loss(t + d, t, form=form, reduction="sum").item() > alm_loss(t, t, form=form, reduction="sum")


def test_alm_binary_kl_is_ce_minus_teacher_entropy():
    torch.manual_seed(0)
    t, s = -torch.rand(20, dtype=D) * 30, -torch.rand(20, dtype=D) * 30
    ce = alm_loss(s, t, reduction="none")
    kl = alm_loss(s, t, form="binary_kl", reduction="none")
    ent = alm_loss(t, t, reduction="none")
    assert torch.allclose(ce - kl, ent, atol=1e-12)


def test_alm_masking_reductions_and_num_items():
    torch.manual_seed(0)
    s, t = -torch.rand(2, 5, dtype=D) * 10, -torch.rand(2, 5, dtype=D) * 10
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    garbage_s, garbage_t = s.masked_fill(~mask, float("nan")), t.masked_fill(~mask, float("-inf"))
    ref = alm_loss(s[mask], t[mask], reduction="sum")
    assert alm_loss(garbage_s, garbage_t, mask, reduction="sum").item() == pytest.approx(ref.item(), rel=1e-12)
    mean = alm_loss(s, t, mask)
    assert mean.item() == pytest.approx(ref.item() / 5, rel=1e-12)
    assert alm_loss(s, t, mask, num_items_in_batch=10).item() == pytest.approx(ref.item() / 10, rel=1e-12)
    none = alm_loss(s, t, mask, reduction="none")
    assert none.shape == (2, 5) and (none[~mask] == 0).all()
    # Appending masked chunks does not change the loss.
    s2, t2 = torch.cat([s, -torch.ones(2, 3, dtype=D)], 1), torch.cat([t, torch.zeros(2, 3, dtype=D)], 1)
    m2 = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    assert alm_loss(s2, t2, m2).item() == pytest.approx(mean.item(), rel=1e-12)


@pytest.mark.parametrize("form", ["binary_ce", "binary_kl", "abs"])
def test_alm_gradients_finite_at_extremes(form):
    s = _t(0.0, -1e-9, -1e4, -30.0, 1e-7).requires_grad_(True)  # 1e-7: float rounding above 0 is clipped
    t = _t(-1e-9, 0.0, -2.0, -1e4, -0.5)
    loss = alm_loss(s, t, form=form)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_alm_errors():
    with pytest.raises(ValueError, match="form must be one of"):
        alm_loss(_t(-1.0), _t(-1.0), form="kl")
    with pytest.raises(ValueError, match="same shape"):
        alm_loss(_t(-1.0, -2.0), _t(-1.0))
    with pytest.raises(ValueError, match="tau > 0"):
        alm_loss(_t(-1.0), _t(-1.0), tau=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        alm_loss(_t(-1.0), _t(float("nan")))


# ------------------------------------------------------------------------------------------------ chunk log-probs
def test_target_token_logprobs_matches_log_softmax_and_is_shift_invariant():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, dtype=D), torch.randint(0, 11, (2, 6))
    lp = target_token_logprobs(logits, ids)
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert lp.shape == (2, 6) and (lp[:, 0] == 0).all() and torch.allclose(lp[:, 1:], ref, atol=1e-12)
    shifted = logits + torch.randn(2, 6, 1, dtype=D) * 50  # a constant per position
    assert torch.allclose(target_token_logprobs(shifted, ids), lp, atol=1e-10)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        target_token_logprobs(logits[0], ids[0])


def test_chunk_logprobs_sum_complete_mask_and_gradient():
    lp = _t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0)[None].repeat(2, 1).requires_grad_(True)
    ids = torch.tensor([[-1, 0, 0, 1, 2, -1], [0, 1, 1, 1, -1, -1]])
    valid = torch.tensor([[0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, complete = chunk_logprobs(lp, ids, torch.tensor([3, 2]), token_mask=valid)
    assert out.shape == (2, 3)
    assert out[0].tolist() == [-5.0, -4.0, 0.0] and out[1].tolist() == [0.0, -9.0, 0.0]
    # Row 0: chunk 2's token is invalid; row 1: chunk 0's token has no context; chunk 2 is beyond num_chunks.
    assert complete.tolist() == [[True, True, False], [False, True, False]]
    out[complete].sum().backward()
    assert lp.grad.tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]
    plain, all_complete = chunk_logprobs(lp.detach(), ids, 3)
    assert plain[0].tolist() == [-5.0, -4.0, -5.0] and all_complete[1].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="num_chunks allows 2"):
        chunk_logprobs(lp.detach(), ids, 2)


def test_alm_on_chunks_is_zero_when_models_agree():
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 8, 13, dtype=D), torch.randint(0, 13, (1, 8))
    chunks = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, 3]])
    c, m = chunk_logprobs(target_token_logprobs(logits, ids), chunks, 4, token_mask=torch.arange(8)[None] > 0)
    assert m.all() and alm_loss(c, c.detach(), m, form="abs").item() == 0.0


# ------------------------------------------------------------------------------------------------ ULD
def test_uld_golden_with_different_vocabularies():
    s = torch.log(_t(0.5, 0.5))[None]
    t = torch.log(_t(0.1, 0.7, 0.2))[None]
    # sorted: (0.5, 0.5, 0) vs (0.7, 0.2, 0.1) -> 0.2 + 0.3 + 0.1
    assert uld_loss(s, t).item() == pytest.approx(0.6, abs=1e-12)
    assert uld_loss(t, s).item() == pytest.approx(0.6, abs=1e-12)


def test_uld_identity_permutation_shift_and_temperature():
    torch.manual_seed(0)
    s = torch.randn(3, 4, 17, dtype=D)
    assert uld_loss(s, s).item() == pytest.approx(0.0, abs=1e-14)
    perm = torch.randperm(17)
    assert uld_loss(s, s[..., perm]).item() == pytest.approx(0.0, abs=1e-14)
    t = torch.randn(3, 4, 29, dtype=D)
    base = uld_loss(s, t)
    assert uld_loss(s + 7.0, t - 3.0).item() == pytest.approx(base.item(), abs=1e-12)
    assert uld_loss(s[..., perm], t[..., torch.randperm(29)]).item() == pytest.approx(base.item(), abs=1e-12)
    assert 0 < base.item() <= 2
    assert uld_loss(s, s * 2, teacher_temperature=2.0).item() == pytest.approx(0.0, abs=1e-14)


def test_uld_masking_reductions_and_gradients():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 9, dtype=D, requires_grad=True)
    t = torch.randn(2, 5, 12, dtype=D)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    ref = sum(uld_loss(s[b, i], t[b, i]) for b in range(2) for i in range(5) if mask[b, i])
    assert uld_loss(s, t, mask=mask, reduction="sum").item() == pytest.approx(ref.item(), rel=1e-12)
    assert uld_loss(s, t, mask=mask).item() == pytest.approx(ref.item() / 5, rel=1e-12)
    t_bad = t.clone()
    t_bad[~mask] = float("nan")
    loss = uld_loss(s, t_bad, mask=mask)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all() and g[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="rows"):
        uld_loss(s[:, :4], t)


# ------------------------------------------------------------------------------------------------ registry
def test_registered_as_cross_tokenizer_losses():
    assert {"alm", "uld", "chunk_hidden"} <= set(list_losses("cross_tokenizer"))
    assert get_loss_function("alm") is alm_loss and get_loss_function("uld") is uld_loss
    s, t = _t(-3.0, -1.0), _t(-2.0, -1.5)
    assert get_loss("alm")(s, t).item() == pytest.approx(alm_loss(s, t).item(), rel=1e-12)
    assert get_loss("alm", form="abs", reduction="sum")(s, t).item() == pytest.approx(1.5)
    m = torch.tensor([True, False])
    assert get_loss("approximate_likelihood_matching", tau=10.0)(s, t, mask=m).item() == pytest.approx(
        alm_loss(s[:1], t[:1], tau=10.0).item(), rel=1e-12
    )
    x, y = torch.randn(4, 7, dtype=D), torch.randn(4, 5, dtype=D)
    assert get_loss("uld", teacher_temperature=2.0)(x, y).item() == pytest.approx(
        uld_loss(x, y, teacher_temperature=2.0).item(), rel=1e-12
    )
    with pytest.raises(ValueError, match="form must be one of"):
        get_loss("alm", form="binary")


# ------------------------------------------------------------------------------------------------ chunk_hidden
def test_chunk_hidden_by_hand_and_normalisations():
    s = _t(1.0, 2.0, 0.0, 4.0).reshape(2, 2)  # 2 chunks x 2 channels
    t = _t(0.0, 0.0, 2.0, 2.0).reshape(2, 2)
    # none: per chunk the mean squared error over channels (2.5, 4.0), then the mean over chunks
    assert chunk_hidden_loss(s, t, normalize="none").item() == pytest.approx(3.25)
    # channelwise: the teacher's mean squares are 2 and 2, so every squared error is halved
    assert chunk_hidden_loss(s, t, epsilon=0.0).item() == pytest.approx(1.625)
    assert chunk_hidden_loss(s, t, normalize="none", reduction="sum").item() == pytest.approx(6.5)
    none = chunk_hidden_loss(s, t, normalize="none", reduction="none")
    assert none.tolist() == pytest.approx([2.5, 4.0])
    assert chunk_hidden_loss(s, t, normalize="none", num_items_in_batch=4).item() == pytest.approx(6.5 / 4)


def test_chunk_hidden_zero_at_identity_scale_invariance_and_masking():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 5, 8, generator=g, dtype=D, requires_grad=True)
    h_t = torch.randn(2, 5, 8, generator=g, dtype=D)
    same = chunk_hidden_loss(h_s, h_s.detach().clone())
    (grad,) = torch.autograd.grad(same, h_s)
    assert same.item() == 0.0 and grad.abs().max().item() == 0.0
    # channelwise: scaling one channel of both sides changes nothing; plain squared error changes
    scale = torch.ones(8, dtype=D)
    scale[3] = 7.0
    ref = chunk_hidden_loss(h_s, h_t, epsilon=0.0)
    assert chunk_hidden_loss(h_s * scale, h_t * scale, epsilon=0.0).item() == pytest.approx(ref.item(), rel=1e-10)
    plain = chunk_hidden_loss(h_s, h_t, normalize="none")
    assert chunk_hidden_loss(h_s * scale, h_t * scale, normalize="none").item() != pytest.approx(plain.item())
    # masked chunks neither count nor receive gradients; the teacher's moments come from scored chunks only
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    value = chunk_hidden_loss(h_s, h_t, mask)
    moved = h_t.clone()
    moved[~mask] += 100.0
    assert chunk_hidden_loss(h_s, moved, mask).item() == pytest.approx(value.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(value, h_s)
    assert grad[~mask].abs().max().item() == 0.0 and grad[mask].abs().max().item() > 0
    assert chunk_hidden_loss(h_s, h_t, torch.zeros_like(mask)).item() == 0.0
    assert get_loss("alm_latents")(h_s, h_t, mask=mask).item() == pytest.approx(value.item(), rel=1e-12)
    assert get_loss_function("chunk_hidden") is chunk_hidden_loss


def test_chunk_hidden_errors():
    with pytest.raises(ValueError, match="same hidden size"):
        chunk_hidden_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="normalize must be one of"):
        chunk_hidden_loss(torch.zeros(2, 4), torch.zeros(2, 4), normalize="layer")
    with pytest.raises(ValueError, match="normalize must be one of"):
        get_loss("chunk_hidden", normalize="batch")
