"""Multi-exit training for timm: ``MultiExitTask``, a ``timm.task.TrainingTask``.

::

    import timm
    from kd_plugins.multiexit import add_exits, MultiExitConfig
    from kd_plugins.multiexit.timm_task import MultiExitTask
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

from typing import Any, Callable

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss

from .core import exit_outputs, get_exits
from .loss import MultiExitConfig, multi_exit_loss

__all__ = ["MultiExitTask", "timm_multi_exit_loss"]


def timm_multi_exit_loss(model: nn.Module, images: torch.Tensor, target: torch.Tensor, criterion: Callable,
                         config: MultiExitConfig | None = None, teacher: nn.Module | None = None) -> dict[str, Any]:
    """The multi-exit loss of a timm model with exits, as a dict like a timm task's result.

    Returns ``loss``, ``output`` (deepest exit logits), ``exit_outputs`` (``layer -> logits``) and the detached
    per-exit terms (``exit{k}_task`` / ``exit{k}_self_kd`` / ``exit{k}_teacher_kd`` as tensors).
    """
    ex = get_exits(model)
    outs = exit_outputs(model, images)
    task = {k: criterion(v, target) for k, v in outs.items()}
    t_logits = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(images)
    res = multi_exit_loss(outs, ex.num_layers, config, kind="logits", task_losses=task, teacher=t_logits)
    out = {"loss": res.loss, "output": outs[ex.deepest], "exit_outputs": outs}
    out.update({k: torch.tensor(v) for k, v in res.terms.items() if k != "multi_exit_loss"})
    return out


class MultiExitTask(TrainingTask):
    """timm training task for a model with exits (see :func:`~kd_plugins.multiexit.add_exits`).

    Args:
        model: a timm ViT or ResNet with exits.
        criterion: task loss; created by ``create_classification_loss(**criterion_kwargs)`` when ``None``.
        criterion_kwargs: e.g. ``dict(smoothing=0.1)``.
        config: :class:`~kd_plugins.multiexit.MultiExitConfig`.
        teacher: optional frozen external teacher (kept out of the trainable module and the state dict).

    The exits are computed through ``forward_intermediates``, not the module's ``forward``, so this task does not
    wrap the model in DDP (``prepare_distributed`` is the base class no-op): single-process training.
    """

    def __init__(self, model: nn.Module, criterion: Callable | None = None, criterion_kwargs: dict | None = None,
                 config: MultiExitConfig | None = None, teacher: nn.Module | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, verbose: bool = False):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        get_exits(model)
        self.trainable_module = model
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self.config = config or MultiExitConfig()
        self._teacher = [teacher] if teacher is not None else []  # a list: not a sub-module, not in state_dict
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        from ..distill.engine import unwrap_model

        model = unwrap_model(self.trainable_module)
        return timm_multi_exit_loss(model, input, target, self.criterion, self.config, self.teacher)
