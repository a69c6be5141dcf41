"""Stage 3 of ACM for timm: ``ACMTask``, a ``timm.task.TrainingTask`` (task loss + KD from the original + ACM
losses).

::

    from kd_plugins.acm import ACMConfig, acmize
    from kd_plugins.integrations.timm import ACMTask
    teacher = copy.deepcopy(model); acmize(model, "mlp")      # + stage1_distill / stage2_gates
    task = ACMTask(model, config=ACMConfig(budget=0.5), teacher=teacher)
    out = task(images, targets); out["loss"].backward()       # {'loss', 'output', 'acm_budget', ...}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...acm import ACMConfig, acm_blocks, acm_regularizers, distill_term, set_acm_mode, set_recording
from ...distill.teacher import Teacher
from .model_task import ModelTask, as_teacher

__all__ = ["ACMTask", "timm_acm_loss"]


def timm_acm_loss(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    criterion: Callable,
    config: ACMConfig | None = None,
    teacher: nn.Module | Teacher | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``task_weight * criterion + distill_weight * KL(teacher) + alpha_b L_b + alpha_e L_e + alpha_d L_d``.

    ``teacher`` (a module or a :class:`~kd_plugins.distill.teacher.Teacher`) runs frozen, in eval mode, without
    gradients. ``forward`` computes the logits (default ``model``; :class:`ACMTask` passes its DDP-aware forward).
    """
    cfg = config or ACMConfig()
    set_recording(model, True)
    try:
        logits = (forward or model)(images)
        reg = acm_regularizers(model, cfg.budget)
    finally:
        set_recording(model, False)
    task = criterion(logits, target)
    loss = cfg.task_weight * task + reg.total(cfg.alpha_budget, cfg.alpha_entropy, cfg.alpha_diversity)
    out = {
        "output": logits,
        "acm_task": task.detach(),
        "acm_budget": reg.budget.detach(),
        "acm_entropy": reg.entropy.detach(),
        "acm_diversity": reg.diversity.detach(),
        "acm_fraction": reg.fraction,
    }
    teacher = as_teacher(teacher)
    if teacher is not None and cfg.distill_weight:
        t_logits = teacher.run(lambda m: m(images))
        kd = distill_term(logits, t_logits, None, "kl")
        loss = loss + cfg.distill_weight * kd
        out["acm_distill"] = kd.detach()
    out["loss"] = loss
    return out


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


class ACMTask(ModelTask):
    """timm training task for an ACMized model (:func:`~kd_plugins.acm.acmize`).

    Args:
        model: an ACMized timm model.
        criterion: task loss; ``create_classification_loss(**criterion_kwargs)`` when ``None``.
        config: :class:`~kd_plugins.acm.ACMConfig` (budget, alphas, Gumbel temperature, distill weight).
        teacher: optional frozen original model (logit KD; kept out of the state dict, the optimizer and DDP).

    Under DDP (``task.prepare_distributed()``) the model is wrapped with ``find_unused_parameters=True``: a learner
    that no token of a rank's batch chose gets no gradient on that rank.
    """

    ddp_defaults = {"find_unused_parameters": True}

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable | None = None,
        criterion_kwargs: dict | None = None,
        config: ACMConfig | None = None,
        teacher: nn.Module | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = False,
    ):
        if not acm_blocks(model):
            raise ValueError("ACMTask needs an ACMized model: call kd_plugins.acm.acmize(model, ...) first")
        super().__init__(
            model,
            _logits,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            teacher=teacher,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        self.config = config or ACMConfig()
        set_acm_mode(
            model,
            "gated",
            gumbel_tau=self.config.gumbel_tau,
            gate_noise=self.config.gate_noise,
            straight_through=self.config.straight_through,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        return timm_acm_loss(
            self.model, input, target, self.criterion, self.config, self._teacher, forward=self.run_model
        )
