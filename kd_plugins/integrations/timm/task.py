"""``KDTask``: a ``timm.task.TrainingTask`` that runs any kd_plugins loss on timm models.

The objective is a list of term providers (:mod:`kd_plugins.vision.terms`): logit losses, feature pairs (linear
projectors or TransKD's CSF), OFA-KD exit branches, TransKD patch-embedding alignment. Everything trainable (the
student and the providers' modules) lives in one ``KDTrainableModule`` (``task.get_trainable_module()``), so the
optimizer and DDP cover exactly those parameters and never the frozen teacher. The extra modules are saved as task
state (``get_task_state``), so the student checkpoint (``state_dict``) is a plain timm model that reloads with
``timm.create_model(name, num_classes=...)`` + ``load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model

from ..._config import resolve_config
from ...distill.config import DistillationConfig
from ...distill.teacher import Teacher, freeze_teacher
from ...distill.teacher_set import TeacherSet
from ...distill.terms import weighted_sum
from ...losses import get_loss_spec
from ...vision.features import (
    ModelFeatures,
    as_hw,
    default_input_size,
    forward_with_features,
    model_label,
    probe_shapes,
    resize_to,
)
from ...vision.models import create_timm_model, load_checkpoint_strict
from ...vision.ofa import OFABranchTerms
from ...vision.terms import FeaturePairTerms, LogitTerms, TermProvider
from ...vision.transkd import PEA_WEIGHTS, CSFTerms, PatchEmbedTerms
from .teacher_set import TimmTeacherSet

_logger = logging.getLogger(__name__)

__all__ = ["KDTask", "KDTrainableModule"]

#: Where to look when a distillation term is NaN/inf (the default hint is about language models).
_NON_FINITE_HINT = (
    "Check for fp16 overflow (use --amp-dtype bfloat16), a too-low temperature, or a diverging learning rate."
)


def _resolve_criterion(criterion, device, criterion_kwargs):
    try:
        from timm.task.classification import resolve_classification_loss
    except ImportError:  # timm < 1.0.26
        if criterion_kwargs:
            from timm.loss import LabelSmoothingCrossEntropy

            return LabelSmoothingCrossEntropy(**criterion_kwargs)
        return criterion if criterion is not None else nn.CrossEntropyLoss()
    return resolve_classification_loss(criterion, device, criterion_kwargs=criterion_kwargs)


class KDTrainableModule(nn.Module):
    """Student plus the providers' trainable modules (``projectors``, ``csf``, ``branches``, ``pe_projectors``).

    ``forward(x)`` returns a dict with ``logits`` and what each provider adds (``features`` projected to the
    teacher's widths, ``branch_logits`` of the OFA exits, ``patch_embeds``). The student's intermediate features
    come from one forward pass (``forward_intermediates`` and/or hooks).
    """

    def __init__(
        self, student: nn.Module, providers: Sequence[TermProvider] = (), modules: dict[str, nn.Module] | None = None
    ):
        super().__init__()
        self.student = student
        for name, module in (modules or {}).items():
            self.add_module(name, module)
        for name in ("projectors", "branches", "pe_projectors"):  # always present, as callers inspect them
            if name not in self._modules:
                self.add_module(name, nn.ModuleList())
        if "csf" not in self._modules:
            self.csf = None
        self.providers = list(providers)
        self._specs = list(dict.fromkeys(s for p in self.providers for s in p.student_specs))
        self._captures = list(dict.fromkeys(n for p in self.providers for n in p.student_captures))

    def _provider(self, cls) -> TermProvider | None:
        return next((p for p in self.providers if isinstance(p, cls)), None)

    @property
    def pair_specs(self) -> list:
        """Student feature specs of the feature pairs."""
        p = self._provider(FeaturePairTerms)
        return list(p.student_specs) if p else []

    @property
    def branch_specs(self) -> list:
        """Student feature specs of the OFA exit branches."""
        p = self._provider(OFABranchTerms)
        return list(p.student_specs) if p else []

    @property
    def pe_names(self) -> list:
        """Student patch-embedding modules aligned by TransKD's PEA."""
        p = self._provider(PatchEmbedTerms)
        return list(p.student_captures) if p else []

    def no_weight_decay(self):
        student = unwrap_model(self.student)
        if not hasattr(student, "no_weight_decay"):
            return set()
        return {"student." + name for name in student.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        if not self._specs and not self._captures:
            return {"logits": self.student(x)}
        student = forward_with_features(self.student, x, self._specs, self._captures)
        out: dict[str, Any] = {"logits": student.logits}
        for provider in self.providers:
            out.update(provider.student_outputs(self, student))
        return out


class KDTask(TrainingTask):
    """Knowledge distillation for timm training loops with the kd_plugins loss library.

    ``loss = task_loss_weight * criterion(student_logits, target) + distill_loss_weight * kd_loss`` with
    ``kd_loss = sum_i w_i * loss_i`` over ``loss_terms`` (registered names, see ``kd_plugins.losses.list_losses``):

    * ``logits`` losses (``kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``dkd``, ``ofa``, ...) compare the final logits;
      DKD and OFA use the target class (the argmax of Mixup/CutMix soft targets).
    * ``hidden`` losses (``hidden_mse``, ``hidden_cosine``) compare the ``feature_pairs``: student -> teacher
      ``forward_intermediates`` indices (``{1: 2, -1: -1}``) or module names (forward hooks), projected to the
      teacher's width by a learned ``FeatureProjector`` (1x1) and resized to the teacher's grid. With
      ``feature_align="csf"`` the pairs go through TransKD's cross selective fusion and the HCL loss instead.
    * ``ofa``: also adds OFA-KD exit branches at ``ofa_stages`` (``"auto"``: the last four stages, or a 2-2-6-2
      block split for plain ViTs), each trained with the OFA loss, weighted by ``ofa_branch_weight``.
    * ``patch_embed_weight > 0``: TransKD patch-embedding alignment (MSE of projected patch embeddings).

    Each group is a term provider of :mod:`kd_plugins.vision`; the terms are summed by
    :func:`kd_plugins.distill.terms.weighted_sum`, which raises on a NaN/inf term.

    Weighting follows timm's distillation tasks: both weights given -> independent; only ``task_loss_weight`` ->
    ``distill = 1 - task``; neither -> both 1 (with a ``config``: ``task = config.hard_label_weight``).

    The teacher (a timm name + ``teacher_checkpoint``, an ``nn.Module``, a ``timm.task.DistillationTeacher`` or a
    ``TeacherSet`` of modules: see :mod:`kd_plugins.integrations.timm.teacher_set`) is frozen, kept in eval mode
    and outside the trainable module, and runs through a :class:`kd_plugins.distill.teacher.Teacher`. Inputs
    normalised for the student are re-normalised for the teacher (``DistillationTeacher.normalize_input``; mean/std
    from the models' ``pretrained_cfg`` or the ``student_mean/std``/``teacher_mean/std`` overrides) and resized to
    ``teacher_input_size`` when given.

    All arguments are keyword-only. The objective is a ``DistillationConfig`` (``config=``, default
    ``DistillationConfig()``); the keyword arguments ``loss_terms``, ``loss_kwargs``, ``temperature``,
    ``feature_pairs``, ``feature_loss``, ``feature_weight`` and ``feature_projector``, when given, replace its fields.
    """

    def __init__(
        self,
        *,
        student_model: nn.Module,
        teacher_model: str | nn.Module | DistillationTeacher | TeacherSet,
        config: DistillationConfig | None = None,
        loss_terms: dict | str | None = None,
        loss_kwargs: dict | str | None = None,
        temperature: float | None = None,
        feature_pairs: dict | str | None = None,
        feature_loss: str | None = None,
        feature_weight: float | None = None,
        feature_projector: bool | None = None,
        feature_align: str = "linear",
        csf_mid_channels: int = 64,
        ofa_stages: str | Sequence | None = "auto",
        ofa_branch_weight: float = 1.0,
        patch_embed_weight: float = 0.0,
        patch_embed_weights: Sequence[float] = PEA_WEIGHTS,
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
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        student = unwrap_model(student_model)
        # the keyword arguments that are DistillationConfig fields: when given, they replace config's
        given = dict(
            loss_terms=loss_terms,
            loss_kwargs=loss_kwargs,
            temperature=temperature,
            feature_pairs=feature_pairs,
            feature_loss=feature_loss,
            feature_weight=feature_weight,
            feature_projector=feature_projector,
        )
        self._set_objective(config, {k: v for k, v in given.items() if v is not None}, feature_align)
        self._set_loss_weights(config is not None, distill_loss_weight, task_loss_weight)
        self.criterion = _resolve_criterion(criterion, self.device, criterion_kwargs)
        if isinstance(teacher_model, TeacherSet) and teacher_model.runs_as_single:
            teacher_model = teacher_model.modules[0]  # exactly the single-teacher task
        self.teacher_set: TimmTeacherSet | None = None
        if isinstance(teacher_model, TeacherSet):
            t_model = self._set_teacher_set(teacher_model, student, teacher_checkpoint, teacher_mean, teacher_std)
        else:
            t_model = self._set_teacher(
                teacher_model, student, teacher_checkpoint, teacher_kwargs, teacher_mean, teacher_std
            )
        self._set_input_transform(student, student_mean, student_std, teacher_input_size)
        self.providers = self._build_providers(
            student,
            t_model,
            csf_mid_channels=csf_mid_channels,
            ofa_stages=ofa_stages,
            ofa_branch_weight=ofa_branch_weight,
            patch_embed_weight=patch_embed_weight,
            patch_embed_weights=patch_embed_weights,
        )
        if self.teacher_set is not None and len(self.providers) > 1:
            extra = ", ".join(type(p).__name__ for p in self.providers[1:])
            raise ValueError(
                f"KDTask with several teachers supports logit terms only, but this objective also adds {extra} "
                "(OFA exit branches or patch-embedding alignment read one teacher). Drop them, or distil from one "
                "teacher (e.g. TeacherSet.nearest(teachers, scores))."
            )
        self.trainable_module = self._build_trainable(student_model, t_model, input_size)
        if verbose:
            _logger.info(
                f"KDTask: teacher={model_label(t_model)} student={model_label(student)} "
                f"logit_terms={self.logit_terms} hidden_terms={self.hidden_terms} "
                f"providers={self.providers} task_w={self.task_loss_weight} "
                f"distill_w={self.distill_loss_weight}"
            )

    # ------------------------------------------------------------------------------------------------ construction
    def _set_objective(self, config: DistillationConfig | None, overrides: dict[str, Any], feature_align: str) -> None:
        """``config`` (or the default) with the keyword overrides; only logit and hidden-state losses apply."""
        self.config = config = resolve_config(DistillationConfig, config, overrides)
        bad = {n: k for n, k in config.kinds.items() if k not in ("logits", "hidden")}
        if bad:
            raise ValueError(
                f"KDTask supports logit and hidden-state losses; {bad} need text models "
                "(use the Hugging Face integration)."
            )
        if feature_align not in ("linear", "csf"):
            raise ValueError(f"feature_align must be 'linear' or 'csf', got {feature_align!r}")
        self.feature_align = feature_align
        self.logit_terms = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "logits"}
        self.hidden_terms = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "hidden"}

    def _set_loss_weights(
        self, config_given: bool, distill_loss_weight: float | None, task_loss_weight: float | None
    ) -> None:
        """timm's three weighting modes (see the class docstring)."""
        if distill_loss_weight is not None:
            self.distill_loss_weight = float(distill_loss_weight)
            self.task_loss_weight = 1.0 if task_loss_weight is None else float(task_loss_weight)
        elif task_loss_weight is not None:
            self.task_loss_weight = float(task_loss_weight)
            self.distill_loss_weight = 1.0 - self.task_loss_weight
        else:
            self.task_loss_weight = float(self.config.hard_label_weight) if config_given else 1.0
            self.distill_loss_weight = 1.0

    def _set_teacher(self, teacher_model, student, checkpoint, teacher_kwargs, teacher_mean, teacher_std) -> nn.Module:
        """``self.teacher`` (the ``DistillationTeacher``, a sub-module of the task as in timm's own distillation
        tasks) and ``self._teacher`` (the :class:`Teacher` every teacher forward goes through). Returns the plain
        teacher model."""
        self.teacher = self._resolve_teacher(teacher_model, student, checkpoint, teacher_kwargs)
        self._teacher = Teacher(self.teacher)
        self._teacher.check_separate(student)
        if teacher_mean is not None or teacher_std is not None:
            self._set_buffer(self.teacher, "mean_kd", teacher_mean, self.teacher.mean_kd)
            self._set_buffer(self.teacher, "std_kd", teacher_std, self.teacher.std_kd)
        return unwrap_model(self.teacher.model)

    def _set_teacher_set(self, teacher_set, student, checkpoint, teacher_mean, teacher_std) -> nn.Module:
        """Several teachers (:class:`TimmTeacherSet` as ``self.teacher``). Returns the first member's model (the
        providers' class-count checks; every member is checked against the student)."""
        given = [
            n
            for n, v in (
                ("teacher_checkpoint", checkpoint),
                ("teacher_mean", teacher_mean),
                ("teacher_std", teacher_std),
            )
            if v is not None
        ]
        if given:
            raise ValueError(
                f"KDTask: {', '.join(given)} apply to one teacher; with a TeacherSet load each member's weights "
                "first; each member is normalised by the mean/std of its own pretrained_cfg (set "
                "model.pretrained_cfg['mean'] / ['std'] before building the set to change them)."
            )
        self.teacher_set = TimmTeacherSet(
            teacher_set,
            lambda m: self._resolve_teacher(m, student, None, None),
            student,
            self.config,
            self.device,
        )
        self.teacher = self.teacher_set
        return unwrap_model(self.teacher_set.members[0].model)

    def _set_input_transform(self, student, student_mean, student_std, teacher_input_size) -> None:
        """The student's normalisation (to re-normalise inputs for the teacher) and the teacher's input size."""
        cfg = getattr(student, "pretrained_cfg", None) or {}
        s_mean = student_mean if student_mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))
        s_std = student_std if student_std is not None else cfg.get("std", (0.229, 0.224, 0.225))
        for name, value in (("student_mean", s_mean), ("student_std", s_std)):
            buf = torch.tensor(value, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
            self.register_buffer(name, buf, persistent=False)
        self.teacher_input_size = as_hw(teacher_input_size)

    def _build_providers(
        self,
        student,
        teacher,
        *,
        csf_mid_channels,
        ofa_stages,
        ofa_branch_weight,
        patch_embed_weight,
        patch_embed_weights,
    ) -> list:
        """The objective's term providers, in the order their terms are summed (logits, OFA branches, feature
        pairs, patch embeddings)."""
        config = self.config
        logits = LogitTerms(config, student, teacher)
        self.logit_losses = logits.losses
        providers: list = [logits]
        pairs: TermProvider | None = None  # validated before the OFA stages, summed after the OFA branches
        if config.feature_pairs:
            pairs = (
                CSFTerms(config, student, teacher, csf_mid_channels)
                if self.feature_align == "csf"
                else FeaturePairTerms(config, student, teacher)
            )
        ofa_name = next((n for n in self.logit_terms if get_loss_spec(n).name == "ofa"), None)
        if ofa_name is not None and ofa_stages:
            providers.append(
                OFABranchTerms(self.logit_losses[ofa_name], student, teacher, ofa_stages, ofa_branch_weight)
            )
        if pairs is not None:
            providers.append(pairs)
        if patch_embed_weight > 0:
            providers.append(PatchEmbedTerms(student, teacher, patch_embed_weight, patch_embed_weights))
        return providers

    def _build_trainable(self, student_model: nn.Module, teacher: nn.Module, input_size) -> KDTrainableModule:
        """Probe the feature shapes the providers read, build their modules (on the student's device) and wrap
        them with the student."""
        student = unwrap_model(student_model)
        modules: dict[str, nn.Module] = {}
        if any(p.student_specs or p.student_captures for p in self.providers):
            s_shapes, t_shapes = self._probe_shapes(student, teacher, input_size)
            device = next(student.parameters()).device
            for provider in sorted(self.providers, key=lambda p: p.build_rank):
                built = provider.build(s_shapes, t_shapes)
                modules.update({name: module.to(device) for name, module in built.items()})
        return KDTrainableModule(student_model, self.providers, modules)

    def _probe_shapes(self, student, teacher, input_size):
        """NCHW shapes of every feature the providers read, from one eval-mode forward of each model on zeros."""

        def union(attr):
            return list(dict.fromkeys(x for p in self.providers for x in getattr(p, attr)))

        s_size = as_hw(input_size) or default_input_size(student)
        t_size = self.teacher_input_size or (
            as_hw(input_size) if input_size is not None else default_input_size(teacher)
        )
        s_shapes = probe_shapes(student, union("student_specs"), union("student_captures"), s_size)
        t_shapes = self._teacher.run(
            lambda m: probe_shapes(unwrap_model(m.model), union("teacher_specs"), union("teacher_captures"), t_size)
        )
        return s_shapes, t_shapes

    @staticmethod
    def _set_buffer(module, name, value, like):
        if value is not None:
            setattr(module, name, torch.tensor(value, device=like.device, dtype=like.dtype).view(1, -1, 1, 1))

    def _resolve_teacher(self, teacher_model, student, checkpoint, teacher_kwargs) -> DistillationTeacher:
        if isinstance(teacher_model, DistillationTeacher):
            if checkpoint:
                load_checkpoint_strict(unwrap_model(teacher_model.model), checkpoint)
            return teacher_model
        if isinstance(teacher_model, str):
            kw = {"num_classes": getattr(student, "num_classes", None), "in_chans": getattr(student, "in_chans", 3)}
            kw.update(teacher_kwargs or {})
            kw = {k: v for k, v in kw.items() if v is not None}
            model = create_timm_model(teacher_model, **kw)
            if not checkpoint:
                raise ValueError(
                    f"Teacher {teacher_model!r} given by name needs teacher_checkpoint= (a trained "
                    "checkpoint for this architecture); kd_plugins never downloads pretrained weights. "
                    "Or pass the teacher module itself."
                )
        elif isinstance(teacher_model, nn.Module):
            model = teacher_model
        else:
            raise TypeError(
                f"teacher_model must be a timm model name, an nn.Module or a DistillationTeacher, got "
                f"{type(teacher_model).__name__}"
            )
        if checkpoint:
            load_checkpoint_strict(unwrap_model(model), checkpoint)
        return DistillationTeacher(model, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------------ task API
    def train(self, mode: bool = True) -> KDTask:
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> KDTask:
        """Wrap only the trainable module (student + distillation modules) in DDP; the teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        freeze_teacher(self.teacher)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    @property
    def _teacher_reads_features(self) -> bool:
        return any(p.teacher_specs or p.teacher_captures for p in self.providers)

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        trainable = unwrap_model(self.trainable_module)
        self.eval_model = torch.compile(trainable.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        if not self._teacher_reads_features:
            members = self.teacher_set.members if self.teacher_set is not None else [self.teacher]
            for member in members:
                member.compile(backend=backend, mode=mode, compile_model=True, compile_features=False, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:
            if isinstance(current, KDTrainableModule):
                return current.student
            nxt = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
            if nxt is None:
                break
            current = nxt
        return resolved

    def _trainable(self, module=None, ema=False) -> KDTrainableModule | None:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        current = module
        while current is not None and not isinstance(current, KDTrainableModule):
            current = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        return current

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """Projectors, OFA branches and fusion modules (never the student's weights)."""
        trainable = self._trainable(module, ema)
        if trainable is None:
            return {}
        state = {k: v for k, v in trainable.state_dict().items() if not k.startswith("student.")}
        return {"kd_modules": state} if state else {}

    def load_task_state(
        self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None, ema: bool = False
    ) -> None:
        if not state:
            return
        trainable = self._trainable(module, ema)
        if trainable is None:
            raise RuntimeError(
                "Cannot load task state before setup_ema()."
                if ema
                else "Cannot load task state without a trainable module."
            )
        own = {k: v for k, v in trainable.state_dict().items() if not k.startswith("student.")}
        saved = state.get("kd_modules", {})
        if strict and set(own) != set(saved):
            raise RuntimeError(
                f"KDTask state mismatch: missing {sorted(set(own) - set(saved))[:5]}, unexpected "
                f"{sorted(set(saved) - set(own))[:5]}"
            )
        trainable.load_state_dict(saved, strict=False)

    def get_clip_parameters(self, exclude_head: bool = False):
        trainable = self._trainable()
        params = list(trainable.student.parameters())
        if exclude_head:
            params = params[:-2]
        params += [p for n, p in trainable.named_parameters() if not n.startswith("student.")]
        return params

    # ------------------------------------------------------------------------------------------------ forward
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as the teacher expects it: re-normalised (teacher mean/std) and resized if configured."""
        return self._member_input(self.teacher, x)

    def _member_input(self, teacher: DistillationTeacher, x: torch.Tensor) -> torch.Tensor:
        x = teacher.normalize_input(x, self.student_mean, self.student_std)
        return resize_to(x, self.teacher_input_size)

    def _teacher_forward(self, x: torch.Tensor) -> ModelFeatures:
        """The teacher's logits plus the features and module outputs the providers read (one forward, no grad)."""
        x = self.teacher_input(x.detach())
        if not self._teacher_reads_features:
            return ModelFeatures(self._teacher.run(lambda m: m(x)), {}, {})
        specs = list(dict.fromkeys(s for p in self.providers for s in p.teacher_specs))
        captures = list(dict.fromkeys(n for p in self.providers for n in p.teacher_captures))
        return self._teacher.run(lambda m: forward_with_features(m.model, x, specs, captures))

    def _set_terms(self, student: dict, input: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
        """The logit terms against several teachers (mixture or sum of divergences)."""
        ts = self.teacher_set
        row_weights, per_teacher = ts.forward_rows(input.detach(), target, self._member_input)
        if ts.spec.aggregation == "sum_of_divergences":
            return ts.sum_of_divergences(student["logits"], labels, row_weights, per_teacher), dict(self.logit_terms)
        mixture = ModelFeatures(ts.mixture(row_weights, per_teacher, input.shape[0]), {}, {})
        return self.providers[0].terms(student, mixture, labels)  # the set allows logit terms only

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        student = self.trainable_module(input)
        logits = student["logits"]
        task_loss = self.criterion(logits, target)
        labels = target if target.dim() == 1 else target.argmax(-1)
        values: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if self.teacher_set is not None:
            values, weights = self._set_terms(student, input, target, labels)
        else:
            teacher = self._teacher_forward(input)
            for provider in self.providers:
                v, w = provider.terms(student, teacher, labels)
                values.update(v)
                weights.update(w)
        kd_loss = weighted_sum(values, weights, hint=_NON_FINITE_HINT)
        if kd_loss is None:  # no distillation term (only the task loss)
            kd_loss = logits.new_zeros(())
        total = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        result = {"loss": total, "output": logits, "task_loss": task_loss, "kd_loss": kd_loss}
        result.update({f"kd_{k}": v.detach() for k, v in values.items()})
        return result
