"""MST-Distill: a mixture of specialised teachers with a router on the student's logits.

Li, Yang, Chen, Dong, Chen and Wang, "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
Distillation" (ACM MM 2025, arXiv 2507.07015; reference code ``Gray-OREO/MST-Distill``, ``KD_methods/MST.py``).

**Specialised teachers** (the paper's stage 2). A frozen teacher gets a MaskNet at one feature layer: a sigmoid mask
``m(h) in (0, 1)^C`` over the layer's channels, computed by self-attention over the channels, multiplies the layer's
output (:class:`SpecialisedTeacher`). Several layers of one teacher (or several teachers) give several specialised
teachers. Each mask is trained, the teacher and the student frozen, so that its masked teacher's output moves
towards the **detached student** (against "knowledge drift", :func:`train_masks`):

    L_mask = T^2 KL( softmax(z_S / T) || softmax(z_T^mask / T) ),   T = 4, batch mean.

**Routing** (stage 3). A router ("GateNet", :class:`MSTRouter`) maps the student's logits ``z_S`` (``[B, C]``) to one
gate logit per teacher: ``Linear(C, 2C) -> Linear(2C, K)``, with no nonlinearity between (as in the reference code);
``g = softmax(.)``. Each row is distilled from its top-1 teacher (``top_k`` in general):

    L_KD = (1 / |B|) sum_rows (1/k) sum_{i in topk(g)} D(p_i, q)     (D: the logit terms, T^2 KL at T = 4 in the paper)

and the gate usage is balanced with ``L_LB = KL(u || g_mean)``, ``u`` uniform over the K teachers and ``g_mean`` the
batch mean of ``g`` (0 exactly when the mean gate is uniform), or the coefficient of variation ``std / mean`` of the
per-teacher gate sums (``balance="cv"``). The total is ``w_task CE + w_kd L_KD + w_lb L_LB`` (all weights 1 in the
paper's code).

**Where the reference code differs from the paper, and what we follow.** In the released code the selected KD terms
are *not* weighted by the gate probabilities and the top-k choice is not differentiable, so the router receives a
gradient only from the balance term: it learns to spread rows, never which teacher serves a row better. The paper
describes an instance-level router that selects the distillation path for each instance. We follow the paper by
default with a straight-through estimator (``gate_gradient="straight_through"``): the loss *value* is exactly the
code's (the selected teachers' divergence), and its gradient with respect to the gate probabilities is each teacher's
divergence ``D(p_i, q)``, so the router moves rows towards the teachers the student can follow best. This needs every
teacher's divergence on every row, so every teacher runs on every row (the reference code does the same).
``gate_gradient="none"`` reproduces the code. Two smaller choices: the reference code's balance term goes through
``nn.KLDivLoss(reduction="batchmean")`` on a 1-D tensor, which divides ``KL(u || g_mean)`` by ``K``; we use
``KL(u || g_mean)`` as written (scale ``balance_weight`` by ``1/K`` to reproduce the code). The code feeds the
student's logits to the router without detaching them, so the balance term also trains the student; we detach them by
default (``detach_router_input=True``: the router reads the student, it does not reshape it).

Not implemented: the paper's stage 1 (co-training the multimodal teacher, the cross-modal assistant and the student
with mutual KL): kd_plugins distils from frozen teachers, so train them first. Routing covers whole rows of class
logits (``[B, C]``): per-token LM logits would need a ``V x 2V`` router and raise.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._config import resolve_config
from .._utils import model_device, to_device
from .teacher import freeze_teacher
from .teacher_set import TeacherSet, TeacherSetOutputs

__all__ = [
    "MSTConfig",
    "MSTRouter",
    "MSTRouting",
    "MSTTeacherSet",
    "MaskNet",
    "SpecialisedTeacher",
    "mst_route",
    "mst_balance_loss",
    "mask_alignment_loss",
    "train_masks",
    "GATE_GRADIENTS",
    "BALANCE_MODES",
]

GATE_GRADIENTS = ("straight_through", "none")
BALANCE_MODES = ("kl", "cv")


@dataclass
class MSTConfig:
    """Options of MST-Distill (routing over specialised teachers, and the masks' training).

    The distillation terms and their temperature come from :class:`~kd_plugins.distill.config.DistillationConfig`
    (the paper: ``loss_terms="kl"``, ``temperature=4.0``).
    """

    top_k: int = field(default=1, metadata={"help": "Teachers distilled per row (the paper: 1)."})
    balance: Literal["kl", "cv"] = field(
        default="kl",
        metadata={"help": "Load-balance term: 'kl' = KL(uniform || batch-mean gate), 'cv' = std/mean of gate sums."},
    )
    balance_weight: float = field(
        default=1.0, metadata={"help": "Weight of the load-balance term in the loss (the paper's w_lb: 1)."}
    )
    gate_gradient: Literal["straight_through", "none"] = field(
        default="straight_through",
        metadata={
            "help": "How the routed distillation loss reaches the router: 'straight_through' (the paper's adaptive "
            "routing: the gradient of sum_i g_i D_i) or 'none' (the reference code: the router learns only from "
            "the balance term)."
        },
    )
    detach_router_input: bool = field(
        default=True,
        metadata={"help": "Detach the student's logits before the router (the reference code does not)."},
    )
    router_hidden: int | None = field(
        default=None, metadata={"help": "Router hidden width (default: 2 x the number of classes, as the paper)."}
    )
    mask_heads: int = field(default=3, metadata={"help": "Attention heads of each MaskNet (the paper: 3)."})
    mask_temperature: float = field(
        default=4.0, metadata={"help": "Temperature of the masks' alignment to the student (the paper: 4)."}
    )
    mask_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the masks (the paper: 1e-4)."})
    mask_epochs: int = field(default=1, metadata={"help": "Passes over the batches when training the masks."})

    def __post_init__(self):
        _check_choice("balance", self.balance, BALANCE_MODES)
        _check_choice("gate_gradient", self.gate_gradient, GATE_GRADIENTS)
        for name, low in (("top_k", 1), ("mask_heads", 1), ("mask_epochs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MSTConfig.{name} must be an integer >= {low}, got {value!r}.")
        if self.router_hidden is not None and (not isinstance(self.router_hidden, int) or self.router_hidden < 1):
            raise ValueError(
                f"MSTConfig.router_hidden must be a positive integer or None (2 x classes), got {self.router_hidden!r}."
            )
        w = self.balance_weight
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"MSTConfig.balance_weight must be a finite number >= 0 (0: no balance term), got {w!r}.")
        for name in ("mask_temperature", "mask_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"MSTConfig.{name} must be a finite number > 0, got {value!r}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MSTConfig.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


# ---------------------------------------------------------------------- routing
class MSTRouter(nn.Module):
    """The router ("GateNet"): student logits ``[N, C]`` -> gate logits ``[N, K]``, ``Linear(C, H) -> Linear(H, K)``
    with ``H = 2C`` by default and no nonlinearity between (as the reference code)."""

    def __init__(self, num_classes: int, num_teachers: int, hidden: int | None = None):
        super().__init__()
        if num_classes < 1 or num_teachers < 2:
            raise ValueError(
                f"MSTRouter needs >= 1 class and >= 2 teachers, got {num_classes} classes, {num_teachers} teachers."
            )
        self.num_classes, self.num_teachers = num_classes, num_teachers
        hidden = hidden or 2 * num_classes
        self.fc1 = nn.Linear(num_classes, hidden)
        self.fc2 = nn.Linear(hidden, num_teachers)

    def forward(self, student_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.dim() != 2 or student_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"MSTRouter expects student logits [N, {self.num_classes}], got {tuple(student_logits.shape)}."
            )
        return self.fc2(self.fc1(student_logits.to(self.fc1.weight.dtype)))


@dataclass
class MSTRouting:
    """One batch's routing: ``probs`` ``[N, K]`` gate probabilities, ``index`` ``[N, k]`` the selected teachers,
    ``weights`` ``[N, K]`` the loss weights (``1/k`` on the selected teachers; with the straight-through estimator
    their gradient is that of ``probs``)."""

    probs: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor


def mst_route(gate_logits: torch.Tensor, top_k: int = 1, gate_gradient: str = "straight_through") -> MSTRouting:
    """Top-k routing of gate logits ``[N, K]``: each row's loss weights are ``1/k`` on its ``k`` most probable teachers
    and 0 elsewhere. ``gate_gradient="straight_through"``: ``weights = hard + g - stop_grad(g)`` (same values, the
    gradient of ``g = softmax(gate_logits)``); ``"none"``: the hard weights, no gradient (the reference code)."""
    if gate_logits.dim() != 2:
        raise ValueError(f"mst_route expects gate logits [N, K], got {tuple(gate_logits.shape)}.")
    k_all = gate_logits.shape[-1]
    if not 1 <= top_k <= k_all:
        raise ValueError(f"mst_route: top_k must be in 1..{k_all} (the number of teachers), got {top_k}.")
    _check_choice("gate_gradient", gate_gradient, GATE_GRADIENTS)
    probs = gate_logits.float().softmax(-1)
    index = probs.topk(top_k, dim=-1).indices
    hard = torch.zeros_like(probs).scatter_(-1, index, 1.0 / top_k)
    # (g - stop_grad(g)) is exactly 0, so the value is exactly the hard weights
    weights = hard + (probs - probs.detach()) if gate_gradient == "straight_through" else hard
    return MSTRouting(probs=probs, index=index, weights=weights)


def mst_balance_loss(gate_probs: torch.Tensor, mode: str = "kl") -> torch.Tensor:
    """Load balance of gate probabilities ``[N, K]``. ``"kl"``: ``KL(u || g_mean) = sum_i (1/K) log((1/K) /
    g_mean_i)``, ``g_mean`` the mean over rows (0 iff ``g_mean`` is uniform); ``"cv"``: ``std(s) / mean(s)`` of the
    per-teacher sums ``s_i = sum_rows g_i`` (unbiased std, as the reference code; 0 iff the sums are equal)."""
    if gate_probs.dim() != 2 or gate_probs.shape[0] == 0:
        raise ValueError(f"mst_balance_loss expects gate probabilities [N, K] with N >= 1, got {gate_probs.shape}.")
    _check_choice("balance", mode, BALANCE_MODES)
    probs = gate_probs.float()
    if mode == "kl":
        mean = probs.mean(0).clamp_min(torch.finfo(torch.float32).tiny)  # an unused teacher: large, finite
        k = mean.numel()
        return (torch.log(torch.tensor(1.0 / k, device=mean.device)) - mean.log()).mean()
    sums = probs.sum(0)
    return sums.std() / sums.mean()


# ---------------------------------------------------------------------- the teacher source
class MSTTeacherSet(TeacherSet):
    """MST-Distill as a teacher source: pass it where a teacher goes (``DistillationEngine``,
    ``DistillationCallback``, ``DistillationTrainer``).

    Every teacher runs on every row; the router (:class:`MSTRouter`, built at the first batch from the width of the
    student's logits) picks each row's top-k teachers from the student's logits and the engine's logit terms are
    computed against them; the balance term is added to the first logit term's loss with weight
    ``balance_weight`` (logged as ``mst_balance``; ``mst_route_<teacher>`` logs each teacher's share of rows). The
    router is registered in the engine's :class:`~kd_plugins.distill.projectors.ProjectorBank` (key
    ``mst.router``), so it is trained by the projector optimizer that the adapters step after each optimizer step
    (``DistillationCallback`` does; a custom loop calls ``engine.projector_step(lr)``) and saved beside each
    checkpoint; it is never part of the student or a teacher.

    Args:
        teachers: at least two teachers (modules or :class:`SpecialisedTeacher`), a list or a ``name -> module``
            dict; all share the student's label set.
        config: :class:`MSTConfig` (overrides replace its fields).
        offload: park the teachers on CPU and move each to the student's device while it runs.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        config: MSTConfig | None = None,
        *,
        offload: bool = False,
        **overrides: Any,
    ):
        super().__init__(teachers, aggregation="sum_of_divergences", offload=offload)
        self.config = resolve_config(MSTConfig, config, overrides)
        if len(self.modules) < 2:
            raise ValueError(
                f"MSTTeacherSet routes rows between teachers and needs at least 2; got {len(self.modules)}. Distil "
                "from a single teacher with DistillationCallback(teacher) or TeacherSet([teacher])."
            )
        if self.config.top_k > len(self.modules):
            raise ValueError(
                f"MSTConfig.top_k={self.config.top_k} exceeds the {len(self.modules)} teachers of the set; use "
                f"top_k <= {len(self.modules)} (the paper: 1)."
            )
        self.gate: MSTRouter | None = None
        self.last_routing: MSTRouting | None = None

    def __repr__(self) -> str:
        c = self.config
        return f"MSTTeacherSet({', '.join(self.names)}; top_k={c.top_k}; balance={c.balance}; offload={self.offload})"

    def setup(self, engine: Any, student: nn.Module) -> None:
        """The set's checks, then MST's: logit terms only, and a positive weight on the first (it carries the
        balance term)."""
        super().setup(engine, student)
        kinds = engine.config.kinds
        other = sorted(n for n, k in kinds.items() if k != "logits")
        names = [n for n, k in kinds.items() if k == "logits"]
        if other or not names:
            raise ValueError(
                f"MSTTeacherSet routes logit terms only; the config has {other or 'no logit terms'}. Use "
                "DistillationConfig(loss_terms='kl', temperature=4.0) (the paper) or another divergence."
            )
        if self.config.balance_weight > 0 and engine.config.loss_terms[names[0]] <= 0:
            raise ValueError(
                f"MSTTeacherSet adds the balance term to the first logit term {names[0]!r}, whose weight is "
                f"{engine.config.loss_terms[names[0]]}; give it a positive weight or set balance_weight=0."
            )

    def logit_terms(self, engine: Any, terms: Any, inputs: dict, s_out: Any, t_out: TeacherSetOutputs, scaling):
        """The routed logit terms (see the class docstring), normalised like the engine's logit terms."""
        s, teacher_logits, labels = self._aligned(engine, inputs, s_out, t_out)
        cfg = self.config
        valid = _valid_rows(s, labels)
        count = int(valid.sum())
        gate = self._gate(engine, s.shape[-1], s.device)
        routing = mst_route(gate(s.detach() if cfg.detach_router_input else s), cfg.top_k, cfg.gate_gradient)
        balance = mst_balance_loss(routing.probs[valid], cfg.balance) if count else s.new_zeros(())
        names = [n for n, k in engine.config.kinds.items() if k == "logits"]
        for i, name in enumerate(names):
            loss_fn = self._row_loss(engine, name, "logits")
            per_teacher = torch.stack([loss_fn(s, t, labels=labels) for t in teacher_logits], dim=-1)  # [B, K]
            total = ((per_teacher * routing.weights).sum(-1) * valid).sum()
            mean = total / max(count, 1)
            value = scaling.token_sum(total, count) if labels is not None else scaling.mean(mean)
            if i == 0 and cfg.balance_weight > 0:  # weighted_sum multiplies by the term's weight: undo it
                value = value + cfg.balance_weight / engine.config.loss_terms[name] * scaling.mean(balance)
            terms.add(name, value, mean)
        self._log_routing(terms, routing, balance, valid)

    def _aligned(self, engine: Any, inputs: dict, s_out: Any, t_out: TeacherSetOutputs):
        """Student logits ``[B, C]``, the teachers' ``[B, C]`` logits in teacher order, and the labels (or None)."""
        labels_all, attn = inputs.get("labels"), inputs.get("attention_mask")
        by_teacher = {k: out for k, _, out in t_out.per_teacher}
        s, labels, teacher_logits = None, None, []
        for k in range(len(self.modules)):
            if k not in by_teacher or "logits" not in by_teacher[k]:
                raise ValueError(f"MSTTeacherSet: teacher {self.names[k]!r} returned no logits for this batch.")
            s, t, labels, _ = engine._aligned_logits(s_out, by_teacher[k], labels_all, attn)
            teacher_logits.append(t)
        if s.dim() != 2:
            raise ValueError(
                f"MSTTeacherSet routes whole rows from the student's class logits [B, C]; got logits of shape "
                f"{tuple(s.shape)} (task {engine.task}). Per-token logits (language models) would need a router over "
                "the vocabulary and are not supported: use TeacherSet (mixture, routing column) for those."
            )
        return s, teacher_logits, labels

    def _gate(self, engine: Any, num_classes: int, device: torch.device) -> MSTRouter:
        if self.gate is None:
            self.gate = MSTRouter(num_classes, len(self.modules), self.config.router_hidden).to(device)
        elif self.gate.num_classes != num_classes:
            raise ValueError(
                f"MSTTeacherSet's router was built for {self.gate.num_classes} classes; this student has "
                f"{num_classes}. Use one MSTTeacherSet per student."
            )
        engine.bank.add("mst.router", self.gate)  # trained, saved and restored with the projectors
        return self.gate

    def _log_routing(self, terms: Any, routing: MSTRouting, balance: torch.Tensor, valid: torch.Tensor) -> None:
        self.last_routing = MSTRouting(routing.probs.detach(), routing.index.detach(), routing.weights.detach())
        terms.metrics["mst_balance"] = float(balance.detach())
        top1 = routing.index[:, 0][valid]
        if top1.numel():
            shares = torch.bincount(top1, minlength=len(self.modules)).float() / top1.numel()
            for name, share in zip(self.names, shares.tolist()):
                terms.metrics[f"mst_route_{name}"] = share


def _valid_rows(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if labels is not None and labels.dim() == 1:
        valid &= labels.to(logits.device) != -100
    return valid


# ---------------------------------------------------------------------- specialised teachers
class MaskNet(nn.Module):
    """A sigmoid mask over ``C`` feature channels (MST-Distill's MaskNet): each channel's value is embedded into
    ``hidden`` dimensions (``Linear(C, hidden * C)``), self-attention runs over the ``C`` channels (``heads`` heads),
    and ``Linear(hidden, 1)`` + sigmoid gives the channel's mask. ``hidden`` defaults to the paper's
    ``C // (2 heads) * heads``. Parameters grow as ``C^2 * hidden``: meant for pooled or penultimate features."""

    def __init__(self, channels: int, heads: int = 3, hidden: int | None = None):
        super().__init__()
        if channels < 1 or heads < 1:
            raise ValueError(f"MaskNet needs channels >= 1 and heads >= 1, got channels={channels}, heads={heads}.")
        hidden = hidden or max(channels // (2 * heads) * heads, heads)
        if hidden % heads:
            raise ValueError(f"MaskNet hidden={hidden} must be a multiple of heads={heads}.")
        self.channels, self.hidden = channels, hidden
        self.embed = nn.Linear(channels, hidden * channels)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` per-row channel summaries -> ``[N, C]`` masks in (0, 1)."""
        x = self.embed(summary).view(summary.shape[0], self.channels, self.hidden)
        attended, _ = self.attn(x, x, x, need_weights=False)
        return torch.sigmoid(self.head(attended).squeeze(-1))


def _masked(features: torch.Tensor, mask_net: MaskNet) -> torch.Tensor:
    """Features times their channel mask: ``[N, C]`` as they are; ``[N, C, H, W]`` (channels first) and
    ``[N, L, C]`` (channels last) through a per-row mask computed from their mean over the other dimensions."""
    if features.dim() == 2:
        summary, shape = features, features.shape
    elif features.dim() == 4:
        summary, shape = features.mean((2, 3)), (features.shape[0], features.shape[1], 1, 1)
    elif features.dim() == 3:
        summary, shape = features.mean(1), (features.shape[0], 1, features.shape[2])
    else:
        raise ValueError(f"SpecialisedTeacher masks [N, C], [N, C, H, W] or [N, L, C] features, got {features.shape}.")
    if summary.shape[-1] != mask_net.channels:
        raise ValueError(
            f"SpecialisedTeacher: the masked layer gives {summary.shape[-1]} channels, the mask expects "
            f"{mask_net.channels}; pass channels={summary.shape[-1]}."
        )
    mask = mask_net(summary.to(mask_net.embed.weight.dtype)).to(features.dtype)
    return features * mask.view(shape)


class SpecialisedTeacher(nn.Module):
    """A frozen teacher whose ``layer`` output is multiplied by a learned :class:`MaskNet` channel mask (one of the
    paper's specialised teachers). The mask is applied by a forward hook added for each call and removed after it,
    so one base teacher can serve several specialised teachers (one per layer). Train the masks with
    :func:`train_masks`; then the set (``MSTTeacherSet``) freezes them with the teacher.

    Args:
        teacher: the base teacher (frozen here; its parameters are never trained).
        layer: dotted name of the module whose output is masked (``teacher.get_submodule(layer)``).
        channels: the layer's channel count (inferred from ``out_features`` / ``out_channels`` when omitted).
        heads, hidden: the MaskNet's attention heads and width.
    """

    def __init__(
        self, teacher: nn.Module, layer: str, *, channels: int | None = None, heads: int = 3, hidden: int | None = None
    ):
        super().__init__()
        target = _find_layer(teacher, layer)
        channels = channels or getattr(target, "out_features", None) or getattr(target, "out_channels", None)
        if not channels:
            raise ValueError(
                f"SpecialisedTeacher cannot tell the channel count of {layer!r} ({type(target).__name__}); pass "
                "channels=<width of its output>."
            )
        self.teacher = freeze_teacher(teacher)
        self.layer = layer
        self.mask = MaskNet(int(channels), heads, hidden)
        params = inspect.signature(teacher.forward).parameters
        self._accepts = None if any(p.kind == p.VAR_KEYWORD for p in params.values()) else set(params)

    @property
    def config(self) -> Any:
        """The base teacher's config (the set's vocabulary check reads it)."""
        return getattr(self.teacher, "config", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepts}
        handle = self.teacher.get_submodule(self.layer).register_forward_hook(self._apply_mask)
        try:
            return self.teacher(*args, **kwargs)
        finally:
            handle.remove()

    def _apply_mask(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_masked(output[0], self.mask), *output[1:])
        return _masked(output, self.mask)


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else f"; its modules: {', '.join(names[:12])}"
        raise ValueError(f"SpecialisedTeacher: the teacher has no module {layer!r}{hint}")
    return model.get_submodule(layer)


def mask_alignment_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """The masks' objective: ``T^2 KL(softmax(z_S / T) || softmax(z_T / T))``, batch mean, with the student's logits
    detached (the masked teacher moves towards the student, never the reverse)."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"mask_alignment_loss: teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ; the masked teacher and the student must share a label set."
        )
    t = temperature
    log_q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p = F.log_softmax(student_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * t * t


def train_masks(
    specialised: Sequence[SpecialisedTeacher] | Mapping[str, SpecialisedTeacher],
    student: nn.Module,
    batches: Iterable[dict],
    config: MSTConfig | None = None,
    **overrides: Any,
) -> list[float]:
    """Stage 2 of MST-Distill: train each specialised teacher's mask (Adam, ``mask_lr``, ``mask_epochs`` passes over
    ``batches``) on :func:`mask_alignment_loss` at ``mask_temperature``, the base teachers and the student frozen.

    ``batches``: a re-iterable of model-input dicts (``labels`` are ignored); tensors move to the student's device,
    where the teachers must be. The masked teacher must run with gradients (to reach its mask), so this loop calls
    the modules directly rather than through :class:`~kd_plugins.distill.teacher.Teacher`, whose forward is
    ``no_grad``. Returns the mean loss (per teacher and batch) of each pass. The reference code also keeps the masks
    of the epoch with the best validation loss; here the last pass's masks are kept.
    """
    cfg = resolve_config(MSTConfig, config, overrides)
    members = list(specialised.values()) if isinstance(specialised, Mapping) else list(specialised)
    bad = [type(m).__name__ for m in members if not isinstance(m, SpecialisedTeacher)]
    if not members or bad:
        raise TypeError(f"train_masks needs SpecialisedTeacher modules (a teacher plus a masked layer); got {bad}.")
    params = []
    for m in members:
        m.eval()  # the base teacher's dropout / norms stay in inference mode; the mask has none
        m.mask.requires_grad_(True)
        params += list(m.mask.parameters())
    opt = torch.optim.Adam(params, lr=cfg.mask_lr)
    student_was_training = student.training
    student.eval()
    device = model_device(student)
    history = []
    for _ in range(cfg.mask_epochs):
        total, steps = 0.0, 0
        for batch in batches:
            batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device)
            with torch.no_grad():
                s_logits = _logits(student(**_accepted(student, batch)))
            loss = sum(mask_alignment_loss(_logits(m(**batch)), s_logits, cfg.mask_temperature) for m in members)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()) / len(members), steps + 1
        if not steps:
            raise ValueError("train_masks: batches is empty (or an exhausted iterator); pass a list or a DataLoader.")
        history.append(total / steps)
    for m in members:
        m.mask.requires_grad_(False)
    student.train(student_was_training)
    return history


def _accepted(module: nn.Module, batch: dict) -> dict:
    params = inspect.signature(module.forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return batch
    return {k: v for k, v in batch.items() if k in params}


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    return out["logits"] if isinstance(out, dict) else out.logits
