"""Memory-efficient fused ``lm_head`` + distillation loss (chunked PyTorch autograd Function).

The naive way to distil a causal LM computes ``student_logits = h_s @ W_s.T`` and ``teacher_logits = h_t @ W_t.T``
for every token (``[N, V]`` each, 0.8-8.6 GB per matrix in float32 at ``N=16384``, ``V=49k-131k``), then their
log-softmaxes, the divergence, and the gradient of the logits: several ``[N, V]`` matrices alive at once.
:func:`fused_linear_kd_loss` never materialises them. It walks the (valid) rows in chunks of ``chunk_size``; for each
chunk it computes the student (and teacher) logits, the per-row divergence, the hard-label cross-entropy, and the
*analytic* gradient of the loss with respect to the chunk's student logits, and immediately folds that gradient
into ``grad_hidden = g @ W`` and ``grad_W += g.T @ h`` (Liger-Kernel style: the gradients are produced in the forward
pass, so backward only scales them by the incoming gradient). Peak memory is ``O(chunk_size * V)`` on top of the
parameter-sized gradient buffers, independent of ``N``.

The objective is *exactly* the reference loss of :mod:`kd_plugins.losses` evaluated on ``h @ W.T (+ b)``:

* ``divergence="kl"``: :func:`~kd_plugins.losses.kl_divergence` (``T^2 * KL(p_T || q_S)``)
* ``"reverse_kl"``: :func:`~kd_plugins.losses.reverse_kl_divergence` (``T^2 * KL(q_S || p_T)``)
* ``"jsd"``: :func:`~kd_plugins.losses.generalized_jsd` with ``beta`` (``beta=0``/``1`` are forward/reverse KL,
  TRL's convention, as in the reference)
* ``"tvd"``: :func:`~kd_plugins.losses.total_variation_distance` (not ``T^2``-scaled)

with the same row masking (``labels == ignore_index`` rows are dropped; an optional boolean ``mask``), the same
``num_items_in_batch`` normalisation (sum over valid rows divided by it, else by the number of valid rows) and the same
sparse top-k teacher handling (``teacher_topk=(indices, log_probs)``, tail bucket or renormalised). The total loss is
``kd_weight * kd + hard_label_weight * ce`` where ``ce`` is the standard hard-label cross-entropy on the raw
(temperature 1) student logits over the same rows with the same normaliser. The teacher is treated as a constant:
no gradient flows to ``teacher_hidden``/``teacher_head_weight``/``teacher_logits``.

Limitations: no double backward (the gradient is computed analytically); the loss is always the ``"mean"`` reduction
(sum / normaliser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from kd_plugins.losses._common import IGNORE_INDEX, check_topk, kl_rows, log1mexp, log_mix

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "fused_kd_loss_from_heads",
    "check_fusable_head",
    "UnfusableHeadError",
    "DIVERGENCE_ALIASES",
]

#: Accepted ``divergence`` names (the loss registry's names and aliases) -> canonical name.
DIVERGENCE_ALIASES = {
    "kl": "kl", "forward_kl": "kl", "fkl": "kl", "hinton": "kl",
    "reverse_kl": "reverse_kl", "rkl": "reverse_kl",
    "jsd": "jsd", "gkd": "jsd", "generalized_jsd": "jsd",
    "tvd": "tvd", "total_variation": "tvd",
}
_BACKENDS = ("torch", "triton", "auto")


@dataclass
class _Spec:
    """Validated inputs shared by the PyTorch and Triton paths (all row tensors restricted to valid rows)."""

    xs: torch.Tensor              # [N, H] student hidden
    ws: torch.Tensor              # [V, H]
    bs: torch.Tensor | None       # [V]
    xt: torch.Tensor | None       # [N, Ht] teacher hidden (dense-hidden teacher)
    wt: torch.Tensor | None       # [V, Ht]
    bt: torch.Tensor | None
    tl: torch.Tensor | None       # [N, V] dense teacher logits
    topk_idx: torch.Tensor | None  # [n_valid, K] int64 (valid rows only)
    topk_lp: torch.Tensor | None   # [n_valid, K] float (valid rows only)
    labels_valid: torch.Tensor | None  # [n_valid] int64 labels of the valid rows (for CE)
    rows: torch.Tensor            # [n_valid] int64 indices of the valid rows
    mode: str                     # "none" | "kl" | "reverse_kl" | "jsd" | "tvd" | "topk"
    topk_row_fn: Any              # row function for the sparse path
    topk_tail: str
    temperature: float
    beta: float
    kd_coef: float                # kd_weight * (T^2 or 1) / denom  (per valid row, on the unscaled divergence)
    ce_coef: float                # hard_label_weight / denom
    kd_norm: float                # (T^2 or 1) / denom -> the reported "kd" part
    ce_norm: float                # 1 / denom -> the reported "ce" part
    need_ce: bool
    chunk_size: int
    cdtype: torch.dtype           # float32 (float64 for float64 inputs), like the reference


def _row_fn(name: str, beta: float):
    """Per-row divergence on log-probabilities (same helpers and conventions as ``kd_plugins.losses.logit``)."""
    if name == "kl":
        return kl_rows
    if name == "reverse_kl":
        return lambda lp, lq: kl_rows(lq, lp)
    if name == "jsd":
        def jsd(lp, lq):
            lm = log_mix(lp, lq, beta)
            return beta * kl_rows(lp, lm) + (1.0 - beta) * kl_rows(lq, lm)
        return jsd
    if name == "tvd":
        return lambda lp, lq: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise AssertionError(name)


def _prepare(
    student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, *, teacher_logits, teacher_topk,
    labels, mask, student_head_bias, teacher_head_bias, divergence, beta, temperature, hard_label_weight, kd_weight,
    ignore_index, chunk_size, num_items_in_batch, topk_tail, t2_scale,
) -> _Spec:
    xs, ws = student_hidden, student_head_weight
    if not (torch.is_tensor(xs) and xs.dim() == 2):
        raise ValueError(f"student_hidden must be a 2-D [N, H] tensor (flatten and shift first), got "
                         f"{tuple(xs.shape) if torch.is_tensor(xs) else type(xs).__name__}")
    if not (torch.is_tensor(ws) and ws.dim() == 2):
        raise ValueError("student_head_weight must be a 2-D [V, H] tensor (nn.Linear.weight)")
    n, h = xs.shape
    v = ws.shape[0]
    if ws.shape[1] != h:
        raise ValueError(f"student_head_weight has shape {tuple(ws.shape)} but student_hidden has hidden size {h}: "
                         f"expected [V, {h}]")
    if xs.dtype != ws.dtype:
        raise ValueError(
            f"student_hidden ({xs.dtype}) and student_head_weight ({ws.dtype}) must share a dtype. Under "
            "torch.autocast the plain path runs lm_head in the autocast dtype: pass hidden.to(dtype) and "
            "weight.to(dtype) (both casts are differentiable), e.g. dtype=torch.get_autocast_dtype('cuda').")
    if not (xs.is_floating_point()):
        raise ValueError(f"student_hidden must be floating point, got {xs.dtype}")
    if student_head_bias is not None and tuple(student_head_bias.shape) != (v,):
        raise ValueError(f"student_head_bias has shape {tuple(student_head_bias.shape)}, expected ({v},)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if temperature is None or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not isinstance(divergence, str) or divergence.lower() not in DIVERGENCE_ALIASES:
        raise ValueError(f"divergence must be one of {sorted(set(DIVERGENCE_ALIASES))}, got {divergence!r}")
    div = DIVERGENCE_ALIASES[divergence.lower()]
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")
    if topk_tail not in ("bucket", "renormalize"):
        raise ValueError(f"topk_tail must be 'bucket' or 'renormalize', got {topk_tail!r}")
    if hard_label_weight < 0 or kd_weight < 0:
        raise ValueError(f"kd_weight and hard_label_weight must be >= 0, got {kd_weight}, {hard_label_weight}")

    sources = [name for name, val in (("teacher_hidden", teacher_hidden), ("teacher_logits", teacher_logits),
                                      ("teacher_topk", teacher_topk)) if val is not None]
    if len(sources) > 1:
        raise ValueError(f"pass exactly one teacher signal, got {sources}")
    if not sources and kd_weight > 0:
        raise ValueError("no teacher signal: pass teacher_hidden + teacher_head_weight, teacher_logits or "
                         "teacher_topk (or set kd_weight=0 for a fused hard-label cross-entropy only)")
    xt = wt = bt = tlog = None
    if teacher_hidden is not None:
        xt, wt, bt = teacher_hidden, teacher_head_weight, teacher_head_bias
        if wt is None:
            raise ValueError("teacher_hidden needs teacher_head_weight ([V, H_teacher])")
        if xt.dim() != 2 or xt.shape[0] != n:
            raise ValueError(f"teacher_hidden has shape {tuple(xt.shape)} but student_hidden has {n} rows: expected "
                             f"[{n}, H_teacher] (the same flattened, shifted tokens)")
        if wt.dim() != 2 or wt.shape[1] != xt.shape[1]:
            raise ValueError(f"teacher_head_weight has shape {tuple(wt.shape)} but teacher_hidden has hidden size "
                             f"{xt.shape[1]}: expected [V, {xt.shape[1]}]")
        if wt.shape[0] != v:
            raise ValueError(f"teacher vocabulary ({wt.shape[0]}, from teacher_head_weight) differs from the "
                             f"student's ({v}); align the vocabularies first (DistillationConfig.vocab_alignment)")
        if xt.dtype != wt.dtype:
            raise ValueError(f"teacher_hidden ({xt.dtype}) and teacher_head_weight ({wt.dtype}) must share a dtype")
        if bt is not None and tuple(bt.shape) != (v,):
            raise ValueError(f"teacher_head_bias has shape {tuple(bt.shape)}, expected ({v},)")
        xt, wt = xt.detach(), wt.detach()
        bt = bt.detach() if bt is not None else None
    elif teacher_head_weight is not None:
        raise ValueError("teacher_head_weight was given without teacher_hidden")
    if teacher_logits is not None:
        if tuple(teacher_logits.shape) != (n, v):
            raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, expected [{n}, {v}] "
                             "(student rows x student vocabulary)")
        tlog = teacher_logits.detach()

    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels has shape {tuple(labels.shape)} but student_hidden has {n} rows: pass one "
                             f"label per row, shape [{n}] (flatten and shift by one first for causal LMs)")
        valid = labels.to(xs.device) != ignore_index
    else:
        valid = torch.ones(n, dtype=torch.bool, device=xs.device)
    if mask is not None:
        if tuple(mask.shape) != (n,):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [{n}]")
        valid = valid & mask.to(xs.device).bool()
    rows = valid.nonzero().squeeze(1)

    need_ce = hard_label_weight > 0
    labels_valid = None
    if need_ce:
        if labels is None:
            raise ValueError("hard_label_weight > 0 needs labels")
        labels_valid = labels.to(xs.device)[rows].long()
        if labels_valid.numel() and (int(labels_valid.min()) < 0 or int(labels_valid.max()) >= v):
            raise ValueError(f"labels must lie in [0, {v}) or equal ignore_index={ignore_index}; got range "
                             f"[{int(labels_valid.min())}, {int(labels_valid.max())}]")

    topk_idx = topk_lp = None
    topk_row_fn = None
    mode = div if kd_weight > 0 else "none"
    if div == "jsd" and beta == 0.0:
        div = "kl"
    elif div == "jsd" and beta == 1.0:
        div = "reverse_kl"
    if kd_weight > 0:
        mode = div
    if teacher_topk is not None:
        idx, lp = check_topk(teacher_topk, v, torch.Size((n,)))
        topk_idx = idx.to(xs.device)[rows].long()
        topk_lp = lp.to(xs.device)[rows]
        topk_row_fn = _row_fn(div, beta)
        if kd_weight > 0:
            mode = "topk"

    scale = temperature**2 if (t2_scale if t2_scale is not None else div != "tvd") else 1.0
    n_valid = int(rows.numel())
    if num_items_in_batch is not None:
        denom = float(num_items_in_batch)
    else:
        denom = float(max(n_valid, 1))
    return _Spec(
        xs=xs, ws=ws, bs=student_head_bias, xt=xt, wt=wt, bt=bt, tl=tlog, topk_idx=topk_idx, topk_lp=topk_lp,
        labels_valid=labels_valid, rows=rows, mode=mode, topk_row_fn=topk_row_fn, topk_tail=topk_tail,
        temperature=float(temperature), beta=float(beta), kd_coef=kd_weight * scale / denom,
        ce_coef=hard_label_weight / denom, kd_norm=scale / denom, ce_norm=1.0 / denom, need_ce=need_ce,
        chunk_size=chunk_size, cdtype=torch.float64 if xs.dtype == torch.float64 else torch.float32,
    )


def topk_rows_and_grad(log_q_k: torch.Tensor, lp: torch.Tensor, row_fn, topk_tail: str, need_grad: bool):
    """Sparse-teacher divergence per row on the ``[n, K]`` student log-probs at the teacher's top-k tokens.

    Builds the same ``K (+1 tail bucket)`` support as :func:`kd_plugins.losses._common.log_prob_pair` and returns
    ``(rows, G)`` with ``G = d sum(rows) / d log_q_k`` (via autograd on the small ``[n, K]`` tensors).
    """
    with torch.enable_grad():
        lq = log_q_k.detach().requires_grad_(need_grad)
        lpf = lp.to(lq.dtype)
        if topk_tail == "bucket":
            p_tail = log1mexp(torch.logsumexp(lpf, dim=-1, keepdim=True).clamp(max=-1e-7))
            q_tail = log1mexp(torch.logsumexp(lq, dim=-1, keepdim=True).clamp(max=-1e-7))
            log_p, log_q = torch.cat([lpf, p_tail], -1), torch.cat([lq, q_tail], -1)
        else:
            log_p = lpf - torch.logsumexp(lpf, -1, keepdim=True)
            log_q = lq - torch.logsumexp(lq, -1, keepdim=True)
        per_row = row_fn(log_p, log_q)
        grad = torch.autograd.grad(per_row.sum(), lq)[0] if need_grad and per_row.numel() else None
    return per_row.detach(), grad


def _zero_where(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return x.masked_fill_(cond, 0.0)


def _dense_chunk(s: torch.Tensor, t: torch.Tensor, mode: str, beta: float, need_grad: bool):
    """Divergence rows and ``d rows / d s`` for one chunk of scaled logits ``s`` (student) and ``t`` (teacher).

    ``s`` and ``t`` are float32 buffers owned by the caller and are overwritten. Mirrors ``kl_rows`` conventions:
    terms with zero probability mass contribute 0 (and no gradient).
    """
    log_q = s.sub_(torch.logsumexp(s, -1, keepdim=True))
    log_p = t.sub_(torch.logsumexp(t, -1, keepdim=True))
    if mode == "kl":
        p = log_p.exp()
        d = torch.sub(log_p, log_q)
        d.mul_(p)
        _zero_where(d, p <= 0)
        rows = d.sum(-1)
        if not need_grad:
            return rows, None
        torch.exp(log_q, out=d)
        return rows, d.sub_(p)                                   # q - p
    if mode == "reverse_kl":
        q = log_q.exp()
        f = log_q.sub_(log_p)                                    # log q - log p (in place on s)
        qf = torch.mul(q, f, out=log_p)
        zero = q <= 0
        _zero_where(qf, zero)
        rows = qf.sum(-1)
        if not need_grad:
            return rows, None
        g = f.sub_(rows.unsqueeze(-1)).mul_(q)                   # q (log q - log p - L)
        return rows, _zero_where(g, zero)
    if mode == "jsd":
        p = log_p.exp()
        q = log_q.exp()
        log_m = torch.mul(p, beta).add_(q, alpha=1.0 - beta).log_()
        a = log_p.sub_(log_m).mul_(p)                            # p log(p/m)
        _zero_where(a, p <= 0)
        rows_p = a.sum(-1)
        del a, p
        b = log_q.sub_(log_m)                                    # log(q/m) (in place on s)
        qb = torch.mul(q, b, out=log_m)
        zero = q <= 0
        _zero_where(qb, zero)
        rows_q = qb.sum(-1)
        rows = beta * rows_p + (1.0 - beta) * rows_q
        if not need_grad:
            return rows, None
        c = ((1.0 - beta) * rows_q).unsqueeze(-1)
        g = b.mul_(1.0 - beta).sub_(c).mul_(q)                   # q ((1-beta) log(q/m) - c)
        return rows, _zero_where(g, zero)
    if mode == "tvd":
        p = log_p.exp_()
        q = log_q.exp_()
        diff = torch.sub(q, p)
        sg = torch.sign(diff, out=p)
        rows = diff.abs_().sum(-1).mul_(0.5)
        if not need_grad:
            return rows, None
        del diff
        qs = sg.mul_(q)                                          # q sign(q - p)
        c = qs.sum(-1, keepdim=True).mul_(0.5)
        return rows, qs.mul_(0.5).sub_(q.mul_(c))                # q (0.5 sign(q - p) - c)
    raise AssertionError(mode)


def _logits_chunk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    z = torch.mm(x, w.t()) if b is None else torch.addmm(b.to(x.dtype), x, w.t())
    return z if z.dtype == cdtype else z.to(cdtype)


def _chunk_loss_and_grad(spec: _Spec, lo: int, hi: int, need_grad: bool):
    """Loss parts (summed, unnormalised) and ``d loss / d z`` for valid rows ``rows[lo:hi]``.

    Returns ``(kd_sum, ce_sum, g)`` where ``g`` is the float32 gradient of
    ``kd_coef * sum(kd_rows) + ce_coef * sum(ce_rows)`` with respect to the raw student logits ``z`` (or None).
    """
    r = spec.rows[lo:hi]
    x = spec.xs.index_select(0, r)
    z = _logits_chunk(x, spec.ws, spec.bs, spec.cdtype)
    g = None
    ce_sum = kd_sum = None
    inv_t = 1.0 / spec.temperature
    if spec.need_ce:
        y = spec.labels_valid[lo:hi].unsqueeze(-1)
        lse1 = torch.logsumexp(z, -1, keepdim=True)
        ce_sum = (lse1 - z.gather(-1, y)).sum()
        if need_grad:
            g = torch.sub(z, lse1).exp_().mul_(spec.ce_coef)
            g.scatter_add_(-1, y, torch.full_like(lse1, -spec.ce_coef))
    if spec.mode == "none":
        return kd_sum, ce_sum, g
    s = z.mul_(inv_t) if spec.temperature != 1.0 else z
    if spec.mode == "topk":
        lse_s = torch.logsumexp(s, -1, keepdim=True)
        idx = spec.topk_idx[lo:hi]
        log_q_k = s.gather(-1, idx).sub_(lse_s)
        rows_kd, gk = topk_rows_and_grad(log_q_k, spec.topk_lp[lo:hi], spec.topk_row_fn, spec.topk_tail, need_grad)
        kd_sum = rows_kd.sum()
        if need_grad:
            q = s.sub_(lse_s).exp_()
            gkd = q.mul_(-gk.sum(-1, keepdim=True)).scatter_add_(-1, idx, gk)
    else:
        if spec.xt is not None:
            t = _logits_chunk(spec.xt.index_select(0, r), spec.wt, spec.bt, spec.cdtype)
        else:
            t = spec.tl.index_select(0, r).to(spec.cdtype)  # index_select copies: safe to overwrite
        if spec.temperature != 1.0:
            t.mul_(inv_t)
        rows_kd, gkd = _dense_chunk(s, t, spec.mode, spec.beta, need_grad)
        kd_sum = rows_kd.sum()
    if need_grad:
        coef = spec.kd_coef * inv_t
        if g is None:
            g = gkd.mul_(coef)
        else:
            g.add_(gkd, alpha=coef)
    return kd_sum, ce_sum, g


class _FusedLinearKDFunction(torch.autograd.Function):
    """Chunked forward that also produces the gradients (grads are scaled by ``grad_output`` in backward)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, spec: _Spec, need_grad: bool):
        # ``need_grad`` is captured by the caller: grad mode is always off inside ``forward``.
        dev = xs.device
        kd_total = torch.zeros((), dtype=spec.cdtype, device=dev)
        ce_total = torch.zeros((), dtype=spec.cdtype, device=dev)
        gx = gw = gb = None
        if need_grad:
            gx = torch.zeros_like(xs) if ctx.needs_input_grad[0] else None
            gw = torch.zeros(ws.shape, dtype=spec.cdtype, device=dev) if ctx.needs_input_grad[1] else None
            gb = torch.zeros(ws.shape[0], dtype=spec.cdtype, device=dev) if (
                bs is not None and ctx.needs_input_grad[2]) else None
        n_valid = spec.rows.numel()
        for lo in range(0, n_valid, spec.chunk_size):
            hi = min(lo + spec.chunk_size, n_valid)
            kd_sum, ce_sum, g = _chunk_loss_and_grad(spec, lo, hi, need_grad)
            if kd_sum is not None:
                kd_total += kd_sum
            if ce_sum is not None:
                ce_total += ce_sum
            if g is None:
                continue
            if gb is not None:
                gb += g.sum(0)
            g = g.to(xs.dtype)
            if gx is not None:
                gx.index_copy_(0, spec.rows[lo:hi], torch.mm(g, ws))
            if gw is not None:
                x = xs.index_select(0, spec.rows[lo:hi])
                if gw.dtype == x.dtype:
                    gw.addmm_(g.t(), x)
                else:
                    gw += torch.mm(g.t(), x)
            del g
        kd = kd_total * spec.kd_norm
        ce = ce_total * spec.ce_norm
        loss = kd_total * spec.kd_coef + ce_total * spec.ce_coef
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (gx, gw, gb)))
        ctx.has = (gx is not None, gw is not None, gb is not None)
        ctx.dtypes = (xs.dtype, ws.dtype, bs.dtype if bs is not None else None)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _gkd, _gce):
        saved = ctx.saved_tensors
        out = []
        for has, t, dt in zip(ctx.has, saved, ctx.dtypes):
            out.append((t * grad_loss).to(dt) if has else None)
        return out[0], out[1], out[2], None, None


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    topk_tail: str = "bucket",
    t2_scale: bool | None = None,
    backend: str = "torch",
    return_parts: bool = False,
):
    """Distillation loss of ``student_hidden @ student_head_weight.T (+ bias)`` without materialising the logits.

    Args:
        student_hidden: ``[N, H]`` rows feeding the student's ``lm_head`` (flattened and shifted by the caller:
            row ``i`` predicts ``labels[i]``).
        student_head_weight / student_head_bias: the student ``lm_head`` parameters ``[V, H]`` / ``[V]``.
        teacher_hidden, teacher_head_weight (teacher_head_bias): dense teacher given by its last hidden states
            ``[N, Ht]`` and ``lm_head`` ``[V, Ht]`` (its logits are computed chunk by chunk too). Alternatively
            ``teacher_logits`` ``[N, V]`` or ``teacher_topk = (indices [N, K], log_probs [N, K])``.
        labels: ``[N]`` targets; rows equal to ``ignore_index`` are excluded from every term.
        mask: optional ``[N]`` boolean row mask (AND-ed with the labels' mask).
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or ``"tvd"`` (registry aliases accepted).
        temperature: softens both distributions; KL-family divergences are multiplied by ``T^2`` (``t2_scale``).
        hard_label_weight / kd_weight: ``loss = kd_weight * kd + hard_label_weight * ce``.
        chunk_size: rows per chunk; peak extra memory is about ``5 * chunk_size * V * 4`` bytes.
        num_items_in_batch: divide the summed loss by this count instead of the number of valid rows.
        backend: ``"torch"`` (chunked PyTorch, any device), ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on CUDA tensors when triton imports, else torch).
        return_parts: also return ``{"kd": ..., "ce": ...}`` (detached, unweighted, normalised like the loss); a
            term that is not computed (``kd_weight == 0`` / ``hard_label_weight == 0``) is absent.

    Returns:
        The scalar float32 loss, or ``(loss, parts)`` with ``return_parts=True``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    spec = _prepare(
        student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, teacher_logits=teacher_logits,
        teacher_topk=teacher_topk, labels=labels, mask=mask, student_head_bias=student_head_bias,
        teacher_head_bias=teacher_head_bias, divergence=divergence, beta=beta, temperature=temperature,
        hard_label_weight=hard_label_weight, kd_weight=kd_weight, ignore_index=ignore_index,
        chunk_size=chunk_size, num_items_in_batch=num_items_in_batch, topk_tail=topk_tail, t2_scale=t2_scale,
    )
    if backend == "auto":
        backend = "torch"
        if student_hidden.is_cuda:
            from . import triton_available
            if triton_available():
                backend = "triton"
    if backend == "triton":
        from . import _require_triton_runtime
        _require_triton_runtime(student_hidden)
        from .triton_fused_kd import triton_fused_linear_kd
        loss, kd, ce = triton_fused_linear_kd(spec)
    else:
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_hidden, student_head_weight, student_head_bias))
        loss, kd, ce = _FusedLinearKDFunction.apply(student_hidden, student_head_weight, student_head_bias, spec,
                                                    need_grad)
    if return_parts:
        parts = {}
        if spec.mode != "none":
            parts["kd"] = kd
        if spec.need_ce:
            parts["ce"] = ce
        return loss, parts
    return loss


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`: hyper-parameters in ``__init__``, tensors in ``forward``.

    >>> crit = FusedLinearKDLoss(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.5)
    >>> loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels=labels)
    """

    def __init__(self, divergence: str = "kl", *, beta: float = 0.5, temperature: float = 1.0,
                 hard_label_weight: float = 0.0, kd_weight: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 chunk_size: int = 1024, topk_tail: str = "bucket", t2_scale: bool | None = None,
                 backend: str = "torch"):
        super().__init__()
        # Validate eagerly so that a bad config fails at construction time.
        if not isinstance(divergence, str) or divergence.lower() not in DIVERGENCE_ALIASES:
            raise ValueError(f"divergence must be one of {sorted(set(DIVERGENCE_ALIASES))}, got {divergence!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.hard_label_weight, self.kd_weight, self.ignore_index = hard_label_weight, kd_weight, ignore_index
        self.chunk_size, self.topk_tail, self.t2_scale, self.backend = chunk_size, topk_tail, t2_scale, backend

    def forward(self, student_hidden, student_head_weight, teacher_hidden=None, teacher_head_weight=None, *,
                teacher_logits=None, teacher_topk=None, labels=None, mask=None, student_head_bias=None,
                teacher_head_bias=None, num_items_in_batch=None, return_parts: bool = False):
        return fused_linear_kd_loss(
            student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, teacher_logits=teacher_logits,
            teacher_topk=teacher_topk, labels=labels, mask=mask, student_head_bias=student_head_bias,
            teacher_head_bias=teacher_head_bias, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, hard_label_weight=self.hard_label_weight, kd_weight=self.kd_weight,
            ignore_index=self.ignore_index, chunk_size=self.chunk_size, num_items_in_batch=num_items_in_batch,
            topk_tail=self.topk_tail, t2_scale=self.t2_scale, backend=self.backend, return_parts=return_parts)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"hard_label_weight={self.hard_label_weight}, kd_weight={self.kd_weight}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Integration helpers (used by the trainer callback's ``fused_loss=True`` path)
# ----------------------------------------------------------------------------------------------------------------------


class UnfusableHeadError(ValueError):
    """The model's output head is not a plain ``logits = hidden @ W.T + b``; the fused loss would optimise a
    different objective than the plain path, so it refuses instead."""


#: Config attributes that change the logits after the ``lm_head`` matmul -> why the fused path refuses them.
_LOGIT_TRANSFORM_ATTRS = (
    ("final_logit_softcapping", "logit soft-capping `tanh(logits / c) * c` (Gemma-2/3)"),
    ("logit_scale", "logit scaling `logits * logit_scale` (Cohere/Command-R)"),
    ("logits_scaling", "logit scaling `logits / logits_scaling` (Granite)"),
    ("lm_head_multiplier", "logit multiplier `logits * lm_head_multiplier` (Falcon-H1)"),
    ("output_multiplier_scale", "logit multiplier `logits * output_multiplier_scale` (Grok)"),
    ("mup_output_multiplier", "muP output multiplier"),
    ("dim_model_base", "hidden-state rescaling `h / (hidden_size / dim_model_base)` before the head (MiniCPM)"),
)
#: Values meaning "no transform" for the attributes above.
_NEUTRAL = (None, 1, 1.0, False)


def _configs(model):
    cfg = getattr(model, "config", None)
    out = [cfg] if cfg is not None else []
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            text = cfg.get_text_config()
        except Exception:  # pragma: no cover - unusual configs
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def check_fusable_head(model: nn.Module, head: nn.Module | None = None) -> nn.Linear:
    """Return the output head of ``model`` if the fused loss computes exactly the model's logits, else raise.

    The fused loss assumes ``logits = last_hidden_state @ head.weight.T (+ head.bias)``. This checks, in order:

    1. the head (``head`` if given, else ``model.get_output_embeddings()``, else ``model`` itself when it is a bare
       head module) exists and is a plain ``nn.Linear``:
       its class's ``forward`` is ``nn.Linear.forward`` (refuses LoRA/PEFT-wrapped heads, quantised heads such as
       bitsandbytes ``Linear8bitLt``/``Linear4bit``, custom ``forward`` overrides) with a floating-point weight that
       is materialised (not on the ``meta`` device, i.e. not CPU/disk-offloaded);
    2. no forward (pre-)hooks are registered on the head (they may rewrite its input or output);
    3. the model config (and its text sub-config) applies no transform to the logits: Gemma-2/3
       ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
       ``lm_head_multiplier``, Grok ``output_multiplier_scale``, muP ``mup_output_multiplier``, MiniCPM
       ``dim_model_base`` (hidden rescaling); T5-family models with tied embeddings (``d_model**-0.5`` rescaling).

    Tied input/output embeddings are fine when the head is a plain ``nn.Linear`` (the gradient goes to the shared
    weight). Raises :class:`UnfusableHeadError` (a ``ValueError``) naming the reason and the fix
    (``fused_loss=False``).
    """
    name = type(model).__name__
    if head is None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else model  # ``model`` may be the head module itself
    if head is None:
        raise UnfusableHeadError(f"{name} has no output head (get_output_embeddings() returned None); "
                                 "the fused loss needs the lm_head weight. Use fused_loss=False.")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnfusableHeadError(
            f"{name}'s output head is {type(head).__module__}.{type(head).__name__}, not a plain nn.Linear "
            "(LoRA/PEFT-wrapped, quantised or custom heads compute something other than hidden @ W.T + b). "
            "Use fused_loss=False, or merge/unwrap the head first.")
    w = head.weight
    if not torch.is_floating_point(w):
        raise UnfusableHeadError(f"{name}'s lm_head weight has dtype {w.dtype}; the fused loss needs a "
                                 "floating-point weight. Use fused_loss=False.")
    if w.device.type == "meta":
        raise UnfusableHeadError(f"{name}'s lm_head weight is on the meta device (offloaded); the fused loss needs "
                                 "the materialised weight. Use fused_loss=False or keep the head on the GPU.")
    if head._forward_hooks or head._forward_pre_hooks:
        raise UnfusableHeadError(f"{name}'s lm_head has forward hooks registered, which may change its output; the "
                                 "fused loss bypasses the module. Use fused_loss=False or remove the hooks.")
    for cfg in _configs(model):
        for attr, what in _LOGIT_TRANSFORM_ATTRS:
            val = getattr(cfg, attr, None)
            if val not in _NEUTRAL:
                raise UnfusableHeadError(
                    f"{name} applies {what} ({attr}={val!r}); the fused loss computes hidden @ W.T + b only and "
                    "would optimise a different objective. Use fused_loss=False.")
        if getattr(cfg, "model_type", None) in ("t5", "mt5", "umt5", "longt5") and getattr(
                cfg, "tie_word_embeddings", False):
            raise UnfusableHeadError(f"{name} rescales the decoder output by d_model**-0.5 before its tied head; "
                                     "use fused_loss=False.")
    return head


def _cfg_get(config, *names, default=None):
    for n in names:
        if isinstance(config, dict):
            if n in config and config[n] is not None:
                return config[n]
        elif getattr(config, n, None) is not None:
            return getattr(config, n)
    return default


def fused_kd_loss_from_heads(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    labels: torch.Tensor | None,
    config: Any = None,
    *,
    num_items_in_batch=None,
    return_parts: bool = False,
):
    """Fused loss from the two ``lm_head`` modules (integration entry point for the trainer callback).

    ``student_hidden [N, H]`` / ``teacher_hidden [N, Ht]`` are the final hidden states that feed the heads
    (``outputs.hidden_states[-1]`` for Llama-style models), flattened and shifted like ``labels [N]``. Both heads are
    checked with :func:`check_fusable_head` (pass the model itself to check its config as well). ``config`` is an
    object or dict read for (first name found wins; defaults in brackets): ``divergence`` / ``loss`` ["kl"],
    ``temperature`` [1.0], ``beta`` / ``jsd_beta`` [0.5], ``hard_label_weight`` [0.0], ``kd_weight`` [1.0],
    ``fused_chunk_size`` / ``chunk_size`` [1024], ``ignore_index`` [-100], ``topk_tail`` ["bucket"],
    ``fused_backend`` ["torch"].
    """
    s_head = check_fusable_head(student_head)
    t_head = check_fusable_head(teacher_head)
    cfg = config if config is not None else {}
    return fused_linear_kd_loss(
        student_hidden, s_head.weight, teacher_hidden.detach(), t_head.weight.detach(),
        student_head_bias=s_head.bias, teacher_head_bias=t_head.bias.detach() if t_head.bias is not None else None,
        labels=labels,
        divergence=_cfg_get(cfg, "divergence", "loss", default="kl"),
        temperature=float(_cfg_get(cfg, "temperature", default=1.0)),
        beta=float(_cfg_get(cfg, "beta", "jsd_beta", default=0.5)),
        hard_label_weight=float(_cfg_get(cfg, "hard_label_weight", default=0.0)),
        kd_weight=float(_cfg_get(cfg, "kd_weight", default=1.0)),
        chunk_size=int(_cfg_get(cfg, "fused_chunk_size", "chunk_size", default=1024)),
        ignore_index=int(_cfg_get(cfg, "ignore_index", default=IGNORE_INDEX)),
        topk_tail=_cfg_get(cfg, "topk_tail", default="bucket"),
        backend=_cfg_get(cfg, "fused_backend", default="torch"),
        num_items_in_batch=num_items_in_batch,
        return_parts=return_parts,
    )
