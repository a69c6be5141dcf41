"""Draft acceptance logged during ``transformers.Trainer`` training: ``DraftEvalCallback``.

::

    from kd_plugins import DraftEvalCallback
    trainer = Trainer(model=draft, args=args, train_dataset=ds, eval_dataset=eval_ds,
                      callbacks=[DraftEvalCallback(target, temperature=1.0, every_n_steps=50)])

The model being trained is scored as a speculative-decoding draft for ``target`` with
:func:`~kd_plugins.speculative.expected_acceptance` (``sum_v min(p_v, q_v)``, or argmax agreement for greedy
decoding) on fixed evaluation batches. The value joins the Trainer's logs: ``eval_draft_acceptance`` in every
evaluation's metrics (so ``metric_for_best_model="draft_acceptance"`` works) and, with ``every_n_steps``,
``draft_acceptance`` in the training logs of those steps. The callback attaches to its Trainer like every kd_plugins
callback (:mod:`kd_plugins.integrations.hf._trainer`) but wraps only ``Trainer.log``; the training loss is untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...distill.teacher import Teacher
from ...speculative.acceptance import expected_acceptance
from ...speculative.config import SpeculativeConfig
from ...speculative.vocab import check_same_vocabulary
from ._trainer import TrainerPluginCallback, patch_trainer

__all__ = ["DraftEvalCallback"]

logger = logging.getLogger(__name__)


class DraftEvalCallback(TrainerPluginCallback):
    """Logs the analytic acceptance of the model being trained, as a draft, against a frozen target.

    Args:
        teacher: the target (verifier) model the draft proposes for; same vocabulary as the trained model. It is
            frozen and run through :class:`~kd_plugins.distill.teacher.Teacher`, on its own device.
        config: a :class:`~kd_plugins.speculative.SpeculativeConfig` (``temperature``, ``every_n_steps``,
            ``on_evaluate``, ``max_eval_batches``, ``eval_batch_size``).
        eval_batches: the batches to score (dicts with ``input_ids`` and optional ``attention_mask`` / ``labels``, or
            id tensors), kept in a list and reused every time.
        eval_dataset: or a dataset, batched with ``data_collator`` (default: the Trainer's collator).
        data_collator: the collator for ``eval_dataset``.
        **overrides: ``SpeculativeConfig`` fields, e.g. ``temperature=1.0``, ``every_n_steps=50``.

    Without ``eval_batches`` or ``eval_dataset`` the Trainer's own evaluation loader is used (under distributed
    training each process scores its shard and the sums are added up across processes).
    """

    def __init__(
        self,
        teacher: torch.nn.Module | None = None,
        config: SpeculativeConfig | None = None,
        *,
        eval_batches: Iterable | None = None,
        eval_dataset=None,
        data_collator=None,
        **overrides,
    ):
        if isinstance(teacher, SpeculativeConfig):
            raise TypeError(
                "DraftEvalCallback(teacher, config=None, **overrides): the teacher (the target model) comes first, "
                "as in every kd_plugins callback; pass the config as config=SpeculativeConfig(...)."
            )
        if teacher is None:
            raise TypeError("DraftEvalCallback needs the target model the trained draft proposes for: pass it first.")
        if eval_batches is not None and eval_dataset is not None:
            raise ValueError("DraftEvalCallback: give eval_batches or eval_dataset, not both.")
        if data_collator is not None and eval_dataset is None:
            raise ValueError("DraftEvalCallback: data_collator batches eval_dataset; pass eval_dataset too.")
        self.config = resolve_config(SpeculativeConfig, config, overrides)
        self.teacher = Teacher(teacher)
        self.eval_batches = list(eval_batches) if eval_batches is not None else None
        if self.eval_batches is not None and not self.eval_batches:
            raise ValueError("DraftEvalCallback: eval_batches is empty; give at least one batch.")
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator
        self.trainer: Trainer | None = None
        self._due_step: int | None = None
        self._last: tuple[int, float] | None = None  # (global step, value): one measurement per step

    # --------------------------------------------------------------------------------------------- wiring
    def _attach(self, trainer: Trainer) -> None:
        check_same_vocabulary(self.teacher.module, unwrap_model(trainer.model))
        self.trainer = trainer
        patch_trainer(trainer, logs_fn=self._add_acceptance)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        self.teacher.check_separate(trainer.model)
        strategy = getattr(args, "eval_strategy", "no")
        evaluates = getattr(strategy, "value", strategy) != "no"
        if not self.config.every_n_steps and not (self.config.on_evaluate and evaluates):
            logger.warning(
                "DraftEvalCallback will log nothing during training: the Trainer never evaluates "
                "(eval_strategy='no') and every_n_steps=0. Set every_n_steps=N or an eval_strategy."
            )

    def on_step_end(self, args, state, control, **kwargs):
        n = self.config.every_n_steps
        if n and state.global_step % n == 0:
            self._due_step = state.global_step
            control.should_log = True  # the value joins this step's training log

    # ------------------------------------------------------------------------------------------- logging
    def _add_acceptance(self, logs: dict) -> None:
        step = self.trainer.state.global_step
        if any(k.startswith("eval_") for k in logs):
            if self.config.on_evaluate:
                logs["eval_draft_acceptance"] = self.measure(step)
        elif "loss" in logs and self._due_step == step:
            logs["draft_acceptance"] = self.measure(step)
            self._due_step = None

    def measure(self, step: int | None = None) -> float:
        """The acceptance of the Trainer's current model on the evaluation batches (measured once per ``step``)."""
        trainer = self._ensure_attached()
        if step is not None and self._last is not None and self._last[0] == step:
            return self._last[1]
        draft = unwrap_model(trainer.model)
        result = expected_acceptance(self.teacher, draft, self._batches(trainer), self.config)
        total, count = result.total, result.count
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            summed = accelerator.reduce(torch.tensor([total, count], device=trainer.args.device), reduction="sum")
            total, count = float(summed[0]), float(summed[1])
        value = round(total / count, 6)
        if step is not None:
            self._last = (step, value)
        return value

    def _batches(self, trainer: Trainer) -> Iterable:
        """The evaluation batches, at most ``max_eval_batches`` of them."""
        if self.eval_batches is not None:
            source = self.eval_batches
        elif self.eval_dataset is not None:
            size = self.config.eval_batch_size or trainer.args.per_device_eval_batch_size
            collator = self.data_collator or trainer.data_collator
            source = DataLoader(self.eval_dataset, batch_size=size, shuffle=False, collate_fn=collator)
        elif isinstance(trainer.eval_dataset, dict):
            raise ValueError(
                "The Trainer has several eval datasets; pass the one to score: DraftEvalCallback(target, "
                "eval_dataset=...)."
            )
        elif trainer.eval_dataset is not None:
            source = trainer.get_eval_dataloader()
        else:
            raise ValueError(
                "DraftEvalCallback has no evaluation data: pass eval_batches=... or eval_dataset=..., or give the "
                "Trainer an eval_dataset."
            )
        limit = self.config.max_eval_batches
        return source if limit is None else (b for i, b in zip(range(limit), source))
