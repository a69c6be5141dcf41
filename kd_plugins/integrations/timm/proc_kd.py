"""``ProCKDTask``: ProC-KD (prototype-guided cross-task distillation) as a ``timm.task.TrainingTask``.

A :class:`~kd_plugins.integrations.timm.KDTask` whose only distillation provider is
:class:`kd_plugins.vision.prockd.ProCKDTerms`: no logit loss, so the student's classifier may have any number of
classes (the teacher's head is never read). Everything else (teacher handling and re-normalisation, DDP of the
trainable module only, task state, eval model) is KDTask's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.task import DistillationTeacher

from ..._config import resolve_config
from ...distill.config import DistillationConfig
from ...vision.features import ModelFeatures, as_hw, default_input_size
from ...vision.prockd import ProCKDConfig, ProCKDTerms, feature_feeds_head
from .task import KDTask

__all__ = ["ProCKDTask"]


class ProCKDTask(KDTask):
    """Prototype-guided cross-task distillation of a timm student from a teacher with another label space.

    ``loss = task_loss_weight * criterion(student(x), y) + distill_loss_weight * (assignment_weight * prototype_kl
    + feature_weight * prototype_mse + augmented_task_weight * CE(head(s'), y))`` (see
    :mod:`kd_plugins.vision.prockd`; ``y`` is the argmax of Mixup/CutMix soft targets in the augmented term).

    The objective is a :class:`ProCKDConfig` (``config=``, default ``ProCKDConfig()``); keyword ``overrides`` name
    its fields and replace them (``num_prototypes=16``). Each training step first updates the prototype memory from
    the teacher's ``teacher_feature`` map, so the first step fills it. ``task.get_task_state()`` holds the
    prototypes and the augmentation module; the student checkpoint (``get_eval_model().state_dict()``) is a plain
    timm model: the augmentation is a training aid and inference does not use it.

    A teacher given by timm name is created with the student's ``num_classes`` unless ``teacher_kwargs`` says
    otherwise: pass ``teacher_kwargs={"num_classes": <teacher's>}`` with its ``teacher_checkpoint``.
    """

    def __init__(
        self,
        *,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher,
        config: ProCKDConfig | None = None,
        distill_loss_weight: float | None = None,
        task_loss_weight: float | None = None,
        criterion: nn.Module | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_input_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        **overrides: Any,
    ):
        # read by _build_providers, which KDTask.__init__ calls (a plain attribute is allowed before Module init)
        self.prockd_config = resolve_config(ProCKDConfig, config, overrides)
        super().__init__(
            student_model=student_model,
            teacher_model=teacher_model,
            # no logit or feature-pair term (ProC-KD's provider is the whole objective); weights default to 1 and 1
            config=DistillationConfig(loss_terms="", hard_label_weight=1.0),
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            teacher_checkpoint=teacher_checkpoint,
            teacher_kwargs=teacher_kwargs,
            teacher_input_size=teacher_input_size,
            input_size=input_size,
            student_mean=student_mean,
            student_std=student_std,
            teacher_mean=teacher_mean,
            teacher_std=teacher_std,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    @property
    def prockd(self) -> ProCKDTerms:
        """The ProC-KD provider (its ``memory`` holds the prototypes)."""
        return self.providers[-1]

    def _build_providers(self, student, teacher, **kwargs) -> list:
        providers = super()._build_providers(student, teacher, **kwargs)
        return [*providers, ProCKDTerms(self.prockd_config, student, teacher)]

    def _probe_shapes(self, student, teacher, input_size):
        shapes = super()._probe_shapes(student, teacher, input_size)
        size = as_hw(input_size) or default_input_size(student)
        self.prockd.resolve_augmented_task(feature_feeds_head(student, self.prockd.student_spec, size))
        return shapes

    def _teacher_forward(self, x: torch.Tensor) -> ModelFeatures:
        """The teacher's features; in training, also one prototype update from them."""
        teacher = super()._teacher_forward(x)
        if self.training:
            self.prockd.observe(teacher)
        return teacher

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and not self.prockd.memory.initialized:  # seed the prototypes before the student reads them
            self.prockd.observe(super()._teacher_forward(input))
        return super().forward(input, target)
