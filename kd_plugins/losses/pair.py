"""Losses on (anchor, positive) pairs of pooled embeddings: the retrieval task signal beside distillation.

A pair batch holds, per row ``i``, an anchor (a query, a title) and its positive (the matching document). These
losses take the student's pooled embeddings of both sides (``[B, D]`` each) and, optionally, the teacher's. They
are the ``pair`` kind of the registry: the distillation engine hands them
``(student_anchor, student_positive, teacher_anchor=..., teacher_positive=...)`` when the batch carries
``positive_*`` inputs (see :class:`kd_plugins.distill.pairs.PairCollator`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_loss


def _check_pairs(anchor: torch.Tensor, positive: torch.Tensor) -> None:
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(
            f"pair losses take [B, D] anchor and positive embeddings of one shape, got {tuple(anchor.shape)} and "
            f"{tuple(positive.shape)}"
        )
    if anchor.shape[0] < 2:
        raise ValueError("in-batch pair losses need at least 2 pairs per batch (the other rows are the negatives)")


def infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """In-batch InfoNCE on cosine similarities: anchor ``i`` must pick positive ``i`` among the batch's positives.

    ``loss_i = -log softmax_j(cos(a_i, p_j) / tau)[i]``, i.e. sentence-transformers'
    ``MultipleNegativesRankingLoss`` (its ``scale=20`` is ``tau=0.05``). ``symmetric=True`` averages it with the
    positive -> anchor direction (CLIP). Value at a perfect, confident encoder -> 0; for ``B`` identical embeddings
    it is ``log B``.
    """
    _check_pairs(anchor, positive)
    if temperature <= 0:
        raise ValueError(f"infonce: temperature must be > 0, got {temperature}")
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    logits = a @ p.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        per_row = 0.5 * (per_row + F.cross_entropy(logits.T, target, reduction="none"))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@register_loss("infonce", kind="pair", function=infonce, aliases=("mnrl", "multiple_negatives_ranking"))
class InfoNCELoss(nn.Module):
    """In-batch InfoNCE between the student's anchor and positive embeddings (the pairs' own task signal)."""

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, reduction: str = "mean"):
        super().__init__()
        self.temperature, self.symmetric, self.reduction = temperature, symmetric, reduction

    def forward(self, anchor, positive, *, teacher_anchor=None, teacher_positive=None, **_):
        return infonce(
            anchor, positive, temperature=self.temperature, symmetric=self.symmetric, reduction=self.reduction
        )
