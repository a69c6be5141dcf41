"""Chunked PyTorch backend of the fused ``lm_head`` + distillation loss (Liger-Kernel style).

It walks the valid rows in chunks of ``spec.chunk_size``; for each chunk it computes the student (and teacher) logits,
the per-row divergence, the hard-label cross-entropy, and the *analytic* gradient of the loss with respect to the
chunk's student logits, and immediately folds that gradient into ``grad_hidden = g @ W`` and ``grad_W += g.T @ h``.
The gradients are therefore produced in the forward pass; backward only scales them by the incoming gradient. Peak
memory is ``O(chunk_size * V)`` on top of the parameter-sized gradient buffers, independent of the number of rows.
Runs on any device; :mod:`.triton_fused_kd` is the fused-kernel sibling that consumes the same
:class:`~._spec.FusedKDSpec`.
"""

from __future__ import annotations

import torch

from ._spec import FusedKDSpec, spread_tail
from ._topk import topk_rows_and_grad

__all__ = ["torch_fused_linear_kd"]


# ----------------------------------------------------------------------------------------------------------------------
# dense divergences on one chunk: rows and d rows / d s (s = student logits / T)
# ----------------------------------------------------------------------------------------------------------------------
# Each takes the chunk's student and teacher log-probabilities as float buffers it may overwrite, and follows the
# ``kl_rows`` convention: terms with zero probability mass contribute 0 (and no gradient).


def _zero_where(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return x.masked_fill_(cond, 0.0)


def _kl_chunk(log_q, log_p, beta, need_grad):
    p = log_p.exp()
    d = torch.sub(log_p, log_q)
    d.mul_(p)
    _zero_where(d, p <= 0)
    rows = d.sum(-1)
    if not need_grad:
        return rows, None
    torch.exp(log_q, out=d)
    return rows, d.sub_(p)  # q - p


def _reverse_kl_chunk(log_q, log_p, beta, need_grad):
    q = log_q.exp()
    f = log_q.sub_(log_p)  # log q - log p (in place on s)
    qf = torch.mul(q, f, out=log_p)
    zero = q <= 0
    _zero_where(qf, zero)
    rows = qf.sum(-1)
    if not need_grad:
        return rows, None
    g = f.sub_(rows.unsqueeze(-1)).mul_(q)  # q (log q - log p - L)
    return rows, _zero_where(g, zero)


def _jsd_chunk(log_q, log_p, beta, need_grad):
    p = log_p.exp()
    q = log_q.exp()
    log_m = torch.mul(p, beta).add_(q, alpha=1.0 - beta).log_()
    a = log_p.sub_(log_m).mul_(p)  # p log(p/m)
    _zero_where(a, p <= 0)
    rows_p = a.sum(-1)
    del a, p
    b = log_q.sub_(log_m)  # log(q/m) (in place on s)
    qb = torch.mul(q, b, out=log_m)
    zero = q <= 0
    _zero_where(qb, zero)
    rows_q = qb.sum(-1)
    rows = beta * rows_p + (1.0 - beta) * rows_q
    if not need_grad:
        return rows, None
    c = ((1.0 - beta) * rows_q).unsqueeze(-1)
    g = b.mul_(1.0 - beta).sub_(c).mul_(q)  # q ((1-beta) log(q/m) - c)
    return rows, _zero_where(g, zero)


def _tvd_chunk(log_q, log_p, beta, need_grad):
    p = log_p.exp_()
    q = log_q.exp_()
    diff = torch.sub(q, p)
    sg = torch.sign(diff, out=p)
    rows = diff.abs_().sum(-1).mul_(0.5)
    if not need_grad:
        return rows, None
    del diff
    qs = sg.mul_(q)  # q sign(q - p)
    c = qs.sum(-1, keepdim=True).mul_(0.5)
    return rows, qs.mul_(0.5).sub_(q.mul_(c))  # q (0.5 sign(q - p) - c)


_DENSE_CHUNK = {"kl": _kl_chunk, "reverse_kl": _reverse_kl_chunk, "jsd": _jsd_chunk, "tvd": _tvd_chunk}


def _dense_chunk(s: torch.Tensor, t: torch.Tensor, mode: str, beta: float, need_grad: bool):
    """Divergence rows and ``d rows / d s`` for one chunk of scaled logits ``s`` (student) and ``t`` (teacher).

    ``s`` and ``t`` are float buffers owned by the caller and are overwritten.
    """
    log_q = s.sub_(torch.logsumexp(s, -1, keepdim=True))
    log_p = t.sub_(torch.logsumexp(t, -1, keepdim=True))
    return _DENSE_CHUNK[mode](log_q, log_p, beta, need_grad)


# ----------------------------------------------------------------------------------------------------------------------
# one chunk of rows: loss parts and d loss / d z (z = raw student logits)
# ----------------------------------------------------------------------------------------------------------------------


def _logits_chunk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    z = torch.mm(x, w.t()) if b is None else torch.addmm(b.to(x.dtype), x, w.t())
    return z if z.dtype == cdtype else z.to(cdtype)


def _ce_chunk(spec: FusedKDSpec, z: torch.Tensor, lo: int, hi: int, need_grad: bool):
    """Summed hard-label cross-entropy of the chunk and its weighted gradient ``ce_coef * (softmax(z) - onehot)``."""
    y = spec.labels[lo:hi].unsqueeze(-1)
    lse1 = torch.logsumexp(z, -1, keepdim=True)
    ce_sum = (lse1 - z.gather(-1, y)).sum()
    if not need_grad:
        return ce_sum, None
    coef = spec.scales.ce_coef
    g = torch.sub(z, lse1).exp_().mul_(coef)
    g.scatter_add_(-1, y, torch.full_like(lse1, -coef))
    return ce_sum, g


def _topk_kd_chunk(spec: FusedKDSpec, s: torch.Tensor, lo: int, hi: int, need_grad: bool):
    """Sparse teacher: summed divergence, ``d rows / d s`` (``scatter(G) - q * sum(G)``) and the teacher's top-1
    tokens; overwrites ``s``."""
    topk = spec.topk
    lse_s = torch.logsumexp(s, -1, keepdim=True)
    idx = topk.idx[lo:hi]
    t_top = idx.gather(-1, topk.log_probs[lo:hi].argmax(-1, keepdim=True)).squeeze(-1) if spec.count_agreement else None
    log_q_k = s.gather(-1, idx).sub_(lse_s)
    rows_kd, gk = topk_rows_and_grad(log_q_k, topk.log_probs[lo:hi], topk.row_fn, topk.tail, need_grad)
    if not need_grad:
        return rows_kd.sum(), None, t_top
    q = s.sub_(lse_s).exp_()
    return rows_kd.sum(), q.mul_(-gk.sum(-1, keepdim=True)).scatter_add_(-1, idx, gk), t_top


def _dense_kd_chunk(
    spec: FusedKDSpec, s: torch.Tensor, r: torch.Tensor, lo: int, hi: int, inv_t: float, need_grad: bool
):
    """Dense teacher (hidden + head, or logits): summed divergence, ``d rows / d s`` and the teacher's top-1 tokens;
    overwrites ``s``."""
    if spec.teacher is not None:
        t = _logits_chunk(spec.teacher.x.index_select(0, r), spec.teacher.w, spec.teacher.b, spec.cdtype)
    else:
        t = spec.teacher_logits.index_select(0, r).to(spec.cdtype)  # index_select copies: safe to overwrite
    t_top = t.argmax(-1) if spec.count_agreement and spec.exact_head is None else None
    if spec.temperature != 1.0:
        t.mul_(inv_t)
    if spec.exact_head is not None:  # exact head log-probs (at T), the rest of the mass spread like t
        head = spec.exact_head
        spread_tail(t, head.idx[lo:hi], head.log_probs[lo:hi])
        t_top = t.argmax(-1) if spec.count_agreement else None
    rows_kd, gkd = _dense_chunk(s, t, spec.mode, spec.beta, need_grad)
    return rows_kd.sum(), gkd, t_top


def _chunk_loss_and_grad(spec: FusedKDSpec, lo: int, hi: int, need_grad: bool):
    """Loss parts (summed, unnormalised) and ``d loss / d z`` for valid rows ``rows[lo:hi]``.

    Returns ``(kd_sum, ce_sum, g, agree)`` where ``g`` is the float gradient of
    ``kd_coef * sum(kd_rows) + ce_coef * sum(ce_rows)`` with respect to the raw student logits ``z`` (or None) and
    ``agree`` the number of rows whose student and teacher top-1 tokens agree (None without a teacher or unless
    ``spec.count_agreement``): a by-product of logits the chunk forms anyway, so the callback's ``agreement`` log costs
    no extra pass over the vocabulary.
    """
    r = spec.rows[lo:hi]
    z = _logits_chunk(spec.student.x.index_select(0, r), spec.student.w, spec.student.b, spec.cdtype)
    ce_sum = g = None
    if spec.need_ce:
        ce_sum, g = _ce_chunk(spec, z, lo, hi, need_grad)
    if spec.mode == "none":
        return None, ce_sum, g, None
    s_top = z.argmax(-1) if spec.count_agreement else None
    inv_t = 1.0 / spec.temperature
    s = z.mul_(inv_t) if spec.temperature != 1.0 else z
    if spec.mode == "topk":
        kd_sum, gkd, t_top = _topk_kd_chunk(spec, s, lo, hi, need_grad)
    else:
        kd_sum, gkd, t_top = _dense_kd_chunk(spec, s, r, lo, hi, inv_t, need_grad)
    if need_grad:
        coef = spec.scales.kd_coef * inv_t
        g = gkd.mul_(coef) if g is None else g.add_(gkd, alpha=coef)
    return kd_sum, ce_sum, g, None if s_top is None else (s_top == t_top).sum()


# ----------------------------------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------------------------------


def _grad_buffers(ctx, xs, ws, bs, spec: FusedKDSpec, need_grad: bool):
    """Zeroed ``(grad_hidden, grad_W, grad_bias)`` accumulators for the inputs autograd wants (None otherwise)."""
    if not need_grad:
        return None, None, None
    dev = xs.device
    gx = torch.zeros_like(xs) if ctx.needs_input_grad[0] else None
    gw = torch.zeros(ws.shape, dtype=spec.cdtype, device=dev) if ctx.needs_input_grad[1] else None
    gb = (
        torch.zeros(ws.shape[0], dtype=spec.cdtype, device=dev)
        if (bs is not None and ctx.needs_input_grad[2])
        else None
    )
    return gx, gw, gb


def _fold_chunk_grad(g, rows, xs, ws, gx, gw, gb) -> None:
    """Fold ``d loss / d z`` of a chunk of ``rows`` into the hidden/weight/bias gradient buffers."""
    if gb is not None:
        gb += g.sum(0)
    g = g.to(xs.dtype)
    if gx is not None:
        gx.index_copy_(0, rows, torch.mm(g, ws))
    if gw is not None:
        x = xs.index_select(0, rows)
        if gw.dtype == x.dtype:
            gw.addmm_(g.t(), x)
        else:
            gw += torch.mm(g.t(), x)


class _FusedLinearKDFunction(torch.autograd.Function):
    """Chunked forward that also produces the gradients (grads are scaled by ``grad_output`` in backward)."""

    @staticmethod
    def forward(ctx, xs, ws, bs, spec: FusedKDSpec, need_grad: bool):
        # ``need_grad`` is captured by the caller: grad mode is always off inside ``forward``.
        kd_total = torch.zeros((), dtype=spec.cdtype, device=xs.device)
        ce_total = torch.zeros((), dtype=spec.cdtype, device=xs.device)
        agree_total = torch.zeros((), dtype=torch.long, device=xs.device)
        gx, gw, gb = _grad_buffers(ctx, xs, ws, bs, spec, need_grad)
        n_valid = spec.rows.numel()
        for lo in range(0, n_valid, spec.chunk_size):
            hi = min(lo + spec.chunk_size, n_valid)
            kd_sum, ce_sum, g, agree = _chunk_loss_and_grad(spec, lo, hi, need_grad)
            if kd_sum is not None:
                kd_total += kd_sum
            if agree is not None:
                agree_total += agree
            if ce_sum is not None:
                ce_total += ce_sum
            if g is not None:
                _fold_chunk_grad(g, spec.rows[lo:hi], xs, ws, gx, gw, gb)
            del g
        sc = spec.scales
        kd, ce = kd_total * sc.kd_norm, ce_total * sc.ce_norm
        loss = kd_total * sc.kd_coef + ce_total * sc.ce_coef
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (gx, gw, gb)))
        ctx.has = (gx is not None, gw is not None, gb is not None)
        ctx.dtypes = (xs.dtype, ws.dtype, bs.dtype if bs is not None else None)
        ctx.mark_non_differentiable(kd, ce, agree_total)
        return loss, kd, ce, agree_total

    @staticmethod
    def backward(ctx, grad_loss, _gkd, _gce, _gagree):
        out = [(t * grad_loss).to(dt) if has else None for has, t, dt in zip(ctx.has, ctx.saved_tensors, ctx.dtypes)]
        return out[0], out[1], out[2], None, None


def torch_fused_linear_kd(spec: FusedKDSpec):
    """Run the chunked PyTorch path on a validated spec; returns ``(loss, kd, ce, agree)`` (``kd``/``ce`` detached;
    ``agree``: rows whose student and teacher top-1 tokens agree, a long tensor, zero unless
    ``spec.count_agreement``)."""
    s = spec.student
    return _FusedLinearKDFunction.apply(s.x, s.w, s.b, spec, spec.needs_student_grad())
