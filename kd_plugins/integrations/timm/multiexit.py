"""Multi-exit training for timm: ``MultiExitTask``, a ``timm.task.TrainingTask``.

::

    import timm
    from kd_plugins.multiexit import add_exits, MultiExitConfig
    from kd_plugins.integrations.timm import MultiExitTask
    model = timm.create_model("vit_small_patch16_224", num_classes=10)
    add_exits(model, layers=[4, 8, 12])
    task = MultiExitTask(model, config=MultiExitConfig(), teacher=None)
    result = task(images, targets)          # {'loss', 'output' (deepest exit), 'exit_outputs', 'exit4_task', ...}
    result["loss"].backward()

One forward pass through ``forward_intermediates`` gives every exit's logits; the loss is
:func:`~kd_plugins.multiexit.multi_exit_loss` with the task criterion (timm's ``create_classification_loss`` by
default; soft targets from mixup work) at every exit, logit KD from the deepest exit to the shallower ones and,
with a ``teacher`` (any frozen classifier over the same classes), from the teacher to every exit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...distill.teacher import Teacher
from ...multiexit import MultiExitConfig, exit_outputs, get_exits, multi_exit_loss
from .model_task import ModelTask, as_teacher

__all__ = ["MultiExitTask", "timm_multi_exit_loss"]


def timm_multi_exit_loss(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor,
    criterion: Callable,
    config: MultiExitConfig | None = None,
    teacher: nn.Module | Teacher | None = None,
    forward: Callable[[torch.Tensor], dict[int, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """The multi-exit loss of a timm model with exits, as a dict like a timm task's result.

    Returns ``loss``, ``output`` (deepest exit logits), ``exit_outputs`` (``layer -> logits``) and the detached
    per-exit terms (``exit{k}_task`` / ``exit{k}_self_kd`` / ``exit{k}_teacher_kd`` as tensors). ``teacher`` (a
    module or a :class:`~kd_plugins.distill.teacher.Teacher`) runs frozen, in eval mode, without gradients.
    ``forward`` computes ``{layer: logits}`` (default :func:`~kd_plugins.multiexit.exit_outputs`;
    :class:`MultiExitTask` passes its DDP-aware forward).
    """
    ex = get_exits(model)
    outs = forward(images) if forward is not None else exit_outputs(model, images)
    task = {k: criterion(v, target) for k, v in outs.items()}
    teacher = as_teacher(teacher)
    t_logits = teacher.run(lambda m: m(images)) if teacher is not None else None
    res = multi_exit_loss(outs, ex.num_layers, config, kind="logits", task_losses=task, teacher=t_logits)
    out = {"loss": res.loss, "output": outs[ex.deepest], "exit_outputs": outs}
    out.update({k: torch.tensor(v) for k, v in res.terms.items() if k != "multi_exit_loss"})
    return out


class MultiExitTask(ModelTask):
    """timm training task for a model with exits (see :func:`~kd_plugins.multiexit.add_exits`).

    Args:
        model: a timm ViT or ResNet with exits.
        criterion: task loss; created by ``create_classification_loss(**criterion_kwargs)`` when ``None``.
        criterion_kwargs: e.g. ``dict(smoothing=0.1)``.
        config: :class:`~kd_plugins.multiexit.MultiExitConfig`.
        teacher: optional frozen external teacher (kept out of the trainable module, the state dict and DDP).

    The exits are computed through ``forward_intermediates``, not the module's ``forward``; under DDP
    (``task.prepare_distributed()``) that computation runs inside the DDP wrapper, so every exit head's and layer's
    gradients are all-reduced.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable | None = None,
        criterion_kwargs: dict | None = None,
        config: MultiExitConfig | None = None,
        teacher: nn.Module | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = False,
    ):
        get_exits(model)
        super().__init__(
            model,
            exit_outputs,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            teacher=teacher,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        self.config = config or MultiExitConfig()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        return timm_multi_exit_loss(
            self.model, input, target, self.criterion, self.config, self._teacher, forward=self.run_model
        )
