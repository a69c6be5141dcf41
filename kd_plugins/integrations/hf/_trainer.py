"""Trainer plumbing shared by kd_plugins' callbacks (distillation, ACM, multi-exit).

Trainer callbacks are not handed the trainer, so on its first event a callback finds the ``Trainer`` that is calling
it (a walk up the call stack) and wraps that instance's ``compute_loss`` and ``log`` (:func:`patch_trainer`). The
wrapped ``compute_loss`` runs the Trainer's own loss (labels, label smoothing, ``compute_loss_func`` unchanged) and
adds the method's terms, normalised like the task loss (:func:`trainer_loss_scaling`).
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ...distill.scaling import LossScaling
from ._task_loss import TaskLossNormaliser

__all__ = [
    "TrainerPluginCallback",
    "patch_trainer",
    "trainer_loss_scaling",
    "find_resume_dir",
    "model_inputs",
    "is_trl_sft_trainer",
]

#: Batch keys that are not model inputs (targets, Trainer plumbing).
_NON_MODEL_KEYS = ("labels", "num_items_in_batch", "return_loss")


def model_inputs(batch: Mapping[str, Any], drop: tuple[str, ...] = _NON_MODEL_KEYS) -> dict:
    """The batch without its targets and Trainer plumbing: what the model's ``forward`` takes."""
    return {k: v for k, v in batch.items() if k not in drop}


def is_trl_sft_trainer(trainer) -> bool:
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl") for c in type(trainer).__mro__)


def _find_calling(predicate, max_depth: int = 64):
    frame = inspect.currentframe()
    depth = 0
    try:
        while frame is not None and depth < max_depth:
            found = predicate(frame)
            if found is not None:
                return found
            frame, depth = frame.f_back, depth + 1
    finally:
        del frame
    return None


def _find_trainer() -> Trainer | None:
    return _find_calling(lambda f: f.f_locals.get("self") if isinstance(f.f_locals.get("self"), Trainer) else None)


def find_resume_dir() -> str | None:
    """The ``resume_from_checkpoint`` directory of the ``Trainer.train`` call in progress, if any."""

    def pred(f):
        v = f.f_locals.get("resume_from_checkpoint")
        return v if isinstance(v, str) and os.path.isdir(v) else None

    return _find_calling(pred)


def trainer_loss_scaling(trainer: Trainer, num_items_in_batch, *, has_task_loss: bool = True) -> LossScaling:
    """How ``trainer`` normalises its task loss this micro-batch, as a :class:`LossScaling` (the Trainer's own rule:
    the loss counts as already scaled for gradient accumulation when it was normalised by ``num_items_in_batch``,
    by the model or by ``compute_loss_func``)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or getattr(
            trainer, "compute_loss_func", None
        ) is not None
    scaled = bool(scaled) and has_task_loss
    items_scale = 1.0
    if scaled and getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
        items_scale = float(trainer.accelerator.num_processes)
    ga = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
    return LossScaling(
        by_items=scaled, num_items_in_batch=num_items_in_batch, items_scale=items_scale, grad_accum_steps=ga
    )


def patch_trainer(trainer: Trainer, loss_fn=None, logs_fn=None, original_loss=None) -> None:
    """Wrap one Trainer instance's ``compute_loss`` and ``log``.

    ``loss_fn(original, model, inputs, return_outputs=..., num_items_in_batch=..., **kw)`` receives the Trainer's own
    ``compute_loss`` (or ``original_loss``); ``logs_fn(logs)`` may add entries before the Trainer records them.
    """
    if loss_fn is not None:
        original = original_loss or trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            return loss_fn(
                original, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw
            )

        trainer.compute_loss = compute_loss
    if logs_fn is not None:
        original_log = trainer.log

        def log(logs: dict[str, float], *args, **kwargs):
            logs_fn(logs)
            return original_log(logs, *args, **kwargs)

        trainer.log = log


class TrainerPluginCallback(TrainerCallback):
    """Base of the callbacks that patch a Trainer's loss (distillation, multi-exit, ACM).

    Finds and attaches to the Trainer that owns the callback (subclasses implement ``_attach(trainer)``), and averages
    per-step loss components between log events (train and eval apart), adding them to the Trainer's logs
    (``eval_`` prefixed during evaluation).
    """

    trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> None:
        """Hook into ``trainer`` (done automatically on the first Trainer event). One callback, one Trainer."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise RuntimeError(
                f"This {type(self).__name__} is already attached to another Trainer; create one per Trainer."
            )
        self._attach(trainer)

    def _attach(self, trainer: Trainer) -> None:  # pragma: no cover - every subclass overrides it
        """Validate ``trainer``'s model, set ``self.trainer`` and patch the Trainer."""
        raise NotImplementedError

    def _ensure_attached(self) -> Trainer:
        if self.trainer is None:
            trainer = _find_trainer()
            if trainer is None:
                raise RuntimeError(
                    f"{type(self).__name__} must be used inside a transformers.Trainer "
                    "(callbacks=[...] or trainer.add_callback(...))."
                )
            self.attach(trainer)
        return self.trainer

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _find_trainer()
        if trainer is not None:
            self.attach(trainer)

    def normalised_task_loss(self, task, outputs, inputs: Mapping, scaling: LossScaling):
        """The Trainer's task loss ``task`` on the scale of ``scaling`` even for models that accept
        ``num_items_in_batch`` but return a micro-batch mean (:class:`TaskLossNormaliser`)."""
        if "_task_loss_normaliser" not in self.__dict__:
            self._task_loss_normaliser = TaskLossNormaliser()
        return self._task_loss_normaliser(task, outputs, inputs, scaling, self.trainer)

    def _reset_loss_logs(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._counts: dict[str, int] = {"train": 0, "eval": 0}

    def _record(self, training: bool, values: Mapping[str, float | torch.Tensor]) -> None:
        """Add one step's loss components to the running averages shown at the next log event."""
        mode = "train" if training else "eval"
        for k, v in values.items():
            self._sums[mode][k] += float(v)
        self._counts[mode] += 1

    def _add_logs(self, logs: dict[str, Any]) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else ("train" if "loss" in logs else None)
        if mode is None or not self._counts[mode]:
            return
        n = self._counts[mode]
        prefix = "eval_" if mode == "eval" else ""
        for k, v in self._sums[mode].items():
            logs[prefix + k] = round(v / n, 6)
        self._sums[mode] = defaultdict(float)
        self._counts[mode] = 0
