"""Term providers: the parts a vision distillation objective is composed of.

A provider owns one group of loss terms and the trainable modules those terms need. A task (e.g.
:class:`kd_plugins.integrations.timm.KDTask`) composes a list of them in four steps:

1. **Ask.** Each provider names what it reads from the two models: ``student_specs`` / ``teacher_specs``
   (``forward_intermediates`` indices or module names, see :mod:`.features`) and ``student_captures`` /
   ``teacher_captures`` (module outputs captured with forward hooks).
2. **Build.** One dry forward of each model gives those shapes (:func:`~.features.probe_shapes`).
   :meth:`TermProvider.build` turns them into the provider's trainable modules, ``{attribute name: module}``. The
   task registers them on its trainable module under those names, so they are optimised, wrapped by DDP and
   saved as task state.
3. **Student outputs.** Inside the trainable module's forward, :meth:`TermProvider.student_outputs` adds the
   provider's student-side outputs (projected features, exit-branch logits, ...). These go through the
   provider's modules, which it reads back from the trainable module.
4. **Terms.** :meth:`TermProvider.terms` returns named loss values and their weights from the student outputs,
   the teacher's :class:`~.features.ModelFeatures` and the class labels. The task sums them with
   :func:`kd_plugins.distill.terms.weighted_sum`.

Providers here: :class:`LogitTerms` (logit losses on the final logits) and :class:`FeaturePairTerms`
(hidden-state losses on projected feature pairs). In :mod:`.ofa`: :class:`~.ofa.OFABranchTerms`. In
:mod:`.transkd`: :class:`~.transkd.CSFTerms` and :class:`~.transkd.PatchEmbedTerms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..distill.config import DistillationConfig
from ..losses import FeatureProjector, get_loss, get_loss_spec
from .features import (
    FeatureShapes,
    ModelFeatures,
    align_spatial,
    channel_project,
    model_label,
    parse_spec,
    resolve_specs,
    to_nchw,
)

__all__ = ["TermProvider", "LogitTerms", "FeaturePairTerms", "Terms"]

#: ``(values, weights)``: named loss values and the weight of each in the distillation loss.
Terms = tuple[dict[str, torch.Tensor], dict[str, float]]

#: Logit losses that keep their own temperature default instead of the objective's (OFA-KD uses T = 1).
_OWN_TEMPERATURE = ("ofa",)
#: Constructor-only hyper-parameters of the hidden-state loss modules (not accepted by their functional forms).
_HIDDEN_CTOR_KEYS = ("student_dim", "teacher_dim", "projector")


class TermProvider:
    """Base of the providers (see the module docstring). Subclasses override what they need."""

    #: Modules are created and registered in increasing ``build_rank``. That fixes the random initialisation and
    #: the parameter order, which optimizer checkpoints are indexed by.
    build_rank: int = 0
    student_specs: list = []
    teacher_specs: list = []
    student_captures: list = []
    teacher_captures: list = []

    def build(self, student: FeatureShapes, teacher: FeatureShapes) -> dict[str, nn.Module]:
        """The provider's trainable modules, by the attribute name they get on the trainable module."""
        return {}

    def student_outputs(self, modules: nn.Module, student: ModelFeatures) -> dict[str, Any]:
        """Extra entries of the trainable module's output. ``modules`` is the trainable module, which holds what
        :meth:`build` returned under the same names."""
        return {}

    def terms(self, student: Mapping[str, Any], teacher: ModelFeatures, labels: torch.Tensor) -> Terms:
        """``(values, weights)`` from the student outputs, the teacher's features and the class labels."""
        raise NotImplementedError

    def __repr__(self) -> str:
        reads = [*self.student_specs, *self.student_captures]
        return f"{type(self).__name__}(student={reads}, teacher={[*self.teacher_specs, *self.teacher_captures]})"


class LogitTerms(TermProvider):
    """The ``logits`` losses of ``config.loss_terms`` on the final logits.

    The KL-family losses use ``config.temperature``; OFA keeps its own (T = 1) unless ``loss_kwargs`` sets it.
    Raises ``ValueError`` when the two models have different class counts.
    """

    def __init__(self, config: DistillationConfig, student: nn.Module, teacher: nn.Module):
        self.weights = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "logits"}
        self.losses = nn.ModuleDict()
        for name in self.weights:
            kw = dict(config.loss_kwargs.get(name, {}))
            if get_loss_spec(name).name not in _OWN_TEMPERATURE:
                kw.setdefault("temperature", config.temperature)
            self.losses[name] = get_loss(name, **kw)
        s_k, t_k = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
        if self.weights and s_k is not None and t_k is not None and s_k != t_k:
            raise ValueError(
                f"Class-count mismatch: teacher {model_label(teacher)} has {t_k} classes, student "
                f"{model_label(student)} has {s_k}. Logit losses ({', '.join(self.weights)}) compare class "
                f"distributions; create the teacher with num_classes={s_k} (and a checkpoint trained on this "
                "label space) or use only feature losses."
            )

    def terms(self, student, teacher, labels) -> Terms:
        values = {n: self.losses[n](student["logits"], teacher.logits, labels=labels) for n in self.weights}
        return values, dict(self.weights)


class FeaturePairTerms(TermProvider):
    """The ``hidden`` losses of ``config.loss_terms`` on ``config.feature_pairs`` (student -> teacher specs).

    Each student feature is brought to NCHW and projected to the teacher's width by a learned 1x1
    ``FeatureProjector`` (identity when the widths match). Each loss is the mean over the pairs, after the
    student map is resized to the teacher's grid.
    """

    output_key = "features"

    def __init__(self, config: DistillationConfig, student: nn.Module, teacher: nn.Module):
        pairs = [(parse_spec(s), parse_spec(t)) for s, t in config.feature_pairs.items()]
        self.student_specs = resolve_specs(student, [p[0] for p in pairs], "student")
        self.teacher_specs = resolve_specs(teacher, [p[1] for p in pairs], "teacher")
        self.weights = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "hidden"}
        self.functions = {
            name: (
                get_loss_spec(name).function,
                {k: v for k, v in config.loss_kwargs.get(name, {}).items() if k not in _HIDDEN_CTOR_KEYS},
            )
            for name in self.weights
        }
        self.projector = config.feature_projector
        self.student_channels: list[int] = []

    def build(self, student, teacher):
        self.student_channels = [student.features[s][0] for s in self.student_specs]
        t_channels = [teacher.features[t][0] for t in self.teacher_specs]
        return {
            "projectors": nn.ModuleList(
                self._projector(s, t, cs, ct)
                for s, t, cs, ct in zip(self.student_specs, self.teacher_specs, self.student_channels, t_channels)
            )
        }

    def _projector(self, s_spec, t_spec, cs: int, ct: int) -> nn.Module:
        if cs == ct:
            return nn.Identity()
        if not self.projector:
            raise ValueError(
                f"feature widths differ for pair {s_spec}->{t_spec} (student {cs}, teacher {ct}) and "
                "feature_projector=False"
            )
        return FeatureProjector(cs, ct)

    def student_maps(self, student: ModelFeatures) -> list[torch.Tensor]:
        """The paired student features as NCHW maps, in pair order."""
        return [to_nchw(student.features[s], c) for s, c in zip(self.student_specs, self.student_channels)]

    def student_outputs(self, modules, student):
        maps = self.student_maps(student)
        return {self.output_key: [channel_project(p, f) for p, f in zip(modules.projectors, maps)]}

    def aligned_pairs(self, student_maps, teacher: ModelFeatures) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, teacher)`` NCHW pairs, the student map resized to the teacher's grid."""
        pairs = []
        for s, t_spec in zip(student_maps, self.teacher_specs):
            t = to_nchw(teacher.features[t_spec], s.shape[1]).to(s.dtype)
            pairs.append((align_spatial(s, t.shape[-2:]), t))
        return pairs

    def pair_loss(self, name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fn, kw = self.functions[name]
        return fn(s.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1), **kw)

    def terms(self, student, teacher, labels) -> Terms:
        pairs = self.aligned_pairs(student[self.output_key], teacher)
        values = {name: torch.stack([self.pair_loss(name, s, t) for s, t in pairs]).mean() for name in self.weights}
        return values, dict(self.weights)
