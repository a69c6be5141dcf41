"""WAD (weight-aware distillation under class distribution mismatch): PMI weights, pseudo-labels, weighted loss."""

import math

import pytest
import torch
import torch.nn.functional as F

import kd_plugins
from kd_plugins.distill.wad import WADWeights, wad_loss, wad_weights
from kd_plugins.losses import kl_divergence
from kd_plugins.losses.weighted import weighted_distillation_loss

torch.set_num_threads(1)

DIM, KNOWN, ALL_CLASSES, PER_LABELLED, PER_UNLABELLED = 32, 6, 10, 5, 40


def _clusters(noise: float = 0.5, seed: int = 0):
    """Ten separable clusters; classes 0-5 labelled (5 each), the unlabelled pool mixes all ten (40 each)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(DIM, ALL_CLASSES, generator=g))[0].T

    def sample(c, n):
        return centres[c] + noise * torch.randn(n, DIM, generator=g) / DIM**0.5

    labelled = torch.cat([sample(c, PER_LABELLED) for c in range(KNOWN)])
    labels = torch.arange(KNOWN).repeat_interleave(PER_LABELLED)
    unlabelled = torch.cat([sample(c, PER_UNLABELLED) for c in range(ALL_CLASSES)])
    true_class = torch.arange(ALL_CLASSES).repeat_interleave(PER_UNLABELLED)
    return unlabelled, labelled, labels, true_class, centres


def test_known_classes_outweigh_unknown_ones():
    u, lab, labels, true_class, _ = _clusters()
    w = wad_weights(u, lab, labels, KNOWN)
    known = true_class < KNOWN
    assert w.weights[known].mean() > 0.7
    assert w.weights[~known].mean() < 0.1
    assert w.weights[known].min() > w.weights[~known].max()
    assert w.kept(0.5).eq(known).all()


def test_pseudo_labels_match_known_clusters():
    u, lab, labels, true_class, _ = _clusters()
    w = wad_weights(u, lab, labels, KNOWN)
    known = true_class < KNOWN
    assert w.pseudo_labels.dtype == torch.long
    assert torch.equal(w.pseudo_labels[known], true_class[known])
    assert w.pmi.shape == (u.shape[0], KNOWN)


def test_pmi_of_known_instance_is_log_inverse_pool_share():
    # p(x) ~ share * p(x | c) for a well-separated known class, so PMI(x, c*) ~ log(pool size / class size)
    u, lab, labels, true_class, _ = _clusters(noise=0.3)
    w = wad_weights(u, lab, labels, KNOWN)
    known = true_class < KNOWN
    pool, in_class = u.shape[0] + lab.shape[0], PER_UNLABELLED + PER_LABELLED
    expected = math.log(pool / in_class)
    assert (w.pmi[known].max(dim=1).values - expected).abs().max() < 0.3
    assert (w.pmi[~known].max(dim=1).values < 0).all()  # unknown: less likely under any class than under the pool


@pytest.mark.parametrize("noise", [0.5, 1.0, 3.0])
def test_weights_lie_in_unit_interval(noise):
    u, lab, labels, _, _ = _clusters(noise=noise, seed=1)
    w = wad_weights(u, lab, labels, KNOWN)
    assert torch.isfinite(w.pmi).all()
    assert (w.weights >= 0).all() and (w.weights <= 1).all()


def test_instance_between_two_classes_gets_low_weight():
    u, lab, labels, _, centres = _clusters()
    between = (centres[0] + centres[1])[None] / 2
    w = wad_weights(torch.cat([between, u]), lab, labels, KNOWN)
    known = torch.cat([torch.tensor([False]), torch.arange(ALL_CLASSES).repeat_interleave(PER_UNLABELLED) < KNOWN])
    assert w.weights[0] < 0.6 and w.weights[0] < w.weights[known].min()  # the margin factor
    exact = wad_weights(torch.cat([between, u]), centres[:KNOWN], torch.arange(KNOWN), KNOWN)
    assert exact.weights[0] < 1e-4  # exactly equidistant from classes 0 and 1: no preference, no weight


def test_scale_chunking_and_device_choices_do_not_change_the_estimate():
    u, lab, labels, _, _ = _clusters()
    ref = wad_weights(u, lab, labels, KNOWN)
    scaled = wad_weights(7.0 * u, 0.5 * lab, labels, KNOWN, chunk_size=7)
    torch.testing.assert_close(scaled.pmi, ref.pmi, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled.weights, ref.weights, atol=1e-5, rtol=1e-4)


def test_subsampled_reference_pool_still_filters_unknown_classes():
    u, lab, labels, true_class, _ = _clusters()
    w = wad_weights(u, lab, labels, KNOWN, max_reference=150, seed=3)
    known = true_class < KNOWN
    assert w.weights[known].mean() > 0.6 and w.weights[~known].mean() < 0.15
    assert torch.equal(w.weights, wad_weights(u, lab, labels, KNOWN, max_reference=150, seed=3).weights)


def test_select_returns_batch_rows():
    u, lab, labels, _, _ = _clusters()
    w = wad_weights(u, lab, labels, KNOWN)
    idx = torch.tensor([3, 250, 7])
    sub = w.select(idx)
    assert isinstance(sub, WADWeights)
    assert torch.equal(sub.weights, w.weights[idx]) and torch.equal(sub.pmi, w.pmi[idx])


def _batch(b=6, c=KNOWN, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype)
    wad = WADWeights(
        torch.tensor([1.0, 0.0, 0.5, 0.0, 0.9, 0.2], dtype=dtype)[:b],
        torch.randint(0, c, (b,), generator=g),
        torch.randn(b, c, generator=g, dtype=dtype),
    )
    return logits, wad


def test_hard_loss_is_weighted_mean_of_pseudo_label_cross_entropy():
    logits, wad = _batch()
    expected = (wad.weights * F.cross_entropy(logits, wad.pseudo_labels, reduction="none")).mean()
    torch.testing.assert_close(wad_loss(logits, wad), expected)
    torch.testing.assert_close(wad_loss(logits, wad, reduction="sum"), expected * 6)


def test_soft_loss_is_weighted_per_row_kl_to_pmi():
    logits, wad = _batch()
    per_row = kl_divergence(logits, wad.pmi, temperature=2.0, reduction="none")
    got = wad_loss(logits, wad, target="soft", temperature=2.0)
    torch.testing.assert_close(got, (wad.weights * per_row).mean())


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_zero_weight_and_masked_rows_contribute_nothing(target):
    logits, wad = _batch()
    mask = torch.tensor([True, True, True, True, False, True])
    base = wad_loss(logits, wad, target=target, mask=mask)
    moved = logits.clone()
    moved[[1, 3, 4]] += 10 * torch.randn(3, KNOWN)  # rows 1, 3 have weight 0, row 4 is masked
    torch.testing.assert_close(wad_loss(moved, wad, target=target, mask=mask), base)
    per_row = wad_loss(logits, wad, target=target, mask=mask, reduction="none")
    assert per_row[[1, 3, 4]].eq(0).all()
    torch.testing.assert_close(base, per_row.sum() / 5)  # mean over the 5 kept rows, zero-weight ones included
    leaf = logits.clone().requires_grad_(True)
    wad_loss(leaf, wad, target=target, mask=mask).backward()
    assert leaf.grad[[1, 3, 4]].eq(0).all() and leaf.grad[0].abs().sum() > 0


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_gradcheck(target):
    logits, wad = _batch(dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: wad_loss(x, wad, target=target, temperature=1.5), (leaf,))


def test_weighted_loss_with_unit_weights_is_the_registered_loss():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = -100
    got = weighted_distillation_loss(s, t, torch.ones(2, 5), loss="kl", labels=labels, temperature=2.0)
    torch.testing.assert_close(got, kl_divergence(s, t, labels=labels, temperature=2.0))
    got = weighted_distillation_loss(s, t, torch.ones(2, 5), loss="kl", num_items_in_batch=20)
    torch.testing.assert_close(got, kl_divergence(s, t, num_items_in_batch=20))


def test_top_level_exports():
    assert kd_plugins.wad_weights is wad_weights and kd_plugins.wad_loss is wad_loss
    assert kd_plugins.weighted_distillation_loss is weighted_distillation_loss


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(u=torch.randn(4, 8)), "feature sizes differ.*same teacher layer"),
        (dict(labels=torch.tensor([0, 1])), "labels has shape.*one class index per labelled row"),
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(lab=torch.zeros(0, DIM), labels=torch.zeros(0, dtype=torch.long)), "labelled is empty"),
        (dict(u=torch.zeros(0, DIM)), "unlabelled is empty"),
        (dict(num_classes=7), r"classes \[6\] have no labelled instance.*lower num_classes"),
        (dict(labels=torch.full((30,), 9)), r"labels must be integer class indices in \[0, 6\)"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(u=torch.randn(3, 4, DIM)), r"must be a \[N, D\] tensor.*flatten or pool"),
        (dict(u=torch.full((3, DIM), float("nan"))), "NaN or inf"),
    ],
)
def test_bad_inputs_name_problem_and_fix(change, match):
    u, lab, labels, _, _ = _clusters()
    args = dict(u=u, lab=lab, labels=labels, num_classes=KNOWN, temperature=0.1) | change
    with pytest.raises(ValueError, match=match):
        wad_weights(args["u"], args["lab"], args["labels"], args["num_classes"], temperature=args["temperature"])


def test_bad_loss_inputs_name_problem_and_fix():
    logits, wad = _batch()
    with pytest.raises(ValueError, match="cover exactly the labelled classes"):
        wad_loss(logits[:, :4], wad)
    with pytest.raises(ValueError, match=r"pass wad.select\(batch_indices\)"):
        wad_loss(logits[:4], wad)
    with pytest.raises(ValueError, match="target must be 'hard'"):
        wad_loss(logits, wad, target="pseudo")
    with pytest.raises(ValueError, match="needs a logit loss.*list_losses"):
        weighted_distillation_loss(logits, wad.pmi, wad.weights, loss="hidden_mse")
    with pytest.raises(ValueError, match="one weight per row"):
        weighted_distillation_loss(logits, wad.pmi, wad.weights[:3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted_distillation_loss(logits, wad.pmi, -wad.weights)
