"""Golden float64 values (docs/losses.md, Golden values and Ranking losses) and properties of the ranking
losses."""

import math

import pytest
import torch

from kd_plugins.losses import (
    cprd_loss,
    dear_loss,
    first_joint_loss,
    first_ranknet_loss,
    get_loss,
    get_loss_function,
    kl_divergence,
    lambdarank_loss,
    list_losses,
    listnet_loss,
    margin_mse_loss,
    pad_candidates,
    plackett_luce_loss,
    ranknet_loss,
    ranks_from_order,
    ranks_from_scores,
    soft_cross_entropy,
)

D = torch.float64
S = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
T = torch.tensor([[2.0, 1.0, 0.1]], dtype=D)
RANKING = ["first_ranknet", "margin_mse", "ranknet", "lambdarank", "listnet", "pld", "cprd", "dear"]


def _rand(shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * 2


def test_registered_as_ranking():
    assert set(RANKING) <= set(list_losses("ranking"))
    for name in RANKING:
        assert get_loss_function(name) is not None


# ---------------------------------------------------------------- FIRST


def test_first_golden():
    z = torch.tensor([[1.0, 0.5, 2.0]], dtype=D)  # A, B, C; target A > C > B
    ranks, mask = ranks_from_order([[0, 2, 1]], 3)
    assert ranks.tolist() == [[1, 3, 2]] and mask.all()
    assert first_ranknet_loss(z, ranks).item() == pytest.approx(0.198852, rel=1e-6)
    assert first_ranknet_loss(z, ranks, weighted=False).item() == pytest.approx(0.662917, rel=1e-6)
    assert (10 * first_ranknet_loss(z, ranks)).item() == pytest.approx(1.988519, rel=1e-6)
    assert get_loss("first_ranknet")(z, ranks).item() == pytest.approx(0.198852, rel=1e-6)


def test_first_properties():
    z = _rand((3, 5), 1).requires_grad_()
    ranks = ranks_from_scores(_rand((3, 5), 2))
    base = first_ranknet_loss(z, ranks)
    assert first_ranknet_loss(z + 4.2, ranks).item() == pytest.approx(base.item(), rel=1e-12)
    # increasing the margin of a correctly ordered pair decreases the loss
    z2 = torch.tensor([[2.0, 1.0, 0.0]], dtype=D)
    r = torch.tensor([[1, 2, 3]])
    bigger = z2.clone()
    bigger[0, 0] += 0.5
    assert first_ranknet_loss(bigger, r) < first_ranknet_loss(z2, r)
    # the weighting emphasises the top: gradient share on the top item is larger than unweighted
    zz = torch.zeros(1, 4, dtype=D, requires_grad=True)
    rr = torch.tensor([[1, 2, 3, 4]])
    first_ranknet_loss(zz, rr).backward()
    gw = zz.grad.clone()
    zz.grad = None
    first_ranknet_loss(zz, rr, weighted=False).backward()
    assert (gw[0, 0].abs() / gw.abs().sum()) > (zz.grad[0, 0].abs() / zz.grad.abs().sum())


def test_first_joint_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=D)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    z = torch.tensor([[1.0, 0.5, 2.0], [0.0, 1.0, 0.0]], dtype=D)
    ranks = torch.tensor([[1, 3, 2], [2, 1, 0]])
    mask = torch.tensor([[True] * 3, [True, True, False]])
    total, lm, rank = first_joint_loss(logits, labels, z, ranks, mask=mask, return_parts=True)
    ref_lm = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert lm.item() == pytest.approx(ref_lm.item(), rel=1e-12)
    assert rank.item() == pytest.approx(first_ranknet_loss(z, ranks, mask=mask).item(), rel=1e-12)
    assert total.item() == pytest.approx(lm.item() + 10 * rank.item(), rel=1e-12)


# ---------------------------------------------------------------- Margin-MSE


def test_margin_mse_golden_and_properties():
    s = torch.tensor([[2.0, 1.0]], dtype=D)
    t = torch.tensor([[5.0, 3.0]], dtype=D)
    assert margin_mse_loss(s, t).item() == pytest.approx(1.0, abs=1e-12)
    # per-model offsets do not matter; margins that match give 0 even with different scores
    assert margin_mse_loss(s + 10, t - 3).item() == pytest.approx(1.0, abs=1e-12)
    assert margin_mse_loss(torch.tensor([[7.0, 5.0]], dtype=D), t).item() == 0.0
    # swapping (pos, neg) in both models is symmetric
    assert margin_mse_loss(s.flip(-1), t.flip(-1)).item() == pytest.approx(1.0, abs=1e-12)
    # several negatives: mean over triples; positive index per query
    s3, t3 = _rand((3, 5), 3), _rand((3, 5), 4)
    pos = torch.tensor([0, 2, 4])
    ref = torch.stack(
        [((s3[i, pos[i]] - s3[i]) - (t3[i, pos[i]] - t3[i]))[torch.arange(5) != pos[i]].pow(2).mean() for i in range(3)]
    ).mean()
    assert margin_mse_loss(s3, t3, positive_index=pos).item() == pytest.approx(ref.item(), rel=1e-12)


# ---------------------------------------------------------------- RankNet / LambdaRank / ListNet


def test_ranknet_soft_minimised_at_teacher_differences():
    t = _rand((2, 5), 5)
    s = (t.clone() + 0.3).requires_grad_()  # s_i - s_j == t_i - t_j
    ranknet_loss(s, t).backward()
    assert s.grad.abs().max().item() < 1e-12
    assert ranknet_loss(s.detach() + 1.0, t).item() == pytest.approx(ranknet_loss(s.detach(), t).item(), rel=1e-12)


def test_ranknet_binary_and_lambdarank_values():
    # binary: pairs (0,1), (0,2), (1,2) by teacher order; student z = (1, 2, 3)
    expected = (math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0))) / 3
    assert ranknet_loss(S, T, target="binary").item() == pytest.approx(expected, rel=1e-12)
    # lambdarank = sum of |dNDCG|-weighted pair losses; matches a hand computation
    g = 1 / torch.log2(1 + torch.tensor([1.0, 2.0, 3.0], dtype=D))  # teacher gains (teacher order 0, 1, 2)
    disc = 1 / torch.log2(1 + torch.tensor([3.0, 2.0, 1.0], dtype=D))  # student ranks of 0, 1, 2
    idcg = (g * g).sum()
    ref = 0.0
    for i in range(3):
        for j in range(3):
            if g[i] > g[j]:
                w = abs((g[i] - g[j]) * (disc[i] - disc[j])) / idcg
                ref += w * math.log1p(math.exp(-(S[0, i] - S[0, j]).item()))
    assert lambdarank_loss(S, T).item() == pytest.approx(float(ref), rel=1e-12)
    # graded relevance variant: 2^rel - 1 gains; a perfectly ordered student has smaller loss than the reverse
    rel = torch.tensor([[2.0, 1.0, 0.0]], dtype=D)
    assert lambdarank_loss(T, T, relevance=rel) < lambdarank_loss(S, T, relevance=rel)


def test_listnet_golden_and_gradient_zero_at_identity():
    assert listnet_loss(S, T).item() == pytest.approx(1.968041, rel=1e-6)  # = soft CE fixture
    x = _rand((3, 7), 6).requires_grad_()
    listnet_loss(x, x.detach().clone(), temperature=2.0).backward()
    assert x.grad.abs().max().item() < 1e-12
    a, b = _rand((3, 7), 7), _rand((3, 7), 8)
    assert listnet_loss(a + 3, b - 1).item() == pytest.approx(listnet_loss(a, b).item(), rel=1e-12)
    assert listnet_loss(a, b).item() == pytest.approx(soft_cross_entropy(a, b, t2_scale=False).item(), rel=1e-12)


# ---------------------------------------------------------------- PLD


def test_pld_golden():
    assert plackett_luce_loss(S, T, labels=torch.tensor([0])).item() == pytest.approx(1.904993, rel=1e-6)
    assert plackett_luce_loss(S, T, labels=torch.tensor([2])).item() == pytest.approx(0.905617, rel=1e-6)
    assert get_loss("pld")(S, T, labels=torch.tensor([0])).item() == pytest.approx(1.904993, rel=1e-6)


def test_pld_reductions_and_invariances():
    s, t = _rand((4, 6), 9), _rand((4, 6), 10)
    y = torch.tensor([0, 3, 5, 1])
    base = plackett_luce_loss(s, t, labels=y)
    assert plackett_luce_loss(s + 7.0, t, labels=y).item() == pytest.approx(base.item(), rel=1e-12)
    # one-hot alpha (teacher temperature -> 0 with the label on top of the teacher) gives CE
    t_onehot = torch.full((1, 3), -1e3, dtype=D)
    t_onehot[0, 2] = 0.0
    assert plackett_luce_loss(S, t_onehot, labels=torch.tensor([2])).item() == pytest.approx(0.407606, rel=1e-6)
    # uniform alpha (teacher temperature -> inf) gives ListMLE on the teacher order
    order = torch.argsort(t[0], descending=True)
    sp = s[0, order]
    listmle = sum((torch.logsumexp(sp[k:], 0) - sp[k]).item() for k in range(6)) / 6
    assert plackett_luce_loss(s[:1], t[:1], teacher_temperature=1e9).item() == pytest.approx(listmle, rel=1e-6)
    # consistent permutation of classes leaves it unchanged
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    inv = torch.argsort(perm)
    assert plackett_luce_loss(s[:, perm], t[:, perm], labels=inv[y]).item() == pytest.approx(base.item(), rel=1e-12)
    # ignore_index rows are skipped
    y2 = torch.tensor([0, -100, 5, 1])
    keep = torch.tensor([0, 2, 3])
    assert plackett_luce_loss(s, t, labels=y2).item() == pytest.approx(
        plackett_luce_loss(s[keep], t[keep], labels=y2[keep]).item(), rel=1e-12
    )


# ---------------------------------------------------------------- CPRD


def test_cprd_golden_and_properties():
    s = torch.tensor([[0.5, 0.7, 0.2, 0.1]], dtype=D)
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=D)  # already in teacher order
    assert cprd_loss(s, t, num_valid=3).item() == pytest.approx(2.702279, rel=1e-6)
    # the same list presented in another order (teacher order decides)
    perm = torch.tensor([2, 0, 3, 1])
    assert cprd_loss(s[:, perm], t[:, perm], num_valid=3).item() == pytest.approx(2.702279, rel=1e-6)
    # threshold criterion: teacher <= 1.5 is invalid -> J* = 3 as well
    assert cprd_loss(s, t, teacher_threshold=1.5).item() == pytest.approx(2.702279, rel=1e-6)
    # shift invariance; default (all anchors) = ListMLE sum on the teacher order
    assert cprd_loss(s + 2, t).item() == pytest.approx(cprd_loss(s, t).item(), rel=1e-12)
    full = sum((torch.logsumexp(s[0, k:], 0) - s[0, k]).item() for k in range(4))
    assert cprd_loss(s, t).item() == pytest.approx(full, rel=1e-12)
    # negatives beyond J* only appear in denominators: no gradient pushes them up
    x = s.clone().requires_grad_()
    cprd_loss(x, t, num_valid=1).backward()
    assert (x.grad[0, 1:] > 0).all() and x.grad[0, 0] < 0
    # temperature scales the similarities
    assert cprd_loss(s, t, temperature=0.5).item() == pytest.approx(cprd_loss(2 * s, t).item(), rel=1e-12)


# ---------------------------------------------------------------- DeAR


def test_dear_parts_and_properties():
    total, ce, rn, kl = dear_loss(S, T, return_parts=True)
    assert kl.item() == pytest.approx(1.231432, rel=1e-6)  # = Hinton KD at T=2 fixture
    assert ce.item() == pytest.approx(-torch.log_softmax(S, -1)[0, 0].item(), rel=1e-12)
    expected_rn = (math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.0))) / 2
    assert rn.item() == pytest.approx(expected_rn, rel=1e-12)
    assert total.item() == pytest.approx(0.7 * (0.5 * ce.item() + 0.5 * rn.item()) + 0.3 * kl.item(), rel=1e-12)
    x = _rand((3, 5), 11)
    _, _, _, kl0 = dear_loss(x, x.clone(), return_parts=True)
    assert kl0.item() == pytest.approx(0.0, abs=1e-12)
    assert dear_loss(x + 5, x - 2).item() == pytest.approx(dear_loss(x, x).item(), rel=1e-12)
    assert kl_divergence(x, x, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- masks and bad input


@pytest.mark.parametrize("name", ["margin_mse", "ranknet", "lambdarank", "listnet", "pld", "cprd", "dear"])
def test_padding_with_mask_is_neutral(name):
    fn = get_loss_function(name)
    s, t = _rand((3, 5), 12), _rand((3, 5), 13)
    pad_s = torch.cat([s, torch.full((3, 2), 99.0, dtype=D)], -1)
    pad_t = torch.cat([t, torch.full((3, 2), -42.0, dtype=D)], -1)
    mask = torch.cat([torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool)], -1)
    assert fn(pad_s, pad_t, mask=mask).item() == pytest.approx(fn(s, t).item(), rel=1e-10)


def test_unequal_lists_and_padding_helper():
    s_lists = [[1.0, 2.0, 3.0], [0.5, 0.1]]
    t_lists = [[2.0, 1.0, 0.1], [0.0, 2.0]]
    with pytest.raises(ValueError, match="unequal lengths.*mask"):
        listnet_loss(s_lists, t_lists)
    s, m = pad_candidates(s_lists, dtype=D)
    t, _ = pad_candidates(t_lists, dtype=D)
    per_query = listnet_loss(s, t, mask=m, reduction="none")
    assert per_query[0].item() == pytest.approx(1.968041, rel=1e-6)
    assert per_query[1].item() == pytest.approx(
        listnet_loss(torch.tensor([[0.5, 0.1]], dtype=D), torch.tensor([[0.0, 2.0]], dtype=D)).item(), rel=1e-12
    )
    # lists of unequal length are accepted together with a mask
    assert listnet_loss(s_lists, t_lists, mask=m).item() == pytest.approx(per_query.mean().item(), rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", RANKING[1:])
def test_non_finite_teacher_scores_raise(name, bad):
    s, t = _rand((2, 4), 14), _rand((2, 4), 15)
    t[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        get_loss_function(name)(s, t)
    # masked-out non-finite teacher scores are fine
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(get_loss_function(name)(s, t, mask=mask))


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        listnet_loss(_rand((2, 4)), _rand((2, 5)))
    with pytest.raises(ValueError, match="1-based"):
        first_ranknet_loss(_rand((1, 3)), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="target_ranks"):
        first_ranknet_loss(_rand((1, 3)), torch.tensor([[1.0, float("nan"), 2.0]]))
    with pytest.raises(ValueError, match="permutation|distinct"):
        ranks_from_order([[0, 0, 1]], 3)
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        get_loss("listnet", tau=2.0)
    with pytest.raises(ValueError, match="positive"):
        margin_mse_loss(_rand((1, 3)), _rand((1, 3)), mask=torch.tensor([[False, True, True]]))


def test_float32_and_gradients_flow():
    s = _rand((3, 6), 16).float().requires_grad_()
    t = _rand((3, 6), 17).float()
    for name in RANKING[1:]:
        s.grad = None
        out = get_loss_function(name)(s, t)
        assert out.dtype == torch.float32
        out.backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
