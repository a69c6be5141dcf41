"""On-policy batches inside a ``transformers.Trainer`` step (``DistillationConfig.lmbda > 0``).

:func:`trainer_on_policy_inputs` feeds :class:`~kd_plugins.distill.onpolicy.OnPolicySampler` from the Trainer (global
step, seed, process rank, tokenizer) and fixes the loss normalisation of a generated micro-batch: the Trainer counted
``num_items_in_batch`` over the dataset's completions, which the generated ones replace. A generated micro-batch is
therefore normalised by its own label tokens, ``num_items_in_batch = n_generated * grad_accum_steps (* world size
when tokens are averaged across devices)``, so its loss is its per-token mean divided by the accumulation steps: with
``lmbda = 1`` every optimizer step averages the micro-batches' per-token means (and the processes', through DDP).
"""

from __future__ import annotations

from typing import Any

import torch

from ...distill.onpolicy import OnPolicySampler
from ...losses._common import IGNORE_INDEX

__all__ = ["trainer_on_policy_inputs"]


def trainer_on_policy_inputs(
    sampler: OnPolicySampler, trainer, model: torch.nn.Module, inputs: dict, num_items_in_batch, task: str | None
) -> tuple[dict, Any, dict[str, float]]:
    """``(inputs, num_items_in_batch, logs)`` for this training micro-batch: unchanged, or the on-policy batch with
    its own item count; ``logs`` holds ``on_policy_fraction`` (1 generated, 0 not) and ``generated_tokens``."""
    if task is not None and task != "causal_lm":
        raise ValueError(
            f"lmbda={sampler.config.lmbda} generates completions, which needs a causal-LM student; this student's "
            f"task is {task!r}. Set lmbda=0."
        )
    args = trainer.args
    new, logs = sampler(
        model,
        inputs,
        step=trainer.state.global_step,
        seed=args.seed,
        rank=args.process_index,
        tokenizer=getattr(trainer, "processing_class", None),
    )
    if new is inputs or num_items_in_batch is None:
        return new, num_items_in_batch, logs
    labels = new["labels"][..., 1:]  # the causal shift, as the Trainer counts them
    count = int((labels != IGNORE_INDEX).sum())
    ga = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
    world = args.world_size if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1 else 1
    items = max(count, 1) * ga * world
    if torch.is_tensor(num_items_in_batch):
        items = torch.tensor(items, dtype=num_items_in_batch.dtype, device=num_items_in_batch.device)
    return new, items, logs
