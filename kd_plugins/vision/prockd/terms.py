"""``ProCKDTerms``: the term provider (see :mod:`kd_plugins.vision.terms`) of ProC-KD.

It reads one teacher feature map (the prototypes' source) and one student feature map (the augmented one), owns
the :class:`~.prototypes.PrototypeMemory` and the :class:`~.augment.PrototypeAugmentation` (registered on the
trainable module as ``prockd``), and returns up to three terms:

* ``prototype_kl`` (``assignment_weight``): ``KL(a(t_n) || a(q_n))`` over the positions of the teacher's grid;
* ``prototype_mse`` (``feature_weight``): ``|| W_p s'_n / ||W_p s'_n|| - r(t_n) / ||r(t_n)|| ||^2``;
* ``augmented_task`` (``augmented_task_weight``): cross-entropy of the student's own head on the augmented map
  ``s'`` (only when that map is the one the head reads, checked by :func:`feature_feeds_head`).

The student's map is resized to the teacher's grid (:func:`~kd_plugins.vision.features.align_spatial`). The
teacher's logits and head are never used, so the two label spaces may differ.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...losses.prototype import prototype_kl, prototype_mse
from ..features import (
    FeatureShapes,
    ModelFeatures,
    align_spatial,
    forward_with_features,
    model_label,
    parse_spec,
    resolve_specs,
    to_nchw,
)
from ..terms import TermProvider, Terms
from .augment import PrototypeAugmentation
from .config import ProCKDConfig
from .prototypes import PrototypeMemory

_logger = logging.getLogger(__name__)

__all__ = ["ProCKDTerms", "feature_feeds_head"]


@torch.no_grad()
def feature_feeds_head(model: nn.Module, spec, size) -> bool:
    """Whether ``model.forward_head(feature spec)`` gives the model's logits (eval mode, one random batch of
    ``size = (H, W)``): true for the last stage of timm CNNs (ResNet, ...), false for ViTs or models with layers
    between the stage and the head."""
    if not hasattr(model, "forward_head"):
        return False
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, getattr(model, "in_chans", 3), *size, generator=gen).to(p.device, p.dtype)
        out = forward_with_features(model, x, [spec])
        again = model.forward_head(out.features[spec])
        return again.shape == out.logits.shape and torch.allclose(again, out.logits, rtol=1e-4, atol=1e-5)
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return False
    finally:
        model.train(was)


class ProCKDTerms(TermProvider):
    """ProC-KD's prototypes, augmentation and terms (see the module docstring)."""

    output_key = "prockd"

    def __init__(self, config: ProCKDConfig, student: nn.Module, teacher: nn.Module):
        self.config = config
        self.student_specs = resolve_specs(student, [parse_spec(config.student_feature)], "student")
        self.teacher_specs = resolve_specs(teacher, [parse_spec(config.teacher_feature)], "teacher")
        self.student_spec, self.teacher_spec = self.student_specs[0], self.teacher_specs[0]
        self.teacher_label = model_label(teacher)
        self.augmented_task_weight = config.augmented_task_weight
        self.memory: PrototypeMemory | None = None
        self.student_channels = self.teacher_channels = 0

    # ------------------------------------------------------------------------------------------------ setup
    def resolve_augmented_task(self, feeds_head: bool) -> float:
        """Fix ``augmented_task_weight`` once it is known whether the student map is the one its head reads."""
        given = self.augmented_task_weight
        if given is None:
            self.augmented_task_weight = 1.0 if feeds_head else 0.0
            _logger.info(
                f"ProC-KD: augmented_task_weight={self.augmented_task_weight} (student feature "
                f"{self.student_spec!r} {'is' if feeds_head else 'is not'} the map the student's head reads)"
            )
        elif given > 0 and not feeds_head:
            raise ValueError(
                f"augmented_task_weight={given} runs the student's head on the augmented feature, but student_feature="
                f"{self.student_spec!r} is not the map the head reads; use the last stage (student_feature='-1' for "
                "timm CNNs) or set augmented_task_weight=0."
            )
        if not self.weights:
            raise ValueError(
                "Nothing to distil: assignment_weight and feature_weight are 0 and augmented_task_weight resolved to "
                "0; set assignment_weight or feature_weight > 0."
            )
        return float(self.augmented_task_weight)

    @property
    def weights(self) -> dict[str, float]:
        """The terms this provider returns, with their weights (zero-weight terms are not computed)."""
        c = self.config
        named = {
            "prototype_kl": c.assignment_weight,
            "prototype_mse": c.feature_weight,
            "augmented_task": self.augmented_task_weight or 0.0,
        }
        return {n: float(w) for n, w in named.items() if w and w > 0}

    def build(self, student: FeatureShapes, teacher: FeatureShapes) -> dict[str, nn.Module]:
        cs, _, _ = student.features[self.student_spec]
        ct, ht, wt = teacher.features[self.teacher_spec]
        if ht * wt == 1:
            raise ValueError(
                f"teacher feature {self.teacher_spec!r} of {self.teacher_label} is not spatial ([{ct}, 1, 1] at this "
                "input size): ProC-KD learns prototypes from local features; choose an earlier feature map "
                "(teacher_feature='-2', or a module name) or a larger input size."
            )
        c = self.config
        self.student_channels, self.teacher_channels = cs, ct
        self.memory = PrototypeMemory(c.num_prototypes, ct, c.momentum, c.restart_steps)
        augment = PrototypeAugmentation(cs, ct, c.temperature)
        return {"prockd": nn.ModuleDict({"memory": self.memory, "augment": augment})}

    # ------------------------------------------------------------------------------------------------ per step
    def teacher_map(self, teacher: ModelFeatures) -> torch.Tensor:
        return to_nchw(teacher.features[self.teacher_spec], self.teacher_channels)

    def observe(self, teacher: ModelFeatures) -> None:
        """One prototype update from the teacher's features (only while the memory is in training mode)."""
        if self.memory is None:
            raise RuntimeError("ProCKDTerms.observe() before build(): the task builds the provider's modules first.")
        if self.memory.training:
            self.memory.update(self.teacher_map(teacher))

    def student_outputs(self, modules: nn.Module, student: ModelFeatures) -> dict[str, Any]:
        raw = student.features[self.student_spec]
        s = to_nchw(raw, self.student_channels)
        prototypes = modules.prockd["memory"].checked().clone()  # the snapshot the terms compare against
        out = modules.prockd["augment"](s, prototypes)
        out["prototypes"] = prototypes
        if self.augmented_task_weight:
            aug = out["augmented"] if s is raw else out["augmented"].permute(0, 2, 3, 1)  # back to NHWC
            head_owner = getattr(modules.student, "module", modules.student)  # DDP-wrapped students
            out["logits"] = head_owner.forward_head(aug)
        return {self.output_key: out}

    def terms(self, student: dict[str, Any], teacher: ModelFeatures, labels: torch.Tensor) -> Terms:
        out = student[self.output_key]
        t = self.teacher_map(teacher)
        t_rows = t.permute(0, 2, 3, 1)
        kw = {"prototypes": out["prototypes"], "temperature": self.config.temperature}
        weights, values = self.weights, {}
        if "prototype_kl" in weights:
            q = align_spatial(out["query"], t.shape[-2:]).permute(0, 2, 3, 1)
            values["prototype_kl"] = prototype_kl(q, t_rows.to(q.dtype), **kw)
        if "prototype_mse" in weights:
            p = align_spatial(out["projected"], t.shape[-2:]).permute(0, 2, 3, 1)
            values["prototype_mse"] = prototype_mse(p, t_rows.to(p.dtype), **kw)
        if "augmented_task" in weights:
            values["augmented_task"] = F.cross_entropy(out["logits"], labels)
        return values, weights

    def __repr__(self) -> str:
        return (
            f"ProCKDTerms(student={self.student_spec!r}, teacher={self.teacher_spec!r}, "
            f"K={self.config.num_prototypes}, weights={self.weights})"
        )
