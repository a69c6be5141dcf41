"""Prototype losses of ProC-KD ("Prototype-guided Cross-task Knowledge Distillation for Large-scale Models", 2022).

Both compare local feature rows ``[..., C]`` (one row per spatial position) through a bank of ``K`` unit-norm
prototypes ``P`` (``[K, C]``) learned from the teacher's local features. The soft assignment of a row ``x`` is

    a(x) = softmax_k( <x / ||x||, p_k> / tau )

* :func:`prototype_kl` - ``KL(a(t) || a(s))`` per row: the student's rows (already mapped to the teacher's width)
  must pick the same prototypes (local parts) as the teacher's rows at the same position. Zero when ``s = t``.
* :func:`prototype_mse` - ``|| s/||s|| - r(t)/||r(t)|| ||^2 = 2 - 2 cos(s, r(t))`` per row, with the teacher's
  prototype reconstruction ``r(t) = sum_k a_k(t) p_k``: the teacher feature with its part outside the prototypes'
  span (the task-specific residual) removed. Zero when ``s`` is a positive multiple of ``r(t)``.

Both are scale-free in ``s`` and ``t`` (the prototypes live on the unit sphere). Rows are reduced like the other
hidden-state losses (``mask``, ``reduction``, ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import compute_dtype, kl_rows, reduce_rows, rows, valid_mask
from .registry import register_loss

__all__ = ["prototype_log_assignments", "prototype_reconstruction", "prototype_kl", "prototype_mse"]


def _check(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, prototypes: torch.Tensor | None, name: str):
    if prototypes is None:
        raise ValueError(
            f"{name} needs prototypes= (a [K, C] tensor learned from the teacher's local features); it is computed "
            "by kd_plugins.vision.prockd.ProCKDTerms / ProCKDTask, not as a plain hidden-state loss term."
        )
    if prototypes.dim() != 2:
        raise ValueError(f"{name}: prototypes must be [K, C], got shape {tuple(prototypes.shape)}")
    for role, x in (("student", student_hidden), ("teacher", teacher_hidden)):
        if x.shape[-1] != prototypes.shape[-1]:
            raise ValueError(
                f"{name}: {role} rows have width {x.shape[-1]} but the prototypes have width {prototypes.shape[-1]}; "
                "project the student's features to the teacher's width first (ProCKDTerms does this)."
            )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"{name}: student rows {tuple(student_hidden.shape[:-1])} and teacher rows "
            f"{tuple(teacher_hidden.shape[:-1])} differ; resize the student map to the teacher's grid first."
        )


def prototype_log_assignments(x: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``log a(x)``: log-softmax over the prototypes of the cosine similarities ``<x/||x||, p_k> / tau``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(prototypes.to(x.dtype), dim=-1)
    return torch.log_softmax(F.normalize(x, dim=-1) @ p.T / temperature, dim=-1)


def prototype_reconstruction(x: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``r(x) = sum_k a_k(x) p_k``: ``x`` re-expressed as a soft mixture of the (unit-norm) prototypes."""
    p = F.normalize(prototypes.to(x.dtype), dim=-1)
    return prototype_log_assignments(x, p, temperature).exp() @ p


def _valid_rows(student_hidden, teacher_hidden, prototypes, mask, name: str):
    """The checked student and teacher rows at the valid positions (compute dtype) and the valid mask."""
    _check(student_hidden, teacher_hidden, prototypes, name)
    valid = valid_mask(student_hidden.shape[:-1], mask=mask, device=student_hidden.device)
    dtype = compute_dtype(student_hidden)
    s = rows(student_hidden, valid).to(dtype)
    return s, rows(teacher_hidden, valid).to(s.device, dtype), valid


def prototype_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    prototypes: torch.Tensor | None = None,
    temperature: float = 0.1,
    mask: torch.Tensor | None = None,
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``KL(a(teacher) || a(student))`` per row over the prototypes (see the module docstring)."""
    s, t, valid = _valid_rows(student_hidden, teacher_hidden, prototypes, mask, "prototype_kl")
    p = prototypes.to(s.device, s.dtype)
    per_row = kl_rows(prototype_log_assignments(t, p, temperature), prototype_log_assignments(s, p, temperature))
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def prototype_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    prototypes: torch.Tensor | None = None,
    temperature: float = 0.1,
    mask: torch.Tensor | None = None,
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``||s/||s|| - r(t)/||r(t)|| ||^2`` per row, ``r(t)`` the teacher's prototype reconstruction."""
    s, t, valid = _valid_rows(student_hidden, teacher_hidden, prototypes, mask, "prototype_mse")
    target = F.normalize(prototype_reconstruction(t, prototypes.to(s.device, s.dtype), temperature), dim=-1)
    per_row = (F.normalize(s, dim=-1) - target).pow(2).sum(-1)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


class _PrototypeLoss(nn.Module):
    _fn = staticmethod(prototype_kl)

    def __init__(self, temperature: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.reduction = float(temperature), reduction

    def forward(self, student_hidden, teacher_hidden, *, prototypes=None, mask=None, num_items_in_batch=None):
        return self._fn(
            student_hidden,
            teacher_hidden,
            prototypes=prototypes,
            temperature=self.temperature,
            mask=mask,
            num_items_in_batch=num_items_in_batch,
            reduction=self.reduction,
        )


@register_loss("prototype_kl", kind="hidden", function=prototype_kl)
class PrototypeKLLoss(_PrototypeLoss):
    """ProC-KD: KL between the teacher's and the student's soft assignments of local features to prototypes."""

    _fn = staticmethod(prototype_kl)


@register_loss("prototype_mse", kind="hidden", function=prototype_mse)
class PrototypeMSELoss(_PrototypeLoss):
    """ProC-KD: squared distance of unit student features to the teacher's unit prototype reconstruction."""

    _fn = staticmethod(prototype_mse)
