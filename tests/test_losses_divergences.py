"""The four divergences a speculative draft is distilled with (DistillSpec): forward KL, reverse KL, generalised JSD,
TVD. Properties beyond tests/test_losses.py: the scaled beta limits of JSD, its bound, the TVD range and its link to
the acceptance rate, gradients, and the engine's calling convention (registry modules with ``reduction="sum"``)."""

from __future__ import annotations

import math

import pytest
import torch

from kd_plugins.losses import (
    generalized_jsd,
    get_loss,
    get_loss_spec,
    kl_divergence,
    reverse_kl_divergence,
    total_variation_distance,
)

DIVERGENCES = {
    "kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "jsd": generalized_jsd,
    "tvd": total_variation_distance,
}


def _rand(shape=(4, 7), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def test_registered_as_logit_losses_with_aliases():
    for name, fn in DIVERGENCES.items():
        spec = get_loss_spec(name)
        assert spec.kind == "logits" and spec.function is fn
    for alias, name in (("fkl", "kl"), ("rkl", "reverse_kl"), ("gkd", "jsd"), ("total_variation", "tvd")):
        assert get_loss_spec(alias).name == name


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_zero_with_zero_gradient_at_identity(name, temperature):
    s = _rand(seed=1).requires_grad_()
    loss = DIVERGENCES[name](s, s.detach().clone(), temperature=temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert s.grad.abs().max().item() < 1e-12


def test_jsd_scaled_limits_are_the_two_kl_directions():
    """JSD_beta = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, vanishes at beta in {0, 1}; to first
    order JSD_beta ~ beta FKL near 0 and (1-beta) RKL near 1, which is why beta=0 / 1 are defined as FKL / RKL."""
    s, t = _rand(seed=2), _rand(seed=3)
    fkl, rkl = kl_divergence(s, t).item(), reverse_kl_divergence(s, t).item()
    epsilons = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    # The remainder is O(eps log(1/eps)) (where one distribution is tiny next to the other): it shrinks steadily.
    fkl_err = [abs(generalized_jsd(s, t, beta=eps).item() / eps - fkl) / fkl for eps in epsilons]
    rkl_err = [abs(generalized_jsd(s, t, beta=1 - eps).item() / eps - rkl) / rkl for eps in epsilons]
    for err in (fkl_err, rkl_err):
        assert all(a > b for a, b in zip(err, err[1:])) and err[-1] < 2e-5
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(fkl, rel=1e-12)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(rkl, rel=1e-12)


def test_jsd_is_bounded_by_the_entropy_of_the_mixing_weights():
    # Disjoint supports reach the bound h(beta) = -beta log beta - (1-beta) log(1-beta).
    s = torch.tensor([[40.0, 0.0, 0.0], [0.0, 0.0, 40.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 40.0], [40.0, 0.0, 0.0]], dtype=torch.float64)
    for beta in (0.1, 0.3, 0.5, 0.9):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        assert generalized_jsd(s, t, beta=beta).item() == pytest.approx(h, rel=1e-6)
        assert generalized_jsd(_rand(seed=4), _rand(seed=5), beta=beta).item() < h


def test_tvd_lies_in_zero_one_and_is_one_minus_acceptance():
    for seed in range(5):
        s, t = _rand(seed=10 + seed, scale=5.0), _rand(seed=20 + seed, scale=5.0)
        per_row = total_variation_distance(s, t, reduction="none")
        assert (per_row >= 0).all() and (per_row <= 1).all()
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        assert torch.allclose(per_row, 1 - torch.minimum(p, q).sum(-1), atol=1e-12)
    s = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 60.0]], dtype=torch.float64)
    assert total_variation_distance(s, t).item() == pytest.approx(1.0, abs=1e-12)


def test_tvd_is_not_temperature_squared_scaled_but_the_kls_are():
    s, t = _rand(seed=6), _rand(seed=7)
    for name in ("kl", "reverse_kl", "jsd"):
        fn = DIVERGENCES[name]
        assert fn(s, t, temperature=2.0).item() == pytest.approx(4 * fn(s / 2, t / 2).item(), rel=1e-12)
    assert total_variation_distance(s, t, temperature=2.0).item() == pytest.approx(
        total_variation_distance(s / 2, t / 2).item(), rel=1e-12
    )


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_engine_convention_sum_reduction_with_a_mask(name):
    """The engine instantiates logit losses with reduction="sum" and divides by the token count itself."""
    s, t = _rand((2, 5, 9), seed=8), _rand((2, 5, 9), seed=9)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    module = get_loss(name, reduction="sum", temperature=2.0)
    total = module(s, t, mask=mask)
    per_row = DIVERGENCES[name](s, t, mask=mask, temperature=2.0, reduction="none")
    assert total.item() == pytest.approx(per_row.sum().item(), rel=1e-12)
    assert (per_row[~mask] == 0).all()
    garbage = s.clone()
    garbage[1, 2:] = float("nan")  # masked rows are never read
    assert module(garbage, t, mask=mask).item() == pytest.approx(total.item(), rel=1e-12)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_gradients_are_finite_and_reduce_the_divergence(name):
    s, t = _rand((3, 6), seed=11, scale=8.0).requires_grad_(), _rand((3, 6), seed=12, scale=8.0)
    loss = DIVERGENCES[name](s, t, temperature=1.0)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = DIVERGENCES[name](s - 1e-3 * s.grad, t)
    assert stepped.item() < loss.item()
