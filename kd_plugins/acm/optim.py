"""Optimizer parameter groups for ACM stage 3: the gates get their own learning rate."""

from __future__ import annotations

import torch.nn as nn

from .modules import acm_blocks

__all__ = ["acm_param_groups"]


def acm_param_groups(model: nn.Module, lr: float, gate_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer parameter groups for stage 3: every trainable parameter except the gates at ``lr``, the gates
    of all ACM blocks at ``gate_lr`` (the gates are small and start from stage 2, so they usually take a larger
    rate, e.g. 1e-4 for the backbone and learners and 1e-3 for the gates).

    Only parameters with ``requires_grad`` are included; an empty group is left out. With a ``transformers.Trainer``
    (whose own optimizer has one learning rate) build the optimizer and its schedule yourself::

        opt = torch.optim.AdamW(acm_param_groups(model, lr=1e-4, gate_lr=1e-3))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / max_steps)
        Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched),
                callbacks=[ACMCallback(teacher, ACMConfig(budget=0.5))]).train()

    Args:
        model: an ACMized model (:func:`~kd_plugins.acm.acmize`).
        lr: learning rate of the backbone and the learners.
        gate_lr: learning rate of the gates.
        weight_decay: weight decay of both groups.

    Returns:
        ``[{"params": [...], "lr": lr, "weight_decay": ...}, {"params": [gates], "lr": gate_lr, ...}]``.
    """
    blocks = acm_blocks(model)
    if not blocks:
        raise ValueError("acm_param_groups needs an ACMized model: call kd_plugins.acm.acmize(model, ...) first")
    gate_params = [p for b in blocks.values() for p in b.gate.parameters() if p.requires_grad]
    gate_ids = {id(p) for p in gate_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    groups = [
        {"params": other, "lr": lr, "weight_decay": weight_decay},
        {"params": gate_params, "lr": gate_lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
