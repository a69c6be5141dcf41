"""Golden values and pinned design choices of the seed losses (SinKD, MI-alpha, DAC-KL, LELP, MDCS, TinyCLIP,
Hybrid Distill); definitions, choices and provenance in docs/losses.md (Seed losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_plugins.losses import (
    affinity_kl,
    attention_kl,
    dac_kl_loss,
    get_loss,
    hybrid_distill_loss,
    kl_divergence,
    lelp_loss,
    list_losses,
    mdcs_consistency_loss,
    mdcs_loss,
    mi_alpha_loss,
    sinkhorn_loss,
    tinyclip_affinity_loss,
)
from kd_plugins.losses.dac_kl import DACBoundsNet
from kd_plugins.losses.hybrid_distill import redundant_token_keep_mask, token_keep_schedule, token_relations
from kd_plugins.losses.lelp import fit_lelp_projection, lelp_teacher_log_probs, subclass_to_class_logits
from kd_plugins.losses.mdcs import mdcs_cs_weight, mdcs_logit_adjust

D = torch.float64
ZS = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], dtype=D)
ZT = torch.tensor([[2.0, 1.0, 0.1], [0.0, 2.0, 0.0]], dtype=D)


def _rand(shape, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_registered():
    names = set(list_losses())
    assert {"sinkhorn", "mi_alpha", "dac_kl", "lelp", "mdcs", "tinyclip_affinity", "hybrid_distill"} <= names


# ---------------------------------------------------------------- SinKD


def test_sinkhorn_golden():
    assert sinkhorn_loss(ZS, ZT).item() == pytest.approx(0.929523, rel=1e-6)
    assert sinkhorn_loss(ZT, ZT).item() == pytest.approx(0.0035160, rel=1e-4)  # entropic OT is not 0 at identity
    assert get_loss("sinkhorn")(ZS, ZT).item() == pytest.approx(0.929523, rel=1e-6)


def test_sinkhorn_properties():
    s, t = _rand((5, 7), 1) * 2, _rand((5, 7), 2) * 2
    base = sinkhorn_loss(s, t)
    assert base.item() >= 0
    assert sinkhorn_loss(s + _rand((5, 1), 3), t - 4).item() == pytest.approx(base.item(), rel=1e-10)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert sinkhorn_loss(s[perm], t[perm]).item() == pytest.approx(base.item(), rel=1e-10)
    # LM-shaped input: per-position vocab softmax; ignored positions drop out
    s3, t3 = _rand((2, 4, 9), 4), _rand((2, 4, 9), 5)
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, -100, 5]])
    keep = labels.reshape(-1) != -100
    assert sinkhorn_loss(s3, t3, labels=labels).item() == pytest.approx(
        sinkhorn_loss(s3.reshape(-1, 9)[keep], t3.reshape(-1, 9)[keep]).item(), rel=1e-12
    )
    # tiny epsilon stays finite (log-domain iterations)
    assert torch.isfinite(sinkhorn_loss(s, t, epsilon=1e-4))
    x = s.clone().requires_grad_()
    sinkhorn_loss(x, t).backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- MI-alpha


def _mi_reference(s, t, alpha, tau, log_q=0.0):
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    n = s.shape[0]
    total_pos, total_neg = 0.0, 0.0
    for j in range(n):
        m = sum(math.exp((s[k] @ t[j]).item() / tau) for k in range(n)) / n
        d = alpha * m + (1 - alpha) * math.exp(log_q)
        total_pos += (s[j] @ t[j]).item() / tau - math.log(d)
        total_neg += sum(math.exp((s[k] @ t[j]).item() / tau) / d for k in range(n) if k != j)
    return -(1 + total_pos / n - total_neg / (n * (n - 1)))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_mi_alpha_matches_reference(alpha):
    s, t = _rand((5, 6), 6), _rand((5, 6), 7)
    assert mi_alpha_loss(s, t, alpha=alpha, temperature=0.5).item() == pytest.approx(
        _mi_reference(s, t, alpha, 0.5), rel=1e-10
    )


def test_mi_alpha_aligned_features_have_higher_bound():
    t = _rand((8, 6), 8)
    aligned = mi_alpha_loss(t + 0.01 * _rand((8, 6), 9), t)
    shuffled = mi_alpha_loss(t[torch.randperm(8, generator=torch.Generator().manual_seed(0))], t)
    assert aligned < shuffled
    mod = get_loss("mi_alpha", student_dim=4, teacher_dim=6)
    hs = _rand((2, 5, 4), 10, torch.float32)
    out = mod(hs, _rand((2, 5, 6), 11, torch.float32), mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]))
    out.backward()
    assert mod.projector.proj.weight.grad is not None and mod.log_baseline.grad is not None
    with pytest.raises(ValueError, match="at least 2"):
        mi_alpha_loss(_rand((1, 3)), _rand((1, 3)))


# ---------------------------------------------------------------- DAC-KL


def test_dac_kl_full_band_is_forward_kl_and_zero_at_identity():
    s, t = _rand((4, 10), 12) * 2, _rand((4, 10), 13) * 2
    assert dac_kl_loss(s, t, upper=1.0, lower=0.0, sharpness=0).item() == pytest.approx(
        kl_divergence(s, t).item(), rel=1e-10
    )
    assert dac_kl_loss(s, s.clone(), upper=0.5, lower=0.1).item() == pytest.approx(0.0, abs=1e-12)


def test_dac_kl_band_rule():
    t = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=D))
    s = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=D))
    # upper=0.7: tokens with mass-before < 0.7 kept -> {0, 1} ; lower=0.2 drops p < 0.1 -> token 3 (and 2 via upper)
    out = dac_kl_loss(s, t, upper=0.7, lower=0.2, sharpness=0, keep_labels=False)
    p = torch.tensor([0.5, 0.3]) / 0.8
    q = torch.tensor([0.1, 0.2]) / 0.3
    assert out.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    # the label token is always kept when keep_labels
    out_l = dac_kl_loss(s, t, upper=0.7, lower=0.2, sharpness=0, labels=torch.tensor([3]))
    p = torch.tensor([0.5, 0.3, 0.05]) / 0.85
    q = torch.tensor([0.1, 0.2, 0.4]) / 0.7
    assert out_l.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    # the argmax token is kept even with an empty band
    assert dac_kl_loss(s, t, upper=0.0, lower=1.0, sharpness=0).item() == pytest.approx(0.0, abs=1e-12)


def test_dac_kl_bounds_net_is_trained_end_to_end():
    mod = get_loss("dac_kl", top_k=8)
    s, t = _rand((6, 12), 14, torch.float32).requires_grad_(), _rand((6, 12), 15, torch.float32)
    out = mod(s, t, labels=torch.arange(6))
    out.backward()
    assert s.grad is not None and mod.bounds_net.net[2].weight.grad.abs().sum() > 0  # last layer starts at 0
    u, l = DACBoundsNet(top_k=4)(torch.softmax(t, -1))
    assert ((u > 0.9) & (u < 1)).all() and ((l > 0) & (l < 0.05)).all()
    with pytest.raises(ValueError, match="either bounds_net"):
        dac_kl_loss(s, t, bounds_net=mod.bounds_net, upper=0.5)


# ---------------------------------------------------------------- LELP


def _lelp_setup(num_subclasses):
    g = torch.Generator().manual_seed(16)
    emb = torch.randn(40, 8, generator=g, dtype=D)
    labels = torch.arange(40) % 2
    head = torch.randn(2, 8, generator=g, dtype=D)
    proj = fit_lelp_projection(emb, labels, head, num_subclasses, seed=0)
    return emb, labels, head, proj


def test_lelp_projection_properties():
    emb, labels, head, proj = _lelp_setup(3)
    assert proj.directions.shape == (2, 3, 8)
    # directions lie in the null space of the teacher head (orthogonal to its rows)
    assert (proj.directions @ head.T).abs().max().item() < 1e-10
    logits = emb @ head.T
    log_p = lelp_teacher_log_probs(emb, logits, proj, subclass_temperature=0.7)
    # subclass probabilities sum to the teacher class marginal
    marg = log_p.exp().reshape(40, 2, 3).sum(-1)
    assert torch.allclose(marg, torch.softmax(logits, -1), atol=1e-12)
    # coordinates are standardised per class and direction on that class's examples
    z = proj.coordinates(emb[labels == 0])[:, 0]
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(3, dtype=D), atol=1e-8)
    # the student's class prediction is the logsumexp over its subclasses
    st = _rand((40, 6), 17)
    assert torch.allclose(
        torch.softmax(subclass_to_class_logits(st, 3), -1), torch.softmax(st, -1).reshape(40, 2, 3).sum(-1), atol=1e-12
    )


def test_lelp_with_one_subclass_is_vanilla_kd():
    emb, labels, head, proj = _lelp_setup(1)
    s, t = _rand((40, 2), 18), emb @ head.T
    assert lelp_loss(s, emb, t, proj, temperature=2.0).item() == pytest.approx(
        kl_divergence(s, t, temperature=2.0).item(), rel=1e-10
    )
    mod = get_loss("lelp", projection=proj, alpha=0.5)
    expected = 0.5 * kl_divergence(s, t).item() + 0.5 * F.cross_entropy(s, labels).item()
    assert mod(s, t, teacher_emb=emb, labels=labels).item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="num_classes \\* num_subclasses"):
        lelp_loss(_rand((40, 5)), emb, t, proj)
    with pytest.raises(ValueError, match="null-space"):
        fit_lelp_projection(emb, labels, head, 7)


# ---------------------------------------------------------------- MDCS


def test_mdcs_consistency():
    weak = _rand((1, 6, 5), 19).repeat(3, 1, 1) + 1e-3 * _rand((3, 6, 5), 37)  # experts agree on the argmax
    labels = weak[0].argmax(-1).clone()
    labels[:2] = (labels[:2] + 1) % 5  # two instances the first expert's weak view gets wrong
    assert mdcs_consistency_loss(weak, weak.clone(), labels).item() == pytest.approx(0.0, abs=1e-12)
    strong = _rand((3, 6, 5), 20)
    # confident-instance sampling: misclassified weak-view instances do not contribute
    out = mdcs_consistency_loss(weak, strong, labels)
    strong2 = strong.clone()
    strong2[0, :2] += 10 * _rand((2, 5), 21)
    wrong_in_all = (weak.argmax(-1) != labels).all(0)
    assert wrong_in_all[:2].all()
    assert mdcs_consistency_loss(weak, strong2, labels).item() == pytest.approx(out.item(), rel=1e-12)
    # value: per expert, KL averaged over its confident instances, summed over experts
    ref = 0.0
    for e in range(3):
        sel = weak[e].argmax(-1) == labels
        if sel.any():
            ref += kl_divergence(strong[e][sel], weak[e][sel]).item()
    assert out.item() == pytest.approx(ref, rel=1e-12)
    # the weak view is a stop-gradient teacher
    w = weak.clone().requires_grad_()
    mdcs_consistency_loss(w, strong.clone().requires_grad_(), confident_only=False).backward()
    assert w.grad is None or w.grad.abs().sum() == 0


def test_mdcs_full_loss_and_schedule():
    weak, strong = _rand((3, 8, 4), 22), _rand((3, 8, 4), 23)
    y = torch.arange(8) % 4
    counts = torch.tensor([100.0, 30.0, 10.0, 3.0], dtype=D)
    total, ce, cs = mdcs_loss(weak, strong, y, class_counts=counts, return_parts=True)
    ref_ce = sum(
        F.cross_entropy(
            torch.cat([mdcs_logit_adjust(weak[e], counts, lam), mdcs_logit_adjust(strong[e], counts, lam)]),
            torch.cat([y, y]),
        )
        for e, lam in enumerate((-0.5, 1.0, 2.5))
    )
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-12)
    assert total.item() == pytest.approx(ce.item() + 0.6 * cs.item(), rel=1e-12)
    # count vs frequency normalisation gives the same loss (log-scale absorbed by softmax)
    assert mdcs_loss(weak, strong, y, class_counts=counts / counts.sum()).item() == pytest.approx(
        total.item(), rel=1e-10
    )
    assert mdcs_cs_weight(0) == 0.0 and mdcs_cs_weight(10) == pytest.approx(0.3) and mdcs_cs_weight(50) == 0.6
    mod = get_loss("mdcs", class_counts=counts.tolist())
    assert mod(weak.float(), strong.float(), labels=y).item() == pytest.approx(total.item(), rel=1e-5)


# ---------------------------------------------------------------- TinyCLIP


def _repo_tinyclip(si, st, ti, tt, scale=50.0):
    si, st, ti, tt = (F.normalize(x, dim=-1) for x in (si, st, ti, tt))

    def ce(s_logits, t_logits):
        return -(torch.softmax(t_logits, -1) * torch.log_softmax(s_logits, -1)).sum(-1).mean()

    return 0.5 * ce(scale * si @ st.T, scale * ti @ tt.T) + 0.5 * ce(scale * st @ si.T, scale * tt @ ti.T)


def test_tinyclip_matches_repo_formula_and_reuses_affinity_kl():
    si, st, ti, tt = (_rand((6, 5), k) for k in (24, 25, 26, 27))
    # teacher wider than the student is fine (similarities are width-free)
    ti, tt = torch.cat([ti, _rand((6, 3), 28)], -1), torch.cat([tt, _rand((6, 3), 29)], -1)
    repo = _repo_tinyclip(si, st, ti, tt)
    assert tinyclip_affinity_loss(si, st, ti, tt, include_teacher_entropy=True).item() == pytest.approx(
        repo.item(), rel=1e-10
    )
    kl = tinyclip_affinity_loss(si, st, ti, tt)
    tau = 1 / 50
    ref = 0.5 * (
        affinity_kl(si, ti, student_keys=st, teacher_keys=tt, temperature=tau)
        + affinity_kl(st, tt, student_keys=si, teacher_keys=ti, temperature=tau)
    )
    assert kl.item() == pytest.approx(ref.item(), rel=1e-12)
    assert tinyclip_affinity_loss(ti, tt, ti, tt).item() == pytest.approx(0.0, abs=1e-10)
    assert get_loss("tinyclip")(si, st, ti, tt).item() == pytest.approx(kl.item(), rel=1e-12)


# ---------------------------------------------------------------- Hybrid Distill


def test_hybrid_distill():
    q, k = _rand((2, 2, 5, 4), 30, torch.float32), _rand((2, 2, 5, 4), 31, torch.float32)
    rel = token_relations(q, k)
    assert torch.allclose(rel.sum(-1), torch.ones(2, 2, 5))
    t_rel = token_relations(_rand((2, 4, 5, 4), 32, torch.float32), _rand((2, 4, 5, 4), 33, torch.float32))
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sf, tf = _rand((2, 5, 6), 34, torch.float32), _rand((2, 5, 6), 35, torch.float32)
    total, r, f = hybrid_distill_loss([rel, rel], [t_rel, t_rel], sf, tf, attention_mask=am, return_parts=True)
    ref_r = attention_kl(rel, t_rel, attention_mask=am, head_reduction="mean")
    assert r.item() == pytest.approx(ref_r.item(), rel=1e-6)
    keep = am.bool()
    assert f.item() == pytest.approx(F.smooth_l1_loss(sf[keep], tf[keep]).item(), rel=1e-6)
    assert total.item() == pytest.approx(r.item() + f.item(), rel=1e-6)
    assert hybrid_distill_loss([t_rel], [t_rel]).item() == pytest.approx(0.0, abs=1e-6)
    mod = get_loss("hybrid_distill", student_dim=6, teacher_dim=8)
    out = mod([rel], [t_rel], sf, _rand((2, 5, 8), 36, torch.float32), attention_mask=am)
    out.backward()
    assert mod.projector.proj.weight.grad is not None


def test_redundant_token_masking():
    attn = torch.zeros(1, 1, 6, 6)
    attn[..., 3] = 0.6  # token 3 is heavily attended
    attn[..., 5] = 0.3
    attn[..., 1] = 0.1
    keep = redundant_token_keep_mask(attn, 0.5)
    assert keep.tolist() == [[True, False, False, True, False, True]]  # CLS + top-2 of 6 * 0.5 = 3
    keep = redundant_token_keep_mask(attn, 0.5, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert keep.tolist() == [[True, False, False, True, False, False]]
    assert token_keep_schedule(0, 100, 0.5) == 1.0 and token_keep_schedule(50, 100, 0.5) == 0.75
    assert token_keep_schedule(500, 100, 0.5) == 0.5


def test_bad_teacher_logits():
    t = ZT.clone()
    t[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        sinkhorn_loss(ZS, t)
    with pytest.raises(ValueError, match="NaN/inf"):
        dac_kl_loss(ZS, t)
    with pytest.raises(ValueError, match="same shape"):
        sinkhorn_loss(ZS, ZT[:, :2])
