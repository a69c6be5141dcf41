"""WAD: weight-aware distillation under class distribution mismatch.

Du et al., "Semi-Supervised Learning via Weight-aware Distillation under Class Distribution Mismatch" (ICCV 2023).
A few labelled instances cover ``C`` known classes; the unlabelled pool also holds instances of unknown classes. A
frozen teacher trained contrastively (SimCLR) embeds everything; each unlabelled instance gets a pseudo-label and a
weight in ``[0, 1]`` from pointwise mutual information (PMI) in that representation space, and the student is
trained on ``mean_i(w_i * loss_i)``, so unknown-class instances (weight ~0) do not invade the classifier.

The estimate (the paper gives the idea, not these details; choices below are ours and are tested):

* A contrastive (InfoNCE) critic approximates a density ratio: ``exp(cos(z_x, z_y) / tau) ~ p(x, y) / (p(x) p(y))``
  for L2-normalised teacher features ``z``. So, with ``L_c`` the labelled instances of class ``c`` and ``R`` a
  reference pool drawn from *all* instances (labelled and unlabelled, the instance itself left out)::

      PMI(x, c) = log p(x | c) / p(x)
                = log mean_{j in L_c} exp(cos(z_x, z_j) / tau) - log mean_{j in R} exp(cos(z_x, z_j) / tau)

  The marginal over the whole mismatched pool is what filters unknown classes: an unknown-class instance is most
  similar to its own (unlabelled) cluster, so ``p(x)`` dwarfs every ``p(x | c)`` and all its PMIs are negative; a
  known-class instance has ``PMI(x, c*) ~ log(1 / share of c* in the pool) > 0``. As ``tau -> 0`` the class term
  is the nearest labelled neighbour's similarity, the rule of the authors' code.
* Pseudo-label ``argmax_c PMI(x, c)``. Weight, with ``r_c = exp(PMI(x, c))`` and ``r_1 >= r_2`` the two largest::

      w = (r_1 - r_2) / (1 + r_1) = sigmoid(PMI_1) * (1 - exp(PMI_2 - PMI_1))

  The second factor is the authors' margin weight ``s_1 (1 - s_2 / s_1)`` in ratio space (ambiguous between two
  known classes -> 0); the first is ~1 when ``x`` is more likely under its class than under the pool and ~0 when it
  is not (unknown class). Both lie in ``[0, 1]``, so ``w`` does.
* ``tau`` defaults to 0.1; the teacher's own contrastive temperature is the principled value when known. ``R`` is
  at most ``max_reference`` instances drawn with a fixed seed (memory ``chunk_size x max_reference``).
* The authors also re-label the most reliable instances and repeat (``split`` rounds, ``alpha = 0.1``); that loop
  is the caller's (call :func:`wad_weights` again with the grown labelled set).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..losses._common import IGNORE_INDEX, REDUCTIONS, compute_dtype, valid_mask
from ..losses.weighted import weighted_distillation_loss

__all__ = ["WADWeights", "wad_weights", "wad_loss"]


class WADWeights(NamedTuple):
    """Per unlabelled instance: ``weights`` ``[U]`` in ``[0, 1]``, ``pseudo_labels`` ``[U]`` (long) and ``pmi``
    ``[U, C]`` (nats; ``softmax(pmi)`` is ``p(c | x)`` under a uniform class prior, a soft target)."""

    weights: torch.Tensor
    pseudo_labels: torch.Tensor
    pmi: torch.Tensor

    def select(self, index: torch.Tensor) -> WADWeights:
        """The rows ``index`` (a batch's dataset indices) of every field."""
        return WADWeights(self.weights[index], self.pseudo_labels[index], self.pmi[index])

    def kept(self, threshold: float = 0.5) -> torch.Tensor:
        """Bool ``[U]``: instances whose weight is at least ``threshold`` (the rest are filtered as unknown or
        ambiguous)."""
        return self.weights >= threshold


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a [N, D] tensor of teacher features, got {shape}; flatten or pool first.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf; check the teacher forward (dtype overflow?) before WAD.")
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return F.normalize(x, dim=-1)


def _check(u: torch.Tensor, lab: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int >= 2 (WAD weighs the best class against the second), got {num_classes!r}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; 0.1 or the teacher's contrastive temperature")
    if lab.shape[0] == 0:
        raise ValueError("teacher_features_labelled is empty; WAD needs labelled instances of every known class.")
    if u.shape[0] == 0:
        raise ValueError("teacher_features_unlabelled is empty; pass at least one unlabelled instance.")
    if u.shape[1] != lab.shape[1]:
        raise ValueError(
            f"feature sizes differ: unlabelled {tuple(u.shape)} vs labelled {tuple(lab.shape)}; "
            "embed both sets with the same teacher layer."
        )
    if labels.dim() != 1 or labels.shape[0] != lab.shape[0]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but there are {lab.shape[0]} labelled instances; "
            "pass one class index per labelled row."
        )
    if labels.dtype.is_floating_point or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be integer class indices in [0, {num_classes}); got values outside that range.")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(
            f"classes {missing} have no labelled instance, so their PMI is undefined; "
            "add labelled examples of them or lower num_classes."
        )


def _reference(u: torch.Tensor, lab: torch.Tensor, max_reference: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The marginal's reference pool (features, index into ``cat(labelled, unlabelled)``)."""
    pool = torch.cat([lab, u])
    if pool.shape[0] <= max_reference:
        return pool, torch.arange(pool.shape[0], device=pool.device)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(pool.shape[0], generator=gen)[:max_reference].sort().values.to(pool.device)
    return pool[idx], idx


def _log_mean_exp(scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``log mean_j exp(scores[:, j])`` over the columns ``keep`` (all when None)."""
    if keep is None:
        return torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])
    masked = scores.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(masked, dim=1) - keep.sum(dim=1).clamp_min(1).to(scores.dtype).log()


def _pmi_rows(
    u_rows: torch.Tensor, offset: int, lab: torch.Tensor, labels: torch.Tensor, num_classes: int, ref, ref_idx, tau
) -> torch.Tensor:
    """PMI ``[n, C]`` of the unlabelled rows ``offset .. offset + n`` (the module docstring's formula)."""
    class_scores = u_rows @ lab.T / tau
    per_class = [_log_mean_exp(class_scores[:, labels == c]) for c in range(num_classes)]
    self_pool_index = lab.shape[0] + offset + torch.arange(u_rows.shape[0], device=u_rows.device)
    keep = ref_idx[None, :] != self_pool_index[:, None]  # an instance is not its own reference
    marginal = _log_mean_exp(u_rows @ ref.T / tau, keep)
    return torch.stack(per_class, dim=1) - marginal[:, None]


def wad_weights(
    teacher_features_unlabelled: torch.Tensor,
    teacher_features_labelled: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    temperature: float = 0.1,
    max_reference: int = 8192,
    chunk_size: int = 1024,
    seed: int = 0,
) -> WADWeights:
    """WAD weights and pseudo-labels of unlabelled instances from a frozen teacher's features.

    Args:
        teacher_features_unlabelled: ``[U, D]`` teacher features (any scale; L2-normalised here) of the unlabelled
            pool, known and unknown classes mixed.
        teacher_features_labelled: ``[L, D]`` features of the labelled instances.
        labels: ``[L]`` class indices in ``[0, num_classes)``; every class needs at least one instance.
        num_classes: number of known classes (>= 2).
        temperature: ``tau`` of the density-ratio critic ``exp(cos / tau)``.
        max_reference: size cap of the marginal's reference pool (drawn with ``seed`` when the pool is larger).
        chunk_size: unlabelled rows scored at a time (memory ``chunk_size x max(L, max_reference)``).

    Returns:
        :class:`WADWeights` (``weights``, ``pseudo_labels``, ``pmi``), on the features' device. See the module
        docstring for the formulas.
    """
    u = _features(teacher_features_unlabelled, "teacher_features_unlabelled")
    lab = _features(teacher_features_labelled, "teacher_features_labelled")
    labels = torch.as_tensor(labels, device=lab.device)
    _check(u, lab, labels, num_classes, temperature)
    lab, labels = lab.to(u.device), labels.to(u.device)
    ref, ref_idx = _reference(u, lab, max_reference, seed)
    pmi = torch.cat(
        [
            _pmi_rows(u[a : a + chunk_size], a, lab, labels, num_classes, ref, ref_idx, temperature)
            for a in range(0, u.shape[0], chunk_size)
        ]
    )
    top2 = pmi.topk(2, dim=1).values
    weights = torch.sigmoid(top2[:, 0]) * (1 - torch.exp(top2[:, 1] - top2[:, 0]))
    return WADWeights(weights.clamp(0, 1), pmi.argmax(dim=1), pmi)


def wad_loss(
    student_logits: torch.Tensor,
    wad: WADWeights,
    *,
    target: str = "hard",
    loss: str = "kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The student's WAD loss on a batch of unlabelled instances: ``reduce(w_i * loss_i)``.

    Args:
        student_logits: ``[B, C]`` over the known classes.
        wad: the batch's rows of :func:`wad_weights` (``wad.select(batch_indices)``).
        target: ``"hard"``: cross-entropy to ``pseudo_labels`` (the paper's form); ``"soft"``: the registered logit
            loss ``loss`` (``kl``, ``soft_ce``, ...) to ``softmax(pmi / temperature)``.
        mask: ``[B]`` bool, rows to keep (e.g. padding of a last batch).
        reduction: ``"mean"`` over kept rows (zero-weight rows count, as in the reference ``mean(w * ce)``),
            ``"sum"`` or ``"none"``.
    """
    if student_logits.dim() != 2 or student_logits.shape[1] != wad.pmi.shape[1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but WAD scored {wad.pmi.shape[1]} known classes; "
            "the student head must cover exactly the labelled classes, one row per instance."
        )
    if student_logits.shape[0] != wad.weights.shape[0]:
        raise ValueError(
            f"{student_logits.shape[0]} student rows but {wad.weights.shape[0]} WAD rows; "
            "pass wad.select(batch_indices)."
        )
    if target == "soft":
        teacher = wad.pmi.to(student_logits.device)
        return weighted_distillation_loss(
            student_logits,
            teacher,
            wad.weights,
            loss=loss,
            mask=mask,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            temperature=temperature,
        )
    if target != "hard":
        raise ValueError(f"target must be 'hard' (pseudo-label cross-entropy) or 'soft' (KD to PMI), got {target!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    valid = valid_mask(student_logits.shape[:1], mask=mask, device=student_logits.device)
    targets = wad.pseudo_labels.to(student_logits.device).masked_fill(~valid, IGNORE_INDEX)
    per_row = F.cross_entropy(
        student_logits.to(compute_dtype(student_logits)), targets, reduction="none", ignore_index=IGNORE_INDEX
    )
    weighted = per_row * wad.weights.detach().to(per_row.device, per_row.dtype)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else max(int(valid.sum()), 1)
    return weighted.sum() / denominator
