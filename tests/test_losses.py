"""Golden float64 values (docs/losses.md, Golden values) and property tests for every registered loss."""

import math

import pytest
import torch

from kd_plugins.losses import (
    affinity_kl,
    affinity_mse,
    attention_kl,
    attention_mse,
    dkd_loss,
    embedding_cosine,
    embedding_mse,
    generalized_jsd,
    get_loss,
    get_loss_function,
    hidden_cosine,
    hidden_mse,
    kl_divergence,
    list_losses,
    logit_mse,
    register_loss,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    soft_cross_entropy,
    total_variation_distance,
)

S = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
T = torch.tensor([[2.0, 1.0, 0.1]], dtype=torch.float64)

GOLDEN = [
    (kl_divergence, {}, 1.121303),
    (reverse_kl_divergence, {}, 1.093321),
    (kl_divergence, {"temperature": 2.0}, 1.231432),
    (kl_divergence, {"temperature": 4.0}, 1.260979),
    (generalized_jsd, {"beta": 0.1}, 0.094578),
    (generalized_jsd, {"beta": 0.5}, 0.239879),
    (generalized_jsd, {"beta": 0.9}, 0.092962),
    (total_variation_distance, {}, 0.568971),
    (skew_kl_divergence, {"skew": 0.1}, 0.807533),
    (skew_reverse_kl_divergence, {"skew": 0.1}, 0.799063),
    (soft_cross_entropy, {}, 1.968041),
]

DIVERGENCES = [
    kl_divergence,
    reverse_kl_divergence,
    generalized_jsd,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
    total_variation_distance,
]


@pytest.mark.parametrize("fn,kw,expected", GOLDEN, ids=[f"{f.__name__}-{k}" for f, k, _ in GOLDEN])
def test_golden_values(fn, kw, expected):
    assert fn(S, T, **kw).item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_golden_dkd():
    loss, tckd, nckd = dkd_loss(S, T, labels=torch.tensor([0]), alpha=1.0, beta=8.0, temperature=4.0, return_parts=True)
    assert loss.item() == pytest.approx(4.593562, rel=1e-6)
    assert tckd.item() == pytest.approx(0.998808, rel=1e-5)
    assert nckd.item() == pytest.approx(0.449344, rel=1e-5)


def test_symmetric_pair_catches_swapped_arguments():
    t = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    assert kl_divergence(S, t).item() == pytest.approx(1.150421, rel=1e-6)
    assert reverse_kl_divergence(S, t).item() == pytest.approx(1.150421, rel=1e-6)
    assert kl_divergence(S, t, temperature=2.0).item() == pytest.approx(1.280627, rel=1e-6)


def _rand(shape=(2, 5, 11), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2


@pytest.mark.parametrize("fn", DIVERGENCES)
def test_zero_at_identity(fn):
    x = _rand()
    assert fn(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_and_logit_mse_zero_at_identity():
    x = _rand((6, 7))
    y = torch.arange(6) % 7
    assert dkd_loss(x, x.clone(), labels=y).item() == pytest.approx(0.0, abs=1e-12)
    assert logit_mse(x, x.clone()).item() == 0.0


def test_soft_ce_gradient_zero_at_identity():
    x = _rand((4, 9)).requires_grad_()
    soft_cross_entropy(x, x.detach().clone(), temperature=2.0).backward()
    assert x.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("fn", DIVERGENCES + [soft_cross_entropy])
def test_shift_invariance(fn):
    s, t = _rand(seed=1), _rand(seed=2)
    base = fn(s, t, temperature=1.5)
    shifted = fn(s + 3.7, t - 11.0, temperature=1.5)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-10)


def test_dkd_shift_invariance_and_kl_identity():
    s, t = _rand((5, 6), seed=3), _rand((5, 6), seed=4)
    y = torch.tensor([0, 1, 2, 3, 4])
    a = dkd_loss(s, t, labels=y, temperature=2.0)
    b = dkd_loss(s + 5, t - 2, labels=y, temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    # Per sample, alpha=1 and beta=(1 - p_T[y]) reproduces KL exactly (Zhao et al., Eq. 4).
    for i in range(5):
        p_ty = torch.softmax(t[i] / 2.0, -1)[y[i]].item()
        d = dkd_loss(s[i : i + 1], t[i : i + 1], labels=y[i : i + 1], alpha=1.0, beta=1 - p_ty, temperature=2.0)
        k = kl_divergence(s[i : i + 1], t[i : i + 1], temperature=2.0)
        assert d.item() == pytest.approx(k.item(), rel=1e-9)


def test_jsd_limits_and_symmetry():
    s, t = _rand(seed=5), _rand(seed=6)
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(kl_divergence(s, t).item(), rel=1e-12)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(reverse_kl_divergence(s, t).item(), rel=1e-12)
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(generalized_jsd(t, s, beta=0.5).item(), rel=1e-12)
    # TRL's check: the endpoints equal torch's F.kl_div.
    ref = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
    )
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(ref.item(), rel=1e-12)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, beta=1.5)


def test_skew_limits():
    s, t = _rand(seed=7), _rand(seed=8)
    assert skew_kl_divergence(s, t, skew=0.0).item() == pytest.approx(kl_divergence(s, t).item(), rel=1e-12)
    assert skew_kl_divergence(s, t, skew=1.0).item() == pytest.approx(0.0, abs=1e-14)
    assert skew_reverse_kl_divergence(s, t, skew=0.0).item() == pytest.approx(
        reverse_kl_divergence(s, t).item(), rel=1e-12
    )
    assert skew_reverse_kl_divergence(s, t, skew=1.0).item() == pytest.approx(0.0, abs=1e-14)


def test_high_temperature_limit_is_logit_matching():
    s, t = _rand((3, 8), seed=9), _rand((3, 8), seed=10)
    tau = 1e3
    kd = kl_divergence(s, t, temperature=tau).item()
    sc, tc = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    limit = ((sc - tc) ** 2).sum(-1).mean().item() / (2 * s.shape[-1])
    assert kd == pytest.approx(limit, rel=1e-3)
    assert logit_mse(s, t, center=True).item() == pytest.approx(2 * limit, rel=1e-12)


def test_t2_scaling_is_present():
    s, t = _rand(seed=11), _rand(seed=12)
    raw = kl_divergence(s, t, temperature=3.0, t2_scale=False).item()
    assert kl_divergence(s, t, temperature=3.0).item() == pytest.approx(9 * raw, rel=1e-12)


def test_gradient_sums_to_zero_and_points_to_teacher():
    s = _rand((4, 10), seed=13).requires_grad_()
    t = _rand((4, 10), seed=14)
    kl_divergence(s, t, temperature=2.0).backward()
    assert s.grad.sum(-1).abs().max().item() < 1e-12
    # dL/ds = T (q - p) / N for T^2-scaled KL at temperature T
    q, p = torch.softmax(s.detach() / 2, -1), torch.softmax(t / 2, -1)
    assert torch.allclose(s.grad, 2 * (q - p) / 4, atol=1e-12)


@pytest.mark.parametrize("fn", DIVERGENCES + [soft_cross_entropy])
def test_masking_ignores_padding_and_ignored_labels(fn):
    s, t = _rand((2, 6, 9), seed=15), _rand((2, 6, 9), seed=16)
    labels = torch.randint(0, 9, (2, 6))
    labels[0, 4:] = -100
    base = fn(s, t, labels=labels)
    # Changing ignored positions changes nothing.
    s2, t2 = s.clone(), t.clone()
    s2[0, 4:] += torch.randn(2, 9, dtype=torch.float64) * 10
    t2[0, 4:] -= 3
    assert fn(s2, t2, labels=labels).item() == pytest.approx(base.item(), rel=1e-12)
    # Appending fully ignored rows changes nothing (normalisation by valid tokens).
    s3 = torch.cat([s, _rand((2, 3, 9), seed=17)], 1)
    t3 = torch.cat([t, _rand((2, 3, 9), seed=18)], 1)
    l3 = torch.cat([labels, torch.full((2, 3), -100)], 1)
    assert fn(s3, t3, labels=l3).item() == pytest.approx(base.item(), rel=1e-12)
    # A boolean mask is equivalent to labels with ignore_index.
    assert fn(s, t, mask=labels != -100).item() == pytest.approx(base.item(), rel=1e-12)


def test_reduction_modes_and_num_items_in_batch():
    s, t = _rand((2, 5, 7), seed=19), _rand((2, 5, 7), seed=20)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3:] = -100
    none = kl_divergence(s, t, labels=labels, reduction="none")
    assert none.shape == (2, 5) and (none[1, 3:] == 0).all()
    total = kl_divergence(s, t, labels=labels, reduction="sum")
    assert total.item() == pytest.approx(none.sum().item(), rel=1e-12)
    assert kl_divergence(s, t, labels=labels).item() == pytest.approx(total.item() / 8, rel=1e-12)
    # Gradient accumulation: two halves normalised by the global count sum to the full-batch mean.
    halves = sum(
        kl_divergence(s[i : i + 1], t[i : i + 1], labels=labels[i : i + 1], num_items_in_batch=8) for i in range(2)
    )
    assert halves.item() == pytest.approx(kl_divergence(s, t, labels=labels).item(), rel=1e-12)


@pytest.mark.parametrize("fn", [kl_divergence, reverse_kl_divergence, generalized_jsd, total_variation_distance])
def test_topk_covering_vocab_equals_dense(fn):
    s, t = _rand((2, 3, 6), seed=21), _rand((2, 3, 6), seed=22)
    lp = torch.log_softmax(t, -1)
    vals, idx = lp.topk(6, dim=-1)
    dense = fn(s, t)
    assert fn(s, teacher_topk=(idx, vals)).item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-8)


def test_topk_tail_bucket_is_lower_bound_and_renormalize_option():
    s, t = _rand((4, 20), seed=23), _rand((4, 20), seed=24)
    vals, idx = torch.log_softmax(t, -1).topk(5, dim=-1)
    dense = kl_divergence(s, t).item()
    bucket = kl_divergence(s, teacher_topk=(idx, vals)).item()
    assert 0 <= bucket <= dense + 1e-12
    renorm = kl_divergence(s, teacher_topk=(idx, vals), topk_tail="renormalize").item()
    p = torch.softmax(vals, -1)
    q = torch.softmax(torch.log_softmax(s, -1).gather(-1, idx), -1)
    assert renorm == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-9)


def test_topk_bad_inputs():
    s = _rand((2, 6), seed=25)
    idx = torch.tensor([[0, 7], [1, 2]])
    with pytest.raises(ValueError, match="indices must lie in"):
        kl_divergence(s, teacher_topk=(idx, torch.log(torch.full((2, 2), 0.3, dtype=torch.float64))))
    with pytest.raises(ValueError, match="sum to more than 1"):
        kl_divergence(s, teacher_topk=(torch.tensor([[0, 1], [1, 2]]), torch.zeros(2, 2, dtype=torch.float64)))


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="differ in shape"):
        kl_divergence(_rand((2, 5)), _rand((2, 6)))
    with pytest.raises(ValueError, match="labels has shape"):
        kl_divergence(_rand((2, 5, 4)), _rand((2, 5, 4)), labels=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(_rand((2, 5)), _rand((2, 5)), temperature=0)


def test_fp32_matches_fp64_reference():
    s, t = _rand((3, 4, 50), seed=26), _rand((3, 4, 50), seed=27)
    for fn in DIVERGENCES:
        ref = fn(s, t, temperature=2.0).item()
        assert fn(s.float(), t.float(), temperature=2.0).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    bf = kl_divergence(s.bfloat16(), t.bfloat16(), temperature=2.0)
    assert bf.dtype == torch.float32 and torch.isfinite(bf)


# ---------------------------------------------------------------- feature / embedding / attention losses
def test_hidden_losses_with_projector_and_width_error():
    s, t = _rand((2, 5, 4), seed=28), _rand((2, 5, 6), seed=29)
    with pytest.raises(ValueError, match="widths differ"):
        hidden_mse(s, t)
    mod = get_loss("hidden_mse", student_dim=4, teacher_dim=6)
    assert mod.projector is not None
    out = mod(s.float(), t.float(), mask=torch.ones(2, 5))
    assert out.requires_grad and out.item() > 0
    with pytest.raises(ValueError, match="projector=False"):
        get_loss("hidden_mse", student_dim=4, teacher_dim=6, projector=False)
    x = _rand((2, 5, 6), seed=30)
    assert hidden_mse(x, x.clone()).item() == 0
    assert hidden_cosine(x, 3 * x).item() == pytest.approx(0.0, abs=1e-12)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y = x.clone()
    y[0, 3:] += 100  # padded positions are ignored
    assert hidden_mse(x, y, mask=m).item() == pytest.approx(0.0, abs=1e-12)


def test_embedding_and_affinity_losses():
    a, b = _rand((6, 8), seed=31), _rand((6, 8), seed=32)
    assert embedding_mse(a, a.clone()).item() == 0
    assert embedding_cosine(a, 2 * a).item() == pytest.approx(0.0, abs=1e-12)
    assert affinity_kl(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert affinity_mse(a, 5 * a).item() == pytest.approx(0.0, abs=1e-10)
    # width-free: a student of another width with the same geometry has zero affinity loss
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    wide = torch.cat([a @ q, torch.zeros(6, 4, dtype=torch.float64)], -1)
    assert affinity_kl(wide, a).item() == pytest.approx(0.0, abs=1e-5)
    assert affinity_kl(a, b).item() > 0
    with pytest.raises(ValueError, match="at least 2"):
        affinity_kl(a[:1], b[:1])


def test_attention_kl():
    g = torch.Generator().manual_seed(0)
    att = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    assert attention_kl(att, att.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    assert attention_kl(other, att).item() > 0
    with pytest.raises(ValueError, match="head_reduction"):
        attention_kl(other[:, :2], att)
    assert attention_kl(other[:, :2], att, head_reduction="mean").item() >= 0


def test_attention_mse_hand_computed_zero_at_identity_and_masked():
    g = torch.Generator().manual_seed(1)
    att = torch.softmax(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), -1)
    other = torch.softmax(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), -1)
    assert attention_mse(att, att.clone()).item() == 0
    assert attention_mse(other, att).item() == pytest.approx(((other - att) ** 2).mean().item(), rel=1e-12)
    # sample 1 has one padded token: its row 3 and column 3 leave the mean, whatever they hold
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    moved = other.clone()
    moved[1, :, 3, :] += 5.0
    moved[1, :, :, 3] -= 5.0
    expected = torch.cat(
        [((other[0] - att[0]) ** 2).reshape(-1), ((other[1, :, :3, :3] - att[1, :, :3, :3]) ** 2).reshape(-1)]
    )
    got = attention_mse(moved, att, attention_mask=mask)
    assert got.item() == pytest.approx(expected.mean().item(), rel=1e-12)
    assert attention_mse(moved, att, attention_mask=mask, reduction="sum").item() == pytest.approx(
        expected.sum().item(), rel=1e-12
    )
    per_row = attention_mse(moved, att, attention_mask=mask, reduction="none")
    assert per_row.shape == (2, 3, 4) and per_row[1, :, 3].abs().max().item() == 0
    assert get_loss("attention_mse")(moved, att, attention_mask=mask).item() == pytest.approx(got.item(), rel=1e-12)
    with pytest.raises(ValueError, match="head_reduction"):
        attention_mse(other[:, :2], att)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        attention_mse(other, att, attention_mask=mask[:, :3])


# ---------------------------------------------------------------- registry and module forms
MODULE_CASES = [
    ("kl", {"temperature": 2.0}, kl_divergence),
    ("reverse_kl", {"temperature": 2.0}, reverse_kl_divergence),
    ("jsd", {"beta": 0.3, "temperature": 2.0}, generalized_jsd),
    ("skew_kl", {"skew": 0.2}, skew_kl_divergence),
    ("skew_reverse_kl", {"skew": 0.2}, skew_reverse_kl_divergence),
    ("tvd", {}, total_variation_distance),
    ("soft_ce", {"temperature": 2.0}, soft_cross_entropy),
]


@pytest.mark.parametrize("name,kw,fn", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_form_equals_function(name, kw, fn):
    s, t = _rand(seed=33), _rand(seed=34)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 2] = -100
    assert get_loss(name, **kw)(s, t, labels=labels).item() == pytest.approx(
        fn(s, t, labels=labels, **kw).item(), rel=1e-12
    )
    assert get_loss_function(name) is fn


def test_registry_lookup_and_errors():
    names = list_losses()
    for n in (
        "kl",
        "reverse_kl",
        "jsd",
        "skew_kl",
        "skew_reverse_kl",
        "tvd",
        "dkd",
        "logit_mse",
        "hidden_mse",
        "hidden_cosine",
        "attention_kl",
        "embedding_mse",
        "affinity_kl",
    ):
        assert n in names
    assert "kl" in list_losses("logits") and "hidden_mse" not in list_losses("logits")
    assert type(get_loss("FKL")).__name__ == "KLDivergenceLoss"
    with pytest.raises(KeyError, match="Did you mean 'jsd'"):
        get_loss("jsdd")
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        get_loss("kl", betta=0.1)

    @register_loss("test_only_loss", kind="logits")
    class _L(torch.nn.Module):
        """A test loss."""

        def forward(self, s, t=None, **_):
            return (s - t).abs().mean()

    assert "test_only_loss" in list_losses("logits")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("kl", kind="logits")(type("Other", (torch.nn.Module,), {}))


def test_dkd_module_refuses_topk_and_missing_labels():
    s, t = _rand((3, 5)), _rand((3, 5), seed=1)
    with pytest.raises(ValueError, match="labels"):
        get_loss("dkd")(s, t)
    with pytest.raises(ValueError, match="dense teacher logits"):
        get_loss("dkd")(s, teacher_topk=(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1)))


def test_log_values_are_finite_with_extreme_logits():
    s = torch.tensor([[1e4, -1e4, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    for fn in DIVERGENCES:
        v = fn(s, t)
        assert math.isfinite(v.item())


def test_ofa_registered_in_the_loss_library_without_vision():
    """ "ofa" lives next to dkd: importing kd_plugins.losses registers it, without importing kd_plugins.vision."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from kd_plugins.losses import get_loss, list_losses, ofa_loss; "
        "assert 'ofa' in list_losses('logits') and type(get_loss('ofa_kd')).__name__ == 'OFALoss'; "
        "s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]); "
        "ref = -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean(); "
        "torch.testing.assert_close(ofa_loss(s, t, labels=y, eps=1.0), ref); "
        "assert 'kd_plugins.vision' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
