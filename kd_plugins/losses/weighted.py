"""Per-row weighting of any registered logit loss (instance-weighted distillation, e.g. WAD).

The engine's logit terms take no per-row weights, so a weighted loss is not a registry entry (a registered loss
that the engine called without weights would silently compute the unweighted objective). This helper is called
directly instead::

    loss = weighted_distillation_loss(student_logits, teacher_logits, row_weights, loss="kl", temperature=2.0)

It asks the registered loss for its per-row values (``reduction="none"``), multiplies them by ``row_weights`` and
reduces them. Rows the loss masks out (``labels == ignore_index``, ``mask == False``) contribute nothing and are not
counted.
"""

from __future__ import annotations

import torch

from ._common import IGNORE_INDEX, REDUCTIONS, reduce_rows, valid_mask
from .registry import get_loss_function, get_loss_spec

__all__ = ["weighted_distillation_loss"]


def _check_weights(row_weights: torch.Tensor, prefix: torch.Size) -> torch.Tensor:
    if not torch.is_tensor(row_weights):
        raise TypeError(f"row_weights must be a tensor with one weight per row, got {type(row_weights).__name__}")
    if tuple(row_weights.shape) != tuple(prefix):
        raise ValueError(
            f"row_weights has shape {tuple(row_weights.shape)} but the logits have rows of shape {tuple(prefix)}; "
            "pass one weight per row (the logits' shape without its last dimension)."
        )
    if not torch.isfinite(row_weights).all() or (row_weights < 0).any():
        raise ValueError("row_weights must be finite and >= 0; clamp or recompute the weights before the loss.")
    return row_weights


def weighted_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    loss: str = "kl",
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    **loss_kwargs,
) -> torch.Tensor:
    """``reduce(w_i * loss_i)`` over the valid rows ``i`` of the registered logit loss ``loss``.

    Args:
        student_logits, teacher_logits: ``[..., C]``, as for the registered loss.
        row_weights: ``[...]`` (one weight per row, >= 0); not differentiated through (detached), as in WAD where
            the weights come from a frozen teacher.
        loss: a registered loss of kind ``"logits"`` that accepts ``reduction="none"`` (``kl``, ``soft_ce``, ...).
        labels, mask, ignore_index: rows to leave out, as for the registered loss.
        reduction: ``"mean"`` divides the weighted sum by the number of valid rows (or ``num_items_in_batch``), not by
            the sum of the weights: a zero-weight row still counts in the denominator, as in the WAD reference
            (``mean(w * ce)``), so filtering an instance never inflates the others' gradients. ``"sum"`` or
            ``"none"`` (per-row weighted values, zeros at ignored rows).
        **loss_kwargs: hyper-parameters of the loss (``temperature``, ...).
    """
    spec = get_loss_spec(loss)
    if spec.kind != "logits":
        raise ValueError(
            f"weighted_distillation_loss needs a logit loss; {loss!r} is of kind {spec.kind!r}. "
            "Pick one of kd_plugins.losses.list_losses('logits')."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    prefix = student_logits.shape[:-1]
    weights = _check_weights(row_weights, prefix).detach()
    per_row = get_loss_function(loss)(
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        reduction="none",
        ignore_index=ignore_index,
        **loss_kwargs,
    )
    weighted = per_row * weights.to(per_row.device, per_row.dtype)
    if reduction == "none":
        return weighted
    valid = valid_mask(prefix, labels=labels, mask=mask, ignore_index=ignore_index, device=weighted.device)
    return reduce_rows(weighted[valid], valid, reduction=reduction, num_items_in_batch=num_items_in_batch)
