"""HAD masked-LM pre-training inside an unmodified ``transformers.Trainer``: ``HADCallback``.

HAD (Hybrid Architecture Distillation; Yang et al., 2025) pre-trains a small masked-LM student on grouped masks:
it reconstructs the masked tokens (the MLM loss) while its features of the visible tokens are aligned to a frozen
teacher's features of the same tokens::

    from kd_plugins import HADCallback, HADCollator

    student = AutoModelForMaskedLM.from_config(...)            # or kd_plugins.inherit_student(...)
    teacher = AutoModel.from_pretrained(...)                   # features only: no LM head needed
    trainer = Trainer(model=student, args=args, train_dataset=tokenized,
                      data_collator=HADCollator(tokenizer, mask_ratio=0.15, group_size=3),
                      callbacks=[HADCallback(teacher, feature_weight=1.0)])

Loss per micro-batch: ``mlm_weight * (the Trainer's own loss: MLM cross-entropy on the masked tokens) +
feature_weight * had_feature_loss`` (:func:`~kd_plugins.distill.had.had_feature_loss`: cosine distance or MSE over
the visible, non-padding tokens, mean over the aligned layer pairs), the feature term a mean-type term normalised
like the task loss under gradient accumulation (:func:`trainer_loss_scaling`). The teacher runs through
:class:`~kd_plugins.distill.teacher.Teacher` on the unmasked sequence (or the masked one, ``teacher_input="masked"``).
Projectors (when widths differ) live outside the student in a :class:`~kd_plugins.distill.projectors.ProjectorBank`
with their own optimizer, saved beside each checkpoint and restored on resume. Logged: ``had_mlm_loss``,
``had_feature_loss`` (per-batch means; ``eval_``-prefixed during evaluation).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

import torch
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...distill.had import (
    check_had_batch,
    check_mlm_student,
    check_same_vocabulary,
    had_feature_loss,
    unmasked_input_ids,
)
from ...distill.had_config import HADConfig
from ...distill.projectors import ProjectorBank
from ...distill.teacher import Teacher
from ...distill.terms import weighted_sum
from ._trainer import TrainerPluginCallback, find_resume_dir, patch_trainer, trainer_loss_scaling

__all__ = ["HADCallback"]

logger = logging.getLogger(__name__)


class HADCallback(TrainerPluginCallback):
    """Trains a masked-LM student with HAD: MLM on the masked tokens + teacher features on the visible ones.

    Args:
        teacher: the frozen teacher (same tokenizer as the student); only its ``hidden_states`` are used, so a bare
            encoder (``AutoModel``) works as well as a masked-LM.
        config: a :class:`~kd_plugins.distill.had_config.HADConfig`; ``**overrides`` replace its fields.
        teacher_tokenizer: optional; when given, it must have the student tokenizer's vocabulary.

    The batches must come from :class:`~kd_plugins.distill.had.HADCollator` (or a collator writing the same
    ``labels`` and visible mask).
    """

    def __init__(
        self, teacher: torch.nn.Module, config: HADConfig | None = None, *, teacher_tokenizer=None, **overrides
    ):
        if isinstance(teacher, HADConfig):
            raise TypeError(
                "HADCallback(teacher, config=None, **overrides): the teacher comes first, as in every kd_plugins "
                "callback; pass the config as config=HADConfig(...)."
            )
        if teacher is None:
            raise TypeError("HADCallback needs a teacher model (its features of the visible tokens are the targets)")
        self.config = resolve_config(HADConfig, config, overrides)
        self.teacher = Teacher(teacher, device=self.config.teacher_device)
        self.teacher_tokenizer = teacher_tokenizer
        self.projectors = ProjectorBank(enabled=self.config.projector, lr=self.config.projector_lr)
        self.trainer: Trainer | None = None
        self._placed = False
        self._reset_loss_logs()

    # ------------------------------------------------------------------------------------------------ wiring
    def _attach(self, trainer: Trainer) -> None:
        student = unwrap_model(trainer.model)
        check_mlm_student(student)
        check_same_vocabulary(
            student, self.teacher.module, getattr(trainer, "processing_class", None), self.teacher_tokenizer
        )
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def _place_teacher(self, model) -> None:
        if not self._placed:
            self.teacher.check_separate(model)
            self.teacher.place(model)
            self._placed = True

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        self._place_teacher(trainer.model)
        if state.global_step > 0:  # resuming: projector state saved beside the checkpoint
            ckpt = find_resume_dir() or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if not self.projectors.load(ckpt):
                warnings.warn(
                    f"Resuming from {ckpt} without HAD projector state (kd_plugins_state.safetensors): projectors, "
                    "if any, restart from scratch.",
                    stacklevel=2,
                )

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer is not None and trainer.optimizer else None
        self.projectors.step(lr=lr, grad_scale=scale)

    def on_save(self, args, state, control, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(ckpt):
            self.projectors.save(ckpt)

    # -------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        trainer = self._ensure_attached()
        cfg = self.config
        inputs = dict(inputs)
        visible = inputs.pop(cfg.visible_key, None)
        if visible is None and not model.training:  # an eval set collated without the mask: the MLM loss alone
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
        labels, visible = check_had_batch({**inputs, cfg.visible_key: visible}, cfg.visible_key)
        use_teacher = cfg.feature_weight > 0
        call = {**inputs, "output_hidden_states": True} if use_teacher else inputs
        task, outputs = original(model, call, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw)
        scaling = trainer_loss_scaling(trainer, num_items_in_batch)
        task = self.normalised_task_loss(task, outputs, inputs, scaling)
        values, weights = {"had_mlm": task}, {"had_mlm": cfg.mlm_weight}
        logs = {"had_mlm_loss": scaling.unscale_task_loss(float(task.detach()))}
        if use_teacher:
            self._place_teacher(model)
            teacher_states = self._teacher_states(inputs, labels)
            student_states = _hidden_states(outputs, "student")
            feature = had_feature_loss(student_states, teacher_states, visible.to(task.device), cfg, self.projectors)
            values["had_feature"], weights["had_feature"] = scaling.mean(feature), cfg.feature_weight
            logs["had_feature_loss"] = float(feature.detach())
        loss = weighted_sum(
            values, weights, step=trainer.state.global_step, hint="Lower the learning rate or check the inputs."
        )
        self._record(model.training, logs)
        if not return_outputs:
            return loss
        return loss, _without_hidden_states(outputs, model) if use_teacher else outputs

    def _teacher_states(self, inputs: Mapping, labels: torch.Tensor):
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        if self.config.teacher_input == "full":
            batch["input_ids"] = unmasked_input_ids(batch["input_ids"], labels)
        return _hidden_states(self.teacher.forward_batch(batch, output_hidden_states=True), "teacher")


def _hidden_states(outputs, who: str):
    states = outputs.get("hidden_states") if isinstance(outputs, Mapping) else getattr(outputs, "hidden_states", None)
    if not states:
        raise ValueError(
            f"the {who} returned no hidden_states with output_hidden_states=True; HAD aligns transformers models "
            "that return them (BertForMaskedLM, BertModel, ...)"
        )
    return states


def _without_hidden_states(outputs, model):
    """The outputs as the model would have returned them (HAD asked for the hidden states, the user did not): the
    Trainer's prediction step would otherwise gather them as predictions."""
    if getattr(getattr(unwrap_model(model), "config", None), "output_hidden_states", False):
        return outputs
    if isinstance(outputs, Mapping):
        return type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
    return outputs
