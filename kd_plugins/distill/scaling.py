"""``LossScaling``: how a distillation term is normalised to match the task loss it is added to.

A Hugging Face ``Trainer`` either normalises the task loss per micro-batch, or (models that accept
``num_items_in_batch``) sums it over tokens and divides by the number of label tokens in the *whole* accumulated
batch, without dividing by the gradient-accumulation steps afterwards. A distillation term must follow the same
rule, or gradient accumulation changes the objective. This object is that rule, written once; the adapters fill it
from their framework (``kd_plugins.integrations.hf`` reads the Trainer's state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossScaling"]


@dataclass(frozen=True)
class LossScaling:
    """Normalisation of one micro-batch's distillation terms.

    Attributes:
        by_items: the task loss is a token sum divided by ``num_items_in_batch`` (accumulated batch).
        num_items_in_batch: label tokens in the accumulated batch (with ``by_items``).
        items_scale: multiplier of item-normalised terms (the world size when tokens are averaged across devices).
        grad_accum_steps: micro-batches per optimizer step; mean-type terms are divided by it with ``by_items``
            (the Trainer does not divide such losses itself then).
    """

    by_items: bool = False
    num_items_in_batch: torch.Tensor | int | float | None = None
    items_scale: float = 1.0
    grad_accum_steps: int = 1

    @property
    def uses_items(self) -> bool:
        return self.by_items and self.num_items_in_batch is not None

    @property
    def mean_scale(self) -> float:
        """Factor applied to mean-type terms (embeddings, hidden states, attention, regularisers)."""
        return 1.0 / self.grad_accum_steps if self.by_items else 1.0

    def token_sum(self, summed: torch.Tensor, count: int) -> torch.Tensor:
        """A token-level term given as a sum over ``count`` valid tokens, normalised like the task loss."""
        if self.uses_items:
            return summed / self.num_items_in_batch * self.items_scale
        return summed / max(count, 1) * self.mean_scale

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A mean-type term normalised like the task loss."""
        return value * self.mean_scale

    def unscale_task_loss(self, value: float) -> float:
        """The Trainer's task loss of this micro-batch as a per-batch mean (for logs)."""
        return value * self.grad_accum_steps / self.items_scale if self.by_items else value
