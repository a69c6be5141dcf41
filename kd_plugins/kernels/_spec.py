"""Validated inputs of the fused ``lm_head`` + KD loss, shared by its PyTorch and Triton backends.

:func:`prepare_spec` checks the arguments of :func:`kd_plugins.kernels.fused_linear_kd_loss` (with error messages
that say how to fix the call), keeps only the valid rows and folds the weights, ``T^2`` scaling and normaliser into
per-row coefficients. Both backends consume the resulting :class:`FusedKDSpec` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kd_plugins.losses._common import check_topk

from ._topk import RowFn, divergence_row_fn

__all__ = [
    "DIVERGENCE_ALIASES",
    "BACKENDS",
    "HeadRows",
    "TopKTeacher",
    "LossScales",
    "FusedKDSpec",
    "prepare_spec",
    "check_divergence",
    "check_chunk_size",
    "check_backend",
]

#: Accepted ``divergence`` names (the loss registry's names and aliases) -> canonical name.
DIVERGENCE_ALIASES = {
    "kl": "kl",
    "forward_kl": "kl",
    "fkl": "kl",
    "hinton": "kl",
    "reverse_kl": "reverse_kl",
    "rkl": "reverse_kl",
    "jsd": "jsd",
    "gkd": "jsd",
    "generalized_jsd": "jsd",
    "tvd": "tvd",
    "total_variation": "tvd",
}
#: Accepted ``backend`` values of the fused loss.
BACKENDS = ("torch", "triton", "auto")


@dataclass(frozen=True)
class HeadRows:
    """Hidden rows feeding one ``lm_head`` and its parameters: ``logits = x @ w.T (+ b)``."""

    x: torch.Tensor  # [N, H]
    w: torch.Tensor  # [V, H]
    b: torch.Tensor | None  # [V]


@dataclass(frozen=True)
class TopKTeacher:
    """Sparse teacher restricted to the valid rows."""

    idx: torch.Tensor  # [n_valid, K] int64 token indices
    log_probs: torch.Tensor  # [n_valid, K]
    row_fn: RowFn  # divergence per row on the K (+1) support
    tail: str  # "bucket" | "renormalize"


@dataclass(frozen=True)
class ExactHead:
    """Exact teacher log-probs on ``h`` tokens of each valid row; the dense teacher's other tokens share the rest of
    the mass in proportion to their own probabilities (:func:`spread_tail`)."""

    idx: torch.Tensor  # [n_valid, h] int64 token indices
    log_probs: torch.Tensor  # [n_valid, h]


def spread_tail(log_scores: torch.Tensor, head_idx: torch.Tensor, head_log_probs: torch.Tensor) -> torch.Tensor:
    """In place on ``log_scores`` ``[R, V]``: the head tokens get ``head_log_probs``, every other token the head's
    remaining mass ``1 - sum(exp(head))`` in proportion to ``softmax(log_scores)`` over the non-head tokens. Returns
    normalised log-probs (rows sum to 1)."""
    head = head_log_probs.to(log_scores.dtype)
    log_scores.scatter_(1, head_idx, float("-inf"))
    tail_mass = (-torch.expm1(torch.logsumexp(head, -1))).clamp_min(1e-30)  # 1 - sum(head), stably
    log_scores.sub_(torch.logsumexp(log_scores, -1, keepdim=True).sub_(tail_mass.log()[:, None]))
    return log_scores.scatter_(1, head_idx, head)


@dataclass(frozen=True)
class LossScales:
    """Factors applied to the summed (unnormalised) per-row divergence and cross-entropy."""

    kd_coef: float  # kd_weight * (T^2 or 1) / denom: the KD term of the loss
    ce_coef: float  # hard_label_weight / denom: the CE term of the loss
    kd_norm: float  # (T^2 or 1) / denom: the reported "kd" part
    ce_norm: float  # 1 / denom: the reported "ce" part


@dataclass(frozen=True)
class FusedKDSpec:
    """Everything a backend needs; row tensors other than the hidden states are restricted to the valid rows."""

    student: HeadRows
    teacher: HeadRows | None  # dense teacher given by hidden states + head (detached)
    teacher_logits: torch.Tensor | None  # [N, V] dense teacher logits (detached)
    topk: TopKTeacher | None  # sparse teacher
    rows: torch.Tensor  # [n_valid] int64 indices of the valid rows
    labels: torch.Tensor | None  # [n_valid] int64 labels of the valid rows; set iff the CE term is computed
    mode: str  # "none" | "kl" | "reverse_kl" | "jsd" | "tvd" | "topk"
    temperature: float
    beta: float
    scales: LossScales
    chunk_size: int
    cdtype: torch.dtype  # float32 (float64 for float64 inputs), like the reference
    count_agreement: bool = False  # also count student/teacher top-1 matches (an argmax per chunk on each side)
    exact_head: ExactHead | None = None  # a dense teacher's exact head: its rows are rebuilt around it per chunk

    @property
    def need_ce(self) -> bool:
        return self.labels is not None

    def needs_student_grad(self) -> bool:
        """Whether autograd will want gradients for the student rows/head (checked outside ``Function.forward``,
        where grad mode is always off)."""
        s = self.student
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (s.x, s.w, s.b))


# ----------------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------------


def check_divergence(divergence) -> str:
    """The canonical divergence name for ``divergence`` (a registry name or alias, any case)."""
    if not isinstance(divergence, str) or divergence.lower() not in DIVERGENCE_ALIASES:
        raise ValueError(f"divergence must be one of {sorted(set(DIVERGENCE_ALIASES))}, got {divergence!r}")
    return DIVERGENCE_ALIASES[divergence.lower()]


def check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_student(xs, ws, bs) -> tuple[int, int]:
    """Validate the student rows and head; returns ``(N, V)``."""
    if not (torch.is_tensor(xs) and xs.dim() == 2):
        raise ValueError(
            f"student_hidden must be a 2-D [N, H] tensor (flatten and shift first), got "
            f"{tuple(xs.shape) if torch.is_tensor(xs) else type(xs).__name__}"
        )
    if not (torch.is_tensor(ws) and ws.dim() == 2):
        raise ValueError("student_head_weight must be a 2-D [V, H] tensor (nn.Linear.weight)")
    n, h = xs.shape
    v = ws.shape[0]
    if ws.shape[1] != h:
        raise ValueError(
            f"student_head_weight has shape {tuple(ws.shape)} but student_hidden has hidden size {h}: expected [V, {h}]"
        )
    if xs.dtype != ws.dtype:
        raise ValueError(
            f"student_hidden ({xs.dtype}) and student_head_weight ({ws.dtype}) must share a dtype. Under "
            "torch.autocast the plain path runs lm_head in the autocast dtype: pass hidden.to(dtype) and "
            "weight.to(dtype) (both casts are differentiable), e.g. dtype=torch.get_autocast_dtype('cuda')."
        )
    if not xs.is_floating_point():
        raise ValueError(f"student_hidden must be floating point, got {xs.dtype}")
    if bs is not None and tuple(bs.shape) != (v,):
        raise ValueError(f"student_head_bias has shape {tuple(bs.shape)}, expected ({v},)")
    return n, v


def _check_options(*, chunk_size, temperature, divergence, beta, topk_tail, hard_label_weight, kd_weight) -> str:
    """Validate the scalar options; returns the canonical divergence name."""
    check_chunk_size(chunk_size)
    if temperature is None or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    div = check_divergence(divergence)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")
    if topk_tail not in ("bucket", "renormalize"):
        raise ValueError(f"topk_tail must be 'bucket' or 'renormalize', got {topk_tail!r}")
    if hard_label_weight < 0 or kd_weight < 0:
        raise ValueError(f"kd_weight and hard_label_weight must be >= 0, got {kd_weight}, {hard_label_weight}")
    return div


def _check_one_teacher(teacher_hidden, teacher_logits, teacher_topk, kd_weight) -> None:
    sources = [
        name
        for name, val in (
            ("teacher_hidden", teacher_hidden),
            ("teacher_logits", teacher_logits),
            ("teacher_topk", teacher_topk),
        )
        if val is not None
    ]
    if len(sources) > 1:
        raise ValueError(f"pass exactly one teacher signal, got {sources}")
    if not sources and kd_weight > 0:
        raise ValueError(
            "no teacher signal: pass teacher_hidden + teacher_head_weight, teacher_logits or "
            "teacher_topk (or set kd_weight=0 for a fused hard-label cross-entropy only)"
        )


def _dense_teacher(xt, wt, bt, n: int, v: int) -> HeadRows | None:
    """The detached dense teacher (hidden states + head), or None when ``teacher_hidden`` is absent."""
    if xt is None:
        if wt is not None:
            raise ValueError("teacher_head_weight was given without teacher_hidden")
        return None
    if wt is None:
        raise ValueError("teacher_hidden needs teacher_head_weight ([V, H_teacher])")
    if xt.dim() != 2 or xt.shape[0] != n:
        raise ValueError(
            f"teacher_hidden has shape {tuple(xt.shape)} but student_hidden has {n} rows: expected "
            f"[{n}, H_teacher] (the same flattened, shifted tokens)"
        )
    if wt.dim() != 2 or wt.shape[1] != xt.shape[1]:
        raise ValueError(
            f"teacher_head_weight has shape {tuple(wt.shape)} but teacher_hidden has hidden size "
            f"{xt.shape[1]}: expected [V, {xt.shape[1]}]"
        )
    if wt.shape[0] != v:
        raise ValueError(
            f"teacher vocabulary ({wt.shape[0]}, from teacher_head_weight) differs from the "
            f"student's ({v}); align the vocabularies first (DistillationConfig.vocab_alignment)"
        )
    if xt.dtype != wt.dtype:
        raise ValueError(f"teacher_hidden ({xt.dtype}) and teacher_head_weight ({wt.dtype}) must share a dtype")
    if bt is not None and tuple(bt.shape) != (v,):
        raise ValueError(f"teacher_head_bias has shape {tuple(bt.shape)}, expected ({v},)")
    return HeadRows(xt.detach(), wt.detach(), bt.detach() if bt is not None else None)


def _teacher_logits(teacher_logits, n: int, v: int) -> torch.Tensor | None:
    if teacher_logits is None:
        return None
    if tuple(teacher_logits.shape) != (n, v):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected [{n}, {v}] "
            "(student rows x student vocabulary)"
        )
    return teacher_logits.detach()


# ----------------------------------------------------------------------------------------------------------------------
# rows, labels, mode, scales
# ----------------------------------------------------------------------------------------------------------------------


def _valid_rows(labels, mask, n: int, ignore_index: int, device: torch.device) -> torch.Tensor:
    """Indices of the rows whose label is not ``ignore_index`` and whose ``mask`` entry is set."""
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but student_hidden has {n} rows: pass one "
                f"label per row, shape [{n}] (flatten and shift by one first for causal LMs)"
            )
        valid = labels.to(device) != ignore_index
    else:
        valid = torch.ones(n, dtype=torch.bool, device=device)
    if mask is not None:
        if tuple(mask.shape) != (n,):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [{n}]")
        valid = valid & mask.to(device).bool()
    return valid.nonzero().squeeze(1)


def _ce_labels(labels, rows: torch.Tensor, v: int, ignore_index: int, hard_label_weight: float):
    """The valid rows' labels when the cross-entropy term is computed (``hard_label_weight > 0``), else None."""
    if not hard_label_weight > 0:
        return None
    if labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    labels_valid = labels.to(rows.device)[rows].long()
    if labels_valid.numel() and (int(labels_valid.min()) < 0 or int(labels_valid.max()) >= v):
        raise ValueError(
            f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}; got range "
            f"[{int(labels_valid.min())}, {int(labels_valid.max())}]"
        )
    return labels_valid


def _row_divergence(div: str, beta: float) -> str:
    """JSD at ``beta = 0`` / ``1`` is forward / reverse KL (TRL's convention, as in the reference)."""
    if div == "jsd" and beta == 0.0:
        return "kl"
    if div == "jsd" and beta == 1.0:
        return "reverse_kl"
    return div


def _topk_teacher(teacher_topk, rows: torch.Tensor, n: int, v: int, div: str, beta: float, tail: str):
    if teacher_topk is None:
        return None
    idx, lp = check_topk(teacher_topk, v, torch.Size((n,)))
    return TopKTeacher(
        idx=idx.to(rows.device)[rows].long(),
        log_probs=lp.to(rows.device)[rows],
        row_fn=divergence_row_fn(div, beta),
        tail=tail,
    )


def _exact_head(teacher_exact_head, rows: torch.Tensor, n: int, v: int, dense: bool) -> ExactHead | None:
    if teacher_exact_head is None:
        return None
    if not dense:
        raise ValueError(
            "teacher_exact_head refines a dense teacher: pass it with teacher_hidden + teacher_head_weight or "
            "teacher_logits"
        )
    idx, lp = check_topk(teacher_exact_head, v, torch.Size((n,)), name="teacher_exact_head")
    if idx.shape[-1] >= v:
        raise ValueError(f"teacher_exact_head holds {idx.shape[-1]} tokens per row; it must leave a tail (< {v})")
    return ExactHead(idx=idx.to(rows.device)[rows].long(), log_probs=lp.to(rows.device)[rows].float())


def _loss_scales(*, div, temperature, t2_scale, n_valid, num_items_in_batch, kd_weight, hard_label_weight):
    scale = temperature**2 if (t2_scale if t2_scale is not None else div != "tvd") else 1.0
    denom = float(num_items_in_batch) if num_items_in_batch is not None else float(max(n_valid, 1))
    return LossScales(
        kd_coef=kd_weight * scale / denom, ce_coef=hard_label_weight / denom, kd_norm=scale / denom, ce_norm=1.0 / denom
    )


def prepare_spec(
    student_hidden,
    student_head_weight,
    teacher_hidden,
    teacher_head_weight,
    *,
    teacher_logits,
    teacher_topk,
    labels,
    mask,
    student_head_bias,
    teacher_head_bias,
    divergence,
    beta,
    temperature,
    hard_label_weight,
    kd_weight,
    ignore_index,
    chunk_size,
    num_items_in_batch,
    topk_tail,
    t2_scale,
    count_agreement=False,
    teacher_exact_head=None,
) -> FusedKDSpec:
    """Validate the arguments of :func:`~kd_plugins.kernels.fused_linear_kd_loss` (same names) into a spec."""
    xs = student_hidden
    n, v = _check_student(xs, student_head_weight, student_head_bias)
    div = _check_options(
        chunk_size=chunk_size,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        topk_tail=topk_tail,
        hard_label_weight=hard_label_weight,
        kd_weight=kd_weight,
    )
    _check_one_teacher(teacher_hidden, teacher_logits, teacher_topk, kd_weight)
    teacher = _dense_teacher(teacher_hidden, teacher_head_weight, teacher_head_bias, n, v)
    tlog = _teacher_logits(teacher_logits, n, v)
    rows = _valid_rows(labels, mask, n, ignore_index, xs.device)
    labels_valid = _ce_labels(labels, rows, v, ignore_index, hard_label_weight)
    div = _row_divergence(div, beta)
    topk = _topk_teacher(teacher_topk, rows, n, v, div, beta, topk_tail)
    exact = _exact_head(teacher_exact_head, rows, n, v, dense=teacher is not None or tlog is not None)
    mode = "none" if not kd_weight > 0 else ("topk" if topk is not None else div)
    scales = _loss_scales(
        div=div,
        temperature=temperature,
        t2_scale=t2_scale,
        n_valid=int(rows.numel()),
        num_items_in_batch=num_items_in_batch,
        kd_weight=kd_weight,
        hard_label_weight=hard_label_weight,
    )
    return FusedKDSpec(
        student=HeadRows(xs, student_head_weight, student_head_bias),
        teacher=teacher,
        teacher_logits=tlog,
        topk=topk,
        rows=rows,
        labels=labels_valid,
        mode=mode,
        temperature=float(temperature),
        beta=float(beta),
        scales=scales,
        chunk_size=chunk_size,
        cdtype=torch.float64 if xs.dtype == torch.float64 else torch.float32,
        count_agreement=bool(count_agreement),
        exact_head=exact,
    )
