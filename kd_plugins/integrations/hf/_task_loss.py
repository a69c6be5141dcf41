"""The Trainer's task loss put on the scale its gradient-accumulation rule assumes.

transformers' ``Trainer`` passes ``num_items_in_batch`` (label tokens in the whole accumulated batch) to every model
whose ``forward`` takes ``**kwargs`` and then treats the returned loss as already normalised for gradient
accumulation: it no longer divides it by the accumulation steps. Many heads take ``**kwargs`` but still return their
micro-batch's mean (BERT's masked-LM, token and sequence classification heads in transformers 5), so under
``gradient_accumulation_steps=k`` their task loss weighs ``k`` times too much against the method's terms, which
kd_plugins normalises by ``num_items_in_batch`` as the Trainer's rule says.

:class:`TaskLossNormaliser` checks once, on the first micro-batch where the two readings differ (its label count is
not ``num_items_in_batch``), whether the returned loss is the micro-batch mean of the model's own loss recomputed from
its logits (cross-entropy over the labels the Trainer counts, or MSE for one regression output). If it is, every
later task loss ``mean`` becomes ``mean * label_count / num_items_in_batch`` (times the world size where the Trainer
averages tokens across devices): the token sum over the accumulated batch, as the rule assumes. When the loss can
not be recomputed (custom heads, ``compute_loss_func``, label smoothing) the Trainer's reading is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..._utils import unwrap_model
from ...distill.scaling import LossScaling
from ...losses._common import IGNORE_INDEX

logger = logging.getLogger(__name__)

__all__ = ["TaskLossNormaliser"]


class TaskLossNormaliser:
    """Rescales a per-micro-batch mean task loss to the token sum the Trainer's GA rule expects (see module doc)."""

    def __init__(self) -> None:
        #: ``True``: the model's loss honours ``num_items_in_batch``; ``False``: it is a micro-batch mean; ``None``:
        #: not decided yet.
        self.model_uses_items: bool | None = None

    def __call__(self, task: torch.Tensor, outputs, inputs: Mapping, scaling: LossScaling, trainer) -> torch.Tensor:
        """``task`` (the Trainer's ``compute_loss`` value for this micro-batch) on the Trainer's GA scale."""
        if task is None or not scaling.uses_items or self.model_uses_items is True:
            return task
        if getattr(trainer, "compute_loss_func", None) or getattr(trainer, "label_smoother", None):
            return task
        targets = _counted_targets(inputs, trainer)
        if targets is None:
            return task
        labels, shifted = targets
        if self.model_uses_items is None:
            if _label_count(labels) == float(scaling.num_items_in_batch):  # both readings agree here: decide later
                return task
            mean = _recomputed_mean(outputs, labels, shifted)
            if mean is None:
                self.model_uses_items = True
                return task
            per_batch_mean = float(task.detach()) / scaling.items_scale
            self.model_uses_items = not math.isclose(per_batch_mean, mean, rel_tol=1e-3, abs_tol=1e-7)
            if not self.model_uses_items:
                logger.info(
                    "%s returns its micro-batch mean loss although it accepts num_items_in_batch; kd_plugins rescales "
                    "it to the token sum over the accumulated batch the Trainer's gradient-accumulation rule assumes.",
                    type(unwrap_model(trainer.model)).__name__,
                )
        if self.model_uses_items is False:  # tensor arithmetic: no host sync per step once decided
            count = labels.ne(IGNORE_INDEX).sum().to(task.device, task.dtype)
            return task * count / scaling.num_items_in_batch
        return task


def _counted_targets(inputs: Mapping, trainer) -> tuple[torch.Tensor, bool] | None:
    """The labels the Trainer counted for ``num_items_in_batch`` and whether they are the causal shift."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"], False
    labels = inputs.get("labels")
    if not torch.is_tensor(labels):
        return None
    if getattr(trainer, "_loss_shifts_labels", False):
        return labels[..., 1:], True
    return labels, False


def _label_count(labels: torch.Tensor) -> int:
    return int(labels.ne(IGNORE_INDEX).sum())  # the Trainer's count (regression targets: every value)


def _recomputed_mean(outputs, labels: torch.Tensor, shifted: bool) -> float | None:
    """The micro-batch mean of the head's usual loss from its logits, or ``None`` where that is not known."""
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if not torch.is_tensor(logits):
        return None
    if shifted:
        logits = logits[..., :-1, :]
    with torch.no_grad():
        if labels.is_floating_point():
            if logits.shape[-1] != 1 or logits.numel() != labels.numel():
                return None
            return float(F.mse_loss(logits.float().flatten(), labels.float().flatten().to(logits.device)))
        if logits.shape[:-1] != labels.shape:
            return None
        flat = labels.flatten().to(logits.device)
        if not flat.ne(IGNORE_INDEX).any():
            return None
        return float(F.cross_entropy(logits.flatten(0, -2).float(), flat, ignore_index=IGNORE_INDEX))
