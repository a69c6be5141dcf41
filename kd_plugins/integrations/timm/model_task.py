"""Shared base of the timm tasks that train one model in place (``ACMTask``, ``MultiExitTask``).

Those tasks compute their outputs with something other than ``model.forward`` (``forward_intermediates`` for the
exits, a recording forward for the ACM gates). DDP only synchronises gradients of a forward that runs through the
DDP wrapper, so :meth:`ModelTask.prepare_distributed` wraps a :class:`ModelForward` (the model plus that function)
instead of the bare model: the model's own parameters are all-reduced, the teacher stays outside DDP and the
optimizer, and ``timm.utils.unwrap_model`` / ``kd_plugins``' ``unwrap_model`` still reach the plain model, so
checkpoints keep the plain ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss

from ..._utils import unwrap_model
from ...distill.teacher import Teacher

__all__ = ["ModelForward", "ModelTask", "as_teacher"]


def as_teacher(teacher: nn.Module | Teacher | None) -> Teacher | None:
    """``teacher`` as a :class:`Teacher` (frozen, run in eval mode without gradients); ``None`` stays ``None``."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    return Teacher(teacher)


class ModelForward(nn.Module):
    """``forward(*args)`` runs ``fn(module, *args)``. The model sits at ``.module``, like in DDP, so the usual
    ``unwrap_model`` helpers strip this wrapper and its ``state_dict`` keys never reach a checkpoint."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


class ModelTask(TrainingTask):
    """A ``TrainingTask`` that trains ``model`` in place, optionally against a frozen ``teacher``.

    Subclasses call :meth:`run_model` for the outputs the loss needs: it goes through DDP after
    :meth:`prepare_distributed`, and calls ``forward_fn(model, input)`` directly otherwise.

    Args:
        model: the model to train (``task.trainable_module``).
        forward_fn: ``(model, input) -> outputs``, the forward the loss is computed from.
        criterion / criterion_kwargs: task loss, ``create_classification_loss(**criterion_kwargs)`` when ``None``.
        teacher: optional frozen teacher. It is held in a :class:`~kd_plugins.distill.teacher.Teacher`, not as a
            sub-module, so it never enters the task's ``state_dict``, the optimizer (``get_trainable_module()``) or
            DDP; every teacher forward goes through that ``Teacher`` (eval mode, no gradients).
    """

    #: keyword arguments for ``DistributedDataParallel`` that the subclass needs (overridable per call)
    ddp_defaults: dict[str, Any] = {}

    def __init__(
        self,
        model: nn.Module,
        forward_fn: Callable[..., Any],
        criterion: Callable | None = None,
        criterion_kwargs: dict | None = None,
        teacher: nn.Module | None = None,
        device=None,
        dtype=None,
        verbose: bool = False,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = model
        self._forward_fn = forward_fn
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self._teacher = as_teacher(teacher)
        if self._teacher is not None:
            self._teacher.check_separate(model)

    def train(self, mode: bool = True) -> ModelTask:
        super().train(mode)
        if self.teacher is not None:  # not a sub-module, so re-assert eval mode here
            self.teacher.eval()
        return self

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher module (``None`` without a teacher)."""
        return self._teacher.module if self._teacher is not None else None

    @property
    def model(self) -> nn.Module:
        """The plain model (without the DDP / forward wrappers)."""
        return unwrap_model(self.trainable_module)

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The plain model (its ``forward`` gives the final logits), not the DDP-wrapped loss forward."""
        if module is None and not ema and not hasattr(self, "eval_model"):
            return self.model
        return super().get_eval_model(module, ema=ema)

    def run_model(self, input: Any) -> Any:
        """``forward_fn(model, input)``, through DDP when the task is distributed."""
        tm = self.trainable_module
        if type(tm).__name__ == "DistributedDataParallel":
            return tm(input)
        return self._forward_fn(self.model, input)

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> ModelTask:
        """Wrap the model (with its loss forward) in DDP; the teacher stays outside."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if type(self.trainable_module).__name__ == "DistributedDataParallel":
            return self
        kwargs = {**self.ddp_defaults, **ddp_kwargs}
        self.trainable_module = DDP(ModelForward(self.model, self._forward_fn), device_ids=device_ids, **kwargs)
        return self
