"""``KDTask``: a ``timm.task.TrainingTask`` that runs any kd_plugins loss on timm models.

Everything trainable (the student, feature projectors, OFA exit branches, the TransKD fusion module, patch-embedding
projectors) lives in one ``KDTrainableModule`` (``task.get_trainable_module()``), so the optimizer and DDP cover
exactly those parameters and never the frozen teacher. The extra modules are saved as task state
(``get_task_state``), so the student checkpoint (``state_dict``) is a plain timm model that reloads with
``timm.create_model(name, num_classes=...)`` + ``load_state_dict``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher, TrainingTask
from timm.utils import unwrap_model

from ...distill.config import DistillationConfig
from ...losses import FeatureProjector, get_loss, get_loss_spec
from ...vision import ofa as _ofa  # noqa: F401  (registers the "ofa" loss)
from ...vision.features import (align_spatial, channel_project, forward_with_features, model_label,
                                num_feature_levels, parse_spec, resolve_specs, to_nchw)
from ...vision.models import create_timm_model, load_checkpoint_strict
from ...vision.ofa import build_exit_branch, default_ofa_stages, is_token_model
from ...vision.transkd import PEA_WEIGHTS, CrossSelectiveFusion, find_patch_embeddings, hcl_loss, module_out_channels

_logger = logging.getLogger(__name__)

__all__ = ["KDTask", "KDTrainableModule"]

#: Logit losses that keep their own temperature default instead of the task's (OFA-KD uses T = 1).
_OWN_TEMPERATURE = ("ofa",)
#: Constructor-only hyper-parameters of the hidden-state loss modules (not accepted by their functional forms).
_HIDDEN_CTOR_KEYS = ("student_dim", "teacher_dim", "projector")


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
    """Student plus every trainable distillation module; ``forward(x)`` returns a dict with ``logits`` and, when
    configured, ``features`` (projected to the teacher's widths), ``branch_logits`` (OFA exits) and
    ``patch_embeds`` (projected student patch embeddings)."""

    def __init__(self, student: nn.Module, *, pair_specs: Sequence = (), pair_channels: Sequence[int] = (),
                 projectors: Optional[Sequence[Optional[nn.Module]]] = None, csf: Optional[nn.Module] = None,
                 branch_specs: Sequence = (), branches: Sequence[nn.Module] = (), pe_names: Sequence[str] = (),
                 pe_channels: Sequence[int] = (), pe_projectors: Sequence[Optional[nn.Module]] = ()):
        super().__init__()
        self.student = student
        self.pair_specs, self.pair_channels = list(pair_specs), list(pair_channels)
        self.projectors = nn.ModuleList([p if p is not None else nn.Identity() for p in (projectors or [])])
        self.csf = csf
        self.branch_specs = list(branch_specs)
        self.branches = nn.ModuleList(branches)
        self.pe_names, self.pe_channels = list(pe_names), list(pe_channels)
        self.pe_projectors = nn.ModuleList([p if p is not None else nn.Identity() for p in pe_projectors])
        self._specs = list(dict.fromkeys(self.pair_specs + self.branch_specs))

    def no_weight_decay(self):
        student = unwrap_model(self.student)
        if not hasattr(student, "no_weight_decay"):
            return set()
        return {"student." + name for name in student.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> Dict[str, Any]:
        if not self._specs and not self.pe_names:
            return {"logits": self.student(x)}
        logits, feats, pe = forward_with_features(self.student, x, self._specs, self.pe_names)
        out: Dict[str, Any] = {"logits": logits}
        if self.pair_specs:
            fs = [to_nchw(feats[s], c) for s, c in zip(self.pair_specs, self.pair_channels)]
            if self.csf is not None:
                out["features"] = self.csf(fs)
            else:
                out["features"] = [channel_project(p, f) for p, f in zip(self.projectors, fs)]
        if self.branches:
            out["branch_logits"] = [b(to_nchw(feats[s])) for s, b in zip(self.branch_specs, self.branches)]
        if self.pe_names:
            out["patch_embeds"] = [channel_project(p, to_nchw(pe[n], c))
                                   for n, c, p in zip(self.pe_names, self.pe_channels, self.pe_projectors)]
        return out


def _as_hw(size) -> Optional[tuple]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return size[-2:]


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

    Weighting follows timm's distillation tasks: both weights given -> independent; only ``task_loss_weight`` ->
    ``distill = 1 - task``; neither -> both 1 (with a ``config``: ``task = config.hard_label_weight``).

    The teacher (a timm name + ``teacher_checkpoint``, an ``nn.Module`` or a ``timm.task.DistillationTeacher``) is
    frozen, kept in eval mode and outside the trainable module. Inputs normalised for the student are re-normalised
    for the teacher (``DistillationTeacher.normalize_input``; mean/std from the models' ``pretrained_cfg`` or the
    ``student_mean/std``/``teacher_mean/std`` overrides) and resized to ``teacher_input_size`` when given.

    All arguments are keyword-only. Pass either a ``DistillationConfig`` (``config=``) or the equivalent keyword
    arguments (``loss_terms``, ``loss_kwargs``, ``temperature``, ``feature_pairs``, ``feature_loss``,
    ``feature_weight``, ``feature_projector``).
    """

    def __init__(
            self,
            *,
            student_model: nn.Module,
            teacher_model: Union[str, nn.Module, DistillationTeacher],
            config: Optional[DistillationConfig] = None,
            loss_terms: Optional[Union[dict, str]] = None,
            loss_kwargs: Optional[Union[dict, str]] = None,
            temperature: Optional[float] = None,
            feature_pairs: Optional[Union[dict, str]] = None,
            feature_loss: str = "mse",
            feature_weight: float = 1.0,
            feature_projector: bool = True,
            feature_align: str = "linear",
            csf_mid_channels: int = 64,
            ofa_stages: Union[str, Sequence, None] = "auto",
            ofa_branch_weight: float = 1.0,
            patch_embed_weight: float = 0.0,
            patch_embed_weights: Sequence[float] = PEA_WEIGHTS,
            distill_loss_weight: Optional[float] = None,
            task_loss_weight: Optional[float] = None,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            teacher_checkpoint: Optional[str] = None,
            teacher_kwargs: Optional[Dict[str, Any]] = None,
            teacher_input_size: Union[int, Sequence[int], None] = None,
            input_size: Union[int, Sequence[int], None] = None,
            student_mean: Optional[Sequence[float]] = None,
            student_std: Optional[Sequence[float]] = None,
            teacher_mean: Optional[Sequence[float]] = None,
            teacher_std: Optional[Sequence[float]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not isinstance(student_model, nn.Module):
            raise TypeError(f"student_model must be an nn.Module, got {type(student_model).__name__}")
        student = unwrap_model(student_model)

        # ---- objective: validated by DistillationConfig (unknown loss names, weights, pairs) ----
        config_given = config is not None
        if config is None:
            config = DistillationConfig(
                loss_terms=loss_terms if loss_terms is not None else "kl", loss_kwargs=loss_kwargs,
                temperature=1.0 if temperature is None else temperature, feature_pairs=feature_pairs,
                feature_loss=feature_loss, feature_weight=feature_weight, feature_projector=feature_projector)
        elif any(v is not None for v in (loss_terms, loss_kwargs, temperature, feature_pairs)):
            raise ValueError("Pass either config= or loss_terms/loss_kwargs/temperature/feature_pairs, not both.")
        self.config = config
        bad = {n: k for n, k in config.kinds.items() if k not in ("logits", "hidden")}
        if bad:
            raise ValueError(f"KDTask supports logit and hidden-state losses; {bad} need text models "
                             "(use the Hugging Face integration).")
        if feature_align not in ("linear", "csf"):
            raise ValueError(f"feature_align must be 'linear' or 'csf', got {feature_align!r}")
        self.feature_align = feature_align
        self.logit_terms = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "logits"}
        self.hidden_terms = {n: w for n, w in config.loss_terms.items() if config.kinds[n] == "hidden"}
        self.logit_losses = nn.ModuleDict()
        for name in self.logit_terms:
            kw = dict(config.loss_kwargs.get(name, {}))
            if get_loss_spec(name).name not in _OWN_TEMPERATURE:
                kw.setdefault("temperature", config.temperature)
            self.logit_losses[name] = get_loss(name, **kw)
        self.hidden_fns = {}
        for name in self.hidden_terms:
            kw = {k: v for k, v in config.loss_kwargs.get(name, {}).items() if k not in _HIDDEN_CTOR_KEYS}
            self.hidden_fns[name] = (get_loss_spec(name).function, kw)
        self.ofa_name = next((n for n in self.logit_terms if get_loss_spec(n).name == "ofa"), None)
        self.ofa_branch_weight = float(ofa_branch_weight)
        self.patch_embed_weight = float(patch_embed_weight)

        # ---- loss weights (timm's three modes) ----
        if distill_loss_weight is not None:
            self.distill_loss_weight = float(distill_loss_weight)
            self.task_loss_weight = 1.0 if task_loss_weight is None else float(task_loss_weight)
        elif task_loss_weight is not None:
            self.task_loss_weight = float(task_loss_weight)
            self.distill_loss_weight = 1.0 - self.task_loss_weight
        else:
            self.task_loss_weight = float(config.hard_label_weight) if config_given else 1.0
            self.distill_loss_weight = 1.0
        self.criterion = _resolve_criterion(criterion, self.device, criterion_kwargs)

        # ---- teacher ----
        self.teacher = self._resolve_teacher(teacher_model, student, teacher_checkpoint, teacher_kwargs)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        t_model = unwrap_model(self.teacher.model)
        if teacher_mean is not None or teacher_std is not None:
            self._set_buffer(self.teacher, "mean_kd", teacher_mean, self.teacher.mean_kd)
            self._set_buffer(self.teacher, "std_kd", teacher_std, self.teacher.std_kd)
        cfg = getattr(student, "pretrained_cfg", None) or {}
        s_mean = student_mean if student_mean is not None else cfg.get("mean", (0.485, 0.456, 0.406))
        s_std = student_std if student_std is not None else cfg.get("std", (0.229, 0.224, 0.225))
        as_buf = partial(torch.tensor, device=self.device, dtype=self.dtype)
        self.register_buffer("student_mean", as_buf(s_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("student_std", as_buf(s_std).view(1, -1, 1, 1), persistent=False)
        self.teacher_input_size = _as_hw(teacher_input_size)

        if self.logit_terms:
            s_k, t_k = getattr(student, "num_classes", None), getattr(t_model, "num_classes", None)
            if s_k is not None and t_k is not None and s_k != t_k:
                raise ValueError(
                    f"Class-count mismatch: teacher {model_label(t_model)} has {t_k} classes, student "
                    f"{model_label(student)} has {s_k}. Logit losses ({', '.join(self.logit_terms)}) compare class "
                    f"distributions; create the teacher with num_classes={s_k} (and a checkpoint trained on this "
                    "label space) or use only feature losses.")

        # ---- feature pairs, OFA branches, patch embeddings ----
        pairs = [(parse_spec(s), parse_spec(t)) for s, t in config.feature_pairs.items()]
        s_pair = resolve_specs(student, [p[0] for p in pairs], "student")
        t_pair = resolve_specs(t_model, [p[1] for p in pairs], "teacher")
        if self.hidden_terms and not pairs:
            raise ValueError("hidden-state losses need feature_pairs")
        branch_specs: list = []
        if self.ofa_name is not None and ofa_stages:
            if isinstance(ofa_stages, str):
                if ofa_stages != "auto":
                    raise ValueError(f"ofa_stages must be 'auto', a list of feature indices/module names or None; "
                                     f"got {ofa_stages!r}")
                n = num_feature_levels(student)
                if n == 0:
                    raise ValueError(f"student {model_label(student)} has no forward_intermediates(); pass "
                                     "ofa_stages as module names")
                reductions = [f.get("reduction") for f in (getattr(student, "feature_info", None) or [])]
                plain = len(set(reductions)) == 1
                branch_specs = default_ofa_stages(n, plain)
            else:
                branch_specs = resolve_specs(student, list(ofa_stages), "student")
        s_pe, t_pe = [], []
        if self.patch_embed_weight > 0:
            s_all, t_all = find_patch_embeddings(student), find_patch_embeddings(t_model)
            k = min(len(s_all), len(t_all))
            s_pe, t_pe = s_all[:k], t_all[:k]
        self.pe_weights = [float(patch_embed_weights[i]) if i < len(patch_embed_weights) else 1.0
                           for i in range(len(s_pe))]
        self.t_pair, self.t_pe, self.t_pe_channels = t_pair, t_pe, []

        kwargs: Dict[str, Any] = {}
        if s_pair or branch_specs or s_pe:
            s_shapes, t_shapes = self._dry_run(student, t_model, s_pair + branch_specs, t_pair, s_pe, t_pe,
                                               input_size)
            s_ch = [s_shapes[s][0] for s in s_pair]
            t_ch = [t_shapes[t][0] for t in t_pair]
            sdev = next(student.parameters()).device
            kwargs.update(pair_specs=s_pair, pair_channels=s_ch)
            if s_pair and feature_align == "csf":
                kwargs["csf"] = CrossSelectiveFusion(s_ch, t_ch, csf_mid_channels).to(sdev)
            elif s_pair:
                projs = []
                for (s, t), cs, ct in zip(zip(s_pair, t_pair), s_ch, t_ch):
                    if cs == ct:
                        projs.append(None)
                    elif not config.feature_projector:
                        raise ValueError(f"feature widths differ for pair {s}->{t} (student {cs}, teacher {ct}) and "
                                         "feature_projector=False")
                    else:
                        projs.append(FeatureProjector(cs, ct).to(sdev))
                kwargs["projectors"] = projs
            if branch_specs:
                kind = "token" if is_token_model(student) else "conv"
                final_spec = num_feature_levels(student) - 1 if num_feature_levels(student) else branch_specs[-1]
                final = s_shapes.get(final_spec) or s_shapes[branch_specs[-1]]
                t_width = int(getattr(t_model, "num_features", 0) or final[0])
                num_classes = int(getattr(student, "num_classes"))
                kwargs.update(branch_specs=branch_specs, branches=[
                    build_exit_branch(kind, s_shapes[s], final, num_classes=num_classes, teacher_width=t_width,
                                      stage_pos=i, num_stages=len(branch_specs)).to(sdev)
                    for i, s in enumerate(branch_specs)])
            if s_pe:
                pe_s = [s_shapes["pe:" + n][0] for n in s_pe]
                pe_t = [t_shapes["pe:" + n][0] for n in t_pe]
                kwargs.update(pe_names=s_pe, pe_channels=pe_s, pe_projectors=[
                    None if a == b else FeatureProjector(a, b).to(sdev) for a, b in zip(pe_s, pe_t)])
                self.t_pe_channels = pe_t
        self.trainable_module = KDTrainableModule(student_model, **kwargs)
        if verbose:
            _logger.info(f"KDTask: teacher={model_label(t_model)} student={model_label(student)} "
                         f"logit_terms={self.logit_terms} hidden_terms={self.hidden_terms} "
                         f"pairs={list(zip(s_pair, t_pair))} "
                         f"ofa_branches={branch_specs} patch_embeds={s_pe} task_w={self.task_loss_weight} "
                         f"distill_w={self.distill_loss_weight}")

    # ------------------------------------------------------------------------------------------------------------
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
                raise ValueError(f"Teacher {teacher_model!r} given by name needs teacher_checkpoint= (a trained "
                                 "checkpoint for this architecture); kd_plugins never downloads pretrained weights. "
                                 "Or pass the teacher module itself.")
        elif isinstance(teacher_model, nn.Module):
            model = teacher_model
        else:
            raise TypeError(f"teacher_model must be a timm model name, an nn.Module or a DistillationTeacher, got "
                            f"{type(teacher_model).__name__}")
        if checkpoint:
            load_checkpoint_strict(unwrap_model(model), checkpoint)
        return DistillationTeacher(model, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def _dry_run(self, student, teacher, s_specs, t_specs, s_pe, t_pe, input_size):
        """One eval-mode forward of each model on zeros to learn feature shapes ``[C, H, W]``."""
        def default_size(m):
            pe = getattr(m, "patch_embed", None)
            if pe is not None and getattr(pe, "img_size", None) is not None:
                return _as_hw(pe.img_size)
            return _as_hw((getattr(m, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))

        def run(model, specs, pe, size):
            was = model.training
            model.eval()
            try:
                p = next(model.parameters())
                x = torch.zeros(1, getattr(model, "in_chans", 3), *size, device=p.device, dtype=p.dtype)
                _, feats, pes = forward_with_features(model, x, list(dict.fromkeys(specs)), pe)
            finally:
                model.train(was)
            shapes = {}
            for s, f in feats.items():
                ch = module_out_channels(model.get_submodule(s)) if isinstance(s, str) else None
                shapes[s] = tuple(to_nchw(f, ch).shape[1:])
            for n, f in pes.items():
                ch = module_out_channels(model.get_submodule(n))
                shapes["pe:" + n] = tuple(to_nchw(f, ch).shape[1:])
            return shapes

        s_size = _as_hw(input_size) or default_size(student)
        t_size = self.teacher_input_size or (_as_hw(input_size) if input_size is not None else default_size(teacher))
        return run(student, s_specs, s_pe, s_size), run(teacher, t_specs, t_pe, t_size)

    # ------------------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "KDTask":
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "KDTask":
        """Wrap only the trainable module (student + distillation modules) in DDP; the teacher stays unwrapped."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        for p in self.teacher.parameters():
            p.requires_grad = False
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        trainable = unwrap_model(self.trainable_module)
        self.eval_model = torch.compile(trainable.student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        if not (self.hidden_terms or self.t_pe):
            self.teacher.compile(backend=backend, mode=mode, compile_model=True, compile_features=False,
                                 **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
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

    def _trainable(self, module=None, ema=False) -> Optional[KDTrainableModule]:
        module = module if module is not None else self.get_trainable_module(ema=ema)
        current = module
        while current is not None and not isinstance(current, KDTrainableModule):
            current = getattr(current, "module", None) or getattr(current, "_orig_mod", None)
        return current

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """Projectors, OFA branches and fusion modules (never the student's weights)."""
        trainable = self._trainable(module, ema)
        if trainable is None:
            return {}
        state = {k: v for k, v in trainable.state_dict().items() if not k.startswith("student.")}
        return {"kd_modules": state} if state else {}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if not state:
            return
        trainable = self._trainable(module, ema)
        if trainable is None:
            raise RuntimeError("Cannot load task state before setup_ema()." if ema else
                               "Cannot load task state without a trainable module.")
        own = {k: v for k, v in trainable.state_dict().items() if not k.startswith("student.")}
        saved = state.get("kd_modules", {})
        if strict and set(own) != set(saved):
            raise RuntimeError(f"KDTask state mismatch: missing {sorted(set(own) - set(saved))[:5]}, unexpected "
                               f"{sorted(set(saved) - set(own))[:5]}")
        trainable.load_state_dict(saved, strict=False)

    def get_clip_parameters(self, exclude_head: bool = False):
        trainable = self._trainable()
        params = list(trainable.student.parameters())
        if exclude_head:
            params = params[:-2]
        params += [p for n, p in trainable.named_parameters() if not n.startswith("student.")]
        return params

    # ------------------------------------------------------------------------------------------------------------
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as the teacher expects it: re-normalised (teacher mean/std) and resized if configured."""
        x = self.teacher.normalize_input(x, self.student_mean, self.student_std)
        if self.teacher_input_size is not None and tuple(x.shape[-2:]) != self.teacher_input_size:
            x = F.interpolate(x, size=self.teacher_input_size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def _teacher_forward(self, x: torch.Tensor):
        x = self.teacher_input(x.detach())
        if not self.t_pair and not self.t_pe:
            return self.teacher(x), {}, {}
        return forward_with_features(self.teacher.model, x, self.t_pair, self.t_pe)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = self.trainable_module(input)
        logits = out["logits"]
        task_loss = self.criterion(logits, target)
        t_logits, t_feats, t_pe = self._teacher_forward(input)
        labels = target if target.dim() == 1 else target.argmax(-1)
        terms: Dict[str, torch.Tensor] = {}
        for name, w in self.logit_terms.items():
            terms[name] = self.logit_losses[name](logits, t_logits, labels=labels)
        kd_loss = sum((w * terms[n] for n, w in self.logit_terms.items()), logits.new_zeros(()))
        if self.ofa_name is not None and out.get("branch_logits"):
            fn = self.logit_losses[self.ofa_name]
            terms["ofa_branches"] = sum(fn(b, t_logits, labels=labels) for b in out["branch_logits"])
            kd_loss = kd_loss + self.ofa_branch_weight * terms["ofa_branches"]
        if self.hidden_terms:
            pairs = []
            for s, t_spec in zip(out["features"], self.t_pair):
                t = to_nchw(t_feats[t_spec], s.shape[1]).to(s.dtype)
                pairs.append((align_spatial(s, t.shape[-2:]), t))
            for name, w in self.hidden_terms.items():
                if self.feature_align == "csf":
                    vals = [hcl_loss(s, t) for s, t in pairs]
                else:
                    fn, kw = self.hidden_fns[name]
                    vals = [fn(s.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1), **kw) for s, t in pairs]
                terms[name] = torch.stack(vals).mean()
                kd_loss = kd_loss + w * terms[name]
        if out.get("patch_embeds"):
            vals = []
            for s, n, c, w in zip(out["patch_embeds"], self.t_pe, self.t_pe_channels, self.pe_weights):
                t = to_nchw(t_pe[n], c).to(s.dtype)
                vals.append(w * F.mse_loss(align_spatial(s, t.shape[-2:]), t))
            terms["patch_embed"] = sum(vals)
            kd_loss = kd_loss + self.patch_embed_weight * terms["patch_embed"]
        total = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        result = {"loss": total, "output": logits, "task_loss": task_loss, "kd_loss": kd_loss}
        result.update({f"kd_{k}": v.detach() for k, v in terms.items()})
        return result
