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


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
    return _reduce(per_row, reduction)


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


def pair_kl(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    teacher_anchor: torch.Tensor,
    teacher_positive: torch.Tensor,
    *,
    temperature: float = 0.05,
    teacher_temperature: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """In-batch score distillation: each anchor's softmax over the batch's positives, student toward teacher.

    ``loss_i = KL(softmax_j(cos(ta_i, tp_j) / tau_T) || softmax_j(cos(sa_i, sp_j) / tau))`` (nats, not scaled by
    ``tau^2``), the in-batch negatives distillation of dense retrievers (TAS-Balanced, Hofstätter et al. 2021): the
    student learns how much the teacher prefers each wrong document, not only which one is right. It is 0 when the
    student's scores equal the teacher's and invariant to a rescaling of either side's embeddings. Most informative
    when the batch holds hard negatives (:class:`kd_plugins.TopicAwareBatches`). ``teacher_temperature`` defaults
    to ``temperature``.
    """
    _check_pairs(anchor, positive)
    _check_pairs(teacher_anchor, teacher_positive)
    if teacher_anchor.shape[0] != anchor.shape[0]:
        raise ValueError(f"pair_kl: {anchor.shape[0]} student pairs but {teacher_anchor.shape[0]} teacher pairs")
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    if temperature <= 0 or tau_t <= 0:
        raise ValueError(f"pair_kl: temperatures must be > 0, got {temperature} and {tau_t}")
    s = F.normalize(anchor.float(), dim=-1) @ F.normalize(positive.float(), dim=-1).T / temperature
    t = F.normalize(teacher_anchor.float(), dim=-1) @ F.normalize(teacher_positive.float(), dim=-1).T / tau_t
    t_log = F.log_softmax(t.to(s.device), dim=-1)
    per_row = (t_log.exp() * (t_log - F.log_softmax(s, dim=-1))).sum(-1)
    return _reduce(per_row, reduction)


@register_loss("pair_kl", kind="pair", function=pair_kl, aliases=("inbatch_kl", "in_batch_kd"))
class PairKLLoss(nn.Module):
    """In-batch score distillation on (anchor, positive) pairs: the student's anchor -> positives softmax matches
    the teacher's (needs the teacher's pooled embeddings of both sides, live or from a ``TeacherCache``)."""

    def __init__(self, temperature: float = 0.05, teacher_temperature: float | None = None, reduction: str = "mean"):
        super().__init__()
        self.temperature, self.teacher_temperature, self.reduction = temperature, teacher_temperature, reduction

    def forward(self, anchor, positive, *, teacher_anchor=None, teacher_positive=None, **_):
        if teacher_anchor is None or teacher_positive is None:
            raise ValueError("pair_kl needs the teacher's anchor and positive embeddings (a teacher or TeacherCache)")
        return pair_kl(
            anchor,
            positive,
            teacher_anchor,
            teacher_positive,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            reduction=self.reduction,
        )
