"""Shared base of the timm tasks that train one model in place (``ACMTask``, ``MultiExitTask``).

Those tasks compute their outputs with something other than ``model.forward`` (``forward_intermediates`` for the
exits, a recording forward for the ACM gates). DDP only synchronises gradients of a forward that runs through the
DDP wrapper, so :meth:`ModelTask.prepare_distributed` wraps a :class:`ModelForward` (the model plus that function)
instead of the bare model: the model's own parameters are all-reduced, the teacher stays outside DDP and the
optimizer, and ``timm.utils.unwrap_model`` / ``kd_plugins``' ``unwrap_model`` still reach the plain model, so
checkpoints keep the plain ``state_dict``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.nn as nn
from timm.task import TrainingTask
from timm.task.classification import resolve_classification_loss

__all__ = ["ModelForward", "ModelTask"]


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
        teacher: optional frozen teacher. It is held in a list: not a sub-module, so it never enters the task's
            ``state_dict``, the optimizer (``get_trainable_module()``) or DDP.
    """

    #: keyword arguments for ``DistributedDataParallel`` that the subclass needs (overridable per call)
    ddp_defaults: dict[str, Any] = {}

    def __init__(self, model: nn.Module, forward_fn: Callable[..., Any], criterion: Optional[Callable] = None,
                 criterion_kwargs: Optional[dict] = None, teacher: Optional[nn.Module] = None,
                 device=None, dtype=None, verbose: bool = False):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = model
        self._forward_fn = forward_fn
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        self._teacher = [teacher] if teacher is not None else []
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ModelTask":
        super().train(mode)
        if self.teacher is not None:  # not a sub-module, so re-assert eval mode here
            self.teacher.eval()
        return self

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0] if self._teacher else None

    @property
    def model(self) -> nn.Module:
        """The plain model (without the DDP / forward wrappers)."""
        from ...distill.engine import unwrap_model

        return unwrap_model(self.trainable_module)

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
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

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "ModelTask":
        """Wrap the model (with its loss forward) in DDP; the teacher stays outside."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if type(self.trainable_module).__name__ == "DistributedDataParallel":
            return self
        kwargs = {**self.ddp_defaults, **ddp_kwargs}
        self.trainable_module = DDP(ModelForward(self.model, self._forward_fn), device_ids=device_ids, **kwargs)
        return self
