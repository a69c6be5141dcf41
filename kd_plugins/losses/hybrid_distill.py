"""Hybrid Distill (Shi et al., ICLR 2024, arXiv 2306.15876): relation + feature distillation from two teachers.

Two teachers: a masked-image-modelling teacher (MAE), whose token relations (attention maps) the student imitates
at intermediate layers (diversity, no attention collapse), and a supervised or contrastive teacher (DeiT or CLIP),
whose final feature map the student regresses (discrimination). The total is ``alpha * L_rel + beta * L_feat`` with
``alpha = beta = 1`` (reported by a secondary summary of the paper, not the paper itself). With progressive
redundant-token masking, tokens judged redundant from the teacher's attention are dropped at a rate that grows
during training (cheaper, and avoids local optima).

No official code is public (``OceansStill/Hybrid_distill`` is an unrelated project). Unverified: the layer set, the
relation and feature distances (here KL between attention maps and smooth-L1 on the final tokens, the likely forms)
and the masking criterion and schedule (here the attention a token receives, and a linear schedule).
Definitions, defaults and open questions: ``docs/losses.md`` (Hybrid Distill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import compute_dtype, reduce_rows, rows, valid_mask
from .feature import FeatureProjector, _project, attention_kl
from .registry import register_loss

__all__ = [
    "token_relations",
    "redundant_token_keep_mask",
    "token_keep_schedule",
    "hybrid_distill_loss",
    "HybridDistillLoss",
]


def token_relations(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Token relation maps ``softmax(q k^T / sqrt(d))`` for ``[B, H, T, d]`` queries/keys -> ``[B, H, T, T]``."""
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(
            f"q and k must both be [batch, heads, tokens, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def redundant_token_keep_mask(
    teacher_attn: torch.Tensor, keep_ratio: float, *, attention_mask=None, keep_first: bool = True
) -> torch.Tensor:
    """Progressive redundant-token masking: keep the ``keep_ratio`` most-attended tokens per sample ``[B, T]`` bool.

    Importance of token ``j`` = attention it receives, averaged over heads and (valid) query rows of the teacher's
    map ``[B, H, T, T]`` (choice; the paper's exact criterion is unverified). The first token (CLS) is always kept
    with ``keep_first``; padding is never kept.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    b, _, tq, tk = teacher_attn.shape
    am = (
        torch.ones(b, tk, dtype=torch.bool, device=teacher_attn.device)
        if attention_mask is None
        else attention_mask.bool().to(teacher_attn.device)
    )
    qw = am.to(teacher_attn.dtype)[:, None, :, None]
    imp = (teacher_attn * qw).sum((1, 2)) / (qw.sum((1, 2)) * teacher_attn.shape[1]).clamp_min(1)
    imp = torch.where(am, imp, torch.full_like(imp, float("-inf")))
    if keep_first:
        imp[:, 0] = float("inf")
    n_keep = torch.ceil(am.sum(-1).to(torch.float64) * keep_ratio).long().clamp_min(1)
    order = imp.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(tk, device=order.device).expand_as(order))
    return (rank < n_keep.unsqueeze(-1)) & am


def token_keep_schedule(step: int, total_steps: int, final_keep: float = 0.5) -> float:
    """Linearly decreasing keep ratio: 1 at step 0 to ``final_keep`` at ``total_steps`` (progressive masking)."""
    if total_steps <= 0:
        return final_keep
    return 1.0 - (1.0 - final_keep) * min(max(step, 0) / total_steps, 1.0)


def hybrid_distill_loss(
    student_relations: Sequence[torch.Tensor],
    teacher_relations: Sequence[torch.Tensor],
    student_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    projector=None,
    attention_mask=None,
    token_keep=None,
    head_reduction: str = "mean",
    return_parts: bool = False,
):
    """Hybrid Distill (Shi et al. ICLR 2024): ``alpha * L_rel + beta * L_feat`` (alpha = beta = 1, secondary source).

    * ``L_rel``: token-relation imitation of the MIM teacher (e.g. MAE): ``KL(R_T || R_S)`` per query row
      (:func:`~kd_plugins.losses.attention_kl`), averaged over the given layer pairs. Relations are attention maps
      ``[B, H, T, T]`` (:func:`token_relations` from q/k). The layer set is the caller's choice (unverified in the
      paper; a uniform student->teacher layer map is a sound default).
    * ``L_feat``: smooth-L1 between the student's (projected) final features and the discriminative teacher's
      (DeiT/CLIP) features ``[B, T, D]``, averaged over channels and tokens.
    * ``token_keep [B, T]`` (:func:`redundant_token_keep_mask`) removes masked redundant tokens from both terms.
    """
    if len(student_relations) != len(teacher_relations) or not student_relations:
        raise ValueError("pass the same (non-zero) number of student and teacher relation maps (one per layer pair)")
    keep = attention_mask.bool() if attention_mask is not None else None
    if token_keep is not None:
        keep = token_keep.bool() if keep is None else keep & token_keep.bool().to(keep.device)
    rel = sum(
        attention_kl(s, t, attention_mask=keep, head_reduction=head_reduction)
        for s, t in zip(student_relations, teacher_relations)
    ) / len(student_relations)
    feat = rel.new_zeros(())
    if beta and student_features is not None:
        if teacher_features is None:
            raise ValueError("student_features given without teacher_features")
        s = _project(student_features, teacher_features, projector)
        valid = valid_mask(s.shape[:-1], mask=keep, device=s.device)
        sr = rows(s, valid).to(compute_dtype(s))
        tr = rows(teacher_features, valid).to(sr.device, sr.dtype)
        feat = reduce_rows(F.smooth_l1_loss(sr, tr, reduction="none").mean(-1), valid).to(rel.dtype)
    total = alpha * rel + beta * feat
    return (total, rel, feat) if return_parts else total


@register_loss("hybrid_distill", kind="attention", function=hybrid_distill_loss, aliases=("hybrid",))
class HybridDistillLoss(nn.Module):
    """Hybrid Distill: token-relation imitation (MIM teacher) + feature regression (discriminative teacher)."""

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        head_reduction: str = "mean",
    ):
        super().__init__()
        self.alpha, self.beta, self.head_reduction = alpha, beta, head_reduction
        self.projector = (
            FeatureProjector(student_dim, teacher_dim)
            if student_dim and teacher_dim and student_dim != teacher_dim
            else None
        )

    def forward(
        self,
        student_relations,
        teacher_relations,
        student_features=None,
        teacher_features=None,
        *,
        attention_mask=None,
        token_keep=None,
        **_,
    ):
        return hybrid_distill_loss(
            student_relations,
            teacher_relations,
            student_features,
            teacher_features,
            alpha=self.alpha,
            beta=self.beta,
            projector=self.projector,
            attention_mask=attention_mask,
            token_keep=token_keep,
            head_reduction=self.head_reduction,
        )
