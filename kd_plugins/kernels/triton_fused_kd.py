"""Triton implementation of the fused ``lm_head`` + distillation loss (Cut-Cross-Entropy style).

No ``[rows x vocab]`` matrix is ever written to memory, not even per chunk: every kernel recomputes logit tiles
``[BLOCK_M x BLOCK_V]`` from ``hidden`` and ``W`` in registers (``tl.dot`` over ``BLOCK_H`` slices) and reduces them on
the fly.

* forward pass 1 (``_stats_kernel``, one program per block of valid rows, looping over vocabulary blocks): online
  log-sum-exp of the student logits at temperature ``T`` (and of the teacher's), of the raw student logits for the
  hard-label cross-entropy, the target logit, and, for forward/reverse KL, the divergence itself via an online
  rescaled accumulator (``KL = sum_j e^{t_j - m} (t_j - s_j) / Z_t - lse_t + lse_s``).
* forward pass 2 (``_loss_kernel``, JSD and TVD only): these need normalised probabilities, so a second sweep with
  the known log-normalisers gives the row loss and the row scalar ``c = sum_j q_j g_j`` the gradient needs.
* sparse teacher (top-k): ``_gather_kernel`` computes the student logits at the K teacher indices; the small
  ``[rows, K+1]`` divergence and its gradient are evaluated in PyTorch with the reference helpers.
* backward (``_grad_kernel``, grid over row blocks x vocabulary blocks): recomputes the logit tile, forms the
  analytic gradient ``dL/dz`` tile and accumulates ``grad_hidden += dz @ W_blk`` and ``grad_W_blk += dz^T @ h`` with
  float32 atomics (``grad_bias`` likewise). Only ``O(rows)`` statistics are saved between forward and backward.

Block sizes are fixed (no autotuning). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with tiny blocks
(used by the test-suite); the interpreter mis-handles ``tl.dot`` on bfloat16 operands, so 16-bit operands are
upcast to float32 there (float32 inputs run exactly the GPU code path).

This module imports ``triton``: import it only through :func:`kd_plugins.kernels.fused_linear_kd_loss` with
``backend="triton"`` (which checks the device first). It consumes the same :class:`~._spec.FusedKDSpec` as the
chunked PyTorch backend (:mod:`.torch_fused_kd`) and shares its sparse-teacher math (:mod:`._topk`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._spec import FusedKDSpec
from ._topk import topk_rows_and_grad
from ._triton import interpreter_enabled

__all__ = ["triton_fused_linear_kd", "FWD_CONFIG", "BWD_CONFIG"]

_MODES = {"none": 0, "kl": 1, "reverse_kl": 2, "jsd": 3, "tvd": 4, "topk": 5}

#: Fixed launch configurations (GPU): BLOCK_M rows x BLOCK_V vocab entries per tile, BLOCK_H hidden slice.
FWD_CONFIG = dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
BWD_CONFIG = dict(BLOCK_M=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=2)
#: Tiny blocks for the CPU interpreter (tl.dot needs every dimension >= 16).
_INTERP_CONFIG = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_H=16)


@triton.jit
def _logits_tile(
    X,
    W,
    B,
    rows,
    m_mask,
    offs_v,
    v_mask,
    H,
    stride_x,
    stride_w,
    HAS_B: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``X[rows] @ W[offs_v].T (+ B[offs_v])`` as a float32 ``[BLOCK_M, BLOCK_V]`` tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(X + rows[:, None] * stride_x + offs_h[None, :], mask=m_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(W + offs_v[:, None] * stride_w + offs_h[None, :], mask=v_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    if HAS_B:
        b = tl.load(B + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc


@triton.jit
def _teacher_tile(
    XT,
    WT,
    BT,
    TL,
    rows,
    m_mask,
    offs_v,
    v_mask,
    HT,
    stride_xt,
    stride_wt,
    stride_tl,
    TEACHER: tl.constexpr,
    HAS_BT: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if TEACHER == 1:
        t = _logits_tile(
            XT,
            WT,
            BT,
            rows,
            m_mask,
            offs_v,
            v_mask,
            HT,
            stride_xt,
            stride_wt,
            HAS_BT,
            UPCAST,
            PREC,
            BLOCK_M,
            BLOCK_V,
            BLOCK_H,
        )
    else:
        t = tl.load(
            TL + rows[:, None] * stride_tl + offs_v[None, :], mask=m_mask[:, None] & v_mask[None, :], other=0.0
        ).to(tl.float32)
    return t


@triton.jit
def _lse_step(m, l, x):
    """One online log-sum-exp step over a ``[BLOCK_M, BLOCK_V]`` tile ``x``: returns the new running max and sum, the
    factor that rescaled the old sum, and the tile's exponentials (relative to the new max)."""
    mn = tl.maximum(m, tl.max(x, 1))
    a = tl.exp(m - mn)
    e = tl.exp(x - mn[:, None])
    return mn, l * a + tl.sum(e, 1), a, e


@triton.jit
def _stats_kernel(
    ROWS,
    n_rows,
    XS,
    WS,
    BS,
    XT,
    WT,
    BT,
    TL,
    Y,
    LSE_S,
    LSE_T,
    LSE_1,
    ZY,
    KD,
    V,
    HS,
    HT,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    stride_tl,
    inv_t,
    MODE: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    HAS_CE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)  # padded lanes recompute row 0 (finite), never stored
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    m_1 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_1 = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_CE:
        y = tl.load(Y + offs_m, mask=m_mask, other=0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        offs_v = offs_v.to(tl.int64)
        z = _logits_tile(
            XS,
            WS,
            BS,
            rows,
            m_mask,
            offs_v,
            v_mask,
            HS,
            stride_xs,
            stride_ws,
            HAS_BS,
            UPCAST,
            PREC,
            BLOCK_M,
            BLOCK_V,
            BLOCK_H,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        if HAS_CE:
            m_1, l_1, _a1, _e1 = _lse_step(m_1, l_1, z)
            zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1)
        if MODE != 0:
            s = z * inv_t
            m_s, l_s, a_s, e_s = _lse_step(m_s, l_s, s)
            if MODE != 5:
                t = _teacher_tile(
                    XT,
                    WT,
                    BT,
                    TL,
                    rows,
                    m_mask,
                    offs_v,
                    v_mask,
                    HT,
                    stride_xt,
                    stride_wt,
                    stride_tl,
                    TEACHER,
                    HAS_BT,
                    UPCAST,
                    PREC,
                    BLOCK_M,
                    BLOCK_V,
                    BLOCK_H,
                )
                t = tl.where(v_mask[None, :], t * inv_t, float("-inf"))
                m_t, l_t, a_t, e_t = _lse_step(m_t, l_t, t)
                diff = tl.where(v_mask[None, :], t - s, 0.0)
                if MODE == 1:  # forward KL: sum_j p_j (t_j - s_j), rescaled online by the teacher max
                    acc = acc * a_t + tl.sum(tl.where(e_t > 0, e_t * diff, 0.0), 1)
                if MODE == 2:  # reverse KL: sum_j q_j (s_j - t_j), rescaled online by the student max
                    acc = acc * a_s - tl.sum(tl.where(e_s > 0, e_s * diff, 0.0), 1)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    if MODE != 0:
        tl.store(LSE_S + offs_m, lse_s, mask=m_mask)
    if MODE != 0 and MODE != 5:
        tl.store(LSE_T + offs_m, lse_t, mask=m_mask)
    if MODE == 1:
        tl.store(KD + offs_m, acc / l_t - lse_t + lse_s, mask=m_mask)
    if MODE == 2:
        tl.store(KD + offs_m, acc / l_s - lse_s + lse_t, mask=m_mask)
    if HAS_CE:
        tl.store(LSE_1 + offs_m, m_1 + tl.log(l_1), mask=m_mask)
        tl.store(ZY + offs_m, zy, mask=m_mask)


@triton.jit
def _loss_kernel(
    ROWS,
    n_rows,
    XS,
    WS,
    BS,
    XT,
    WT,
    BT,
    TL,
    LSE_S,
    LSE_T,
    KD,
    C,
    V,
    HS,
    HT,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    stride_tl,
    inv_t,
    beta,
    MODE: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """JSD / TVD rows (need normalised probabilities) and the row scalar ``c`` of their gradient."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
    lse_s = tl.load(LSE_S + offs_m, mask=m_mask, other=0.0)
    lse_t = tl.load(LSE_T + offs_m, mask=m_mask, other=0.0)
    r_p = tl.zeros((BLOCK_M,), tl.float32)
    r_q = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        offs_v = offs_v.to(tl.int64)
        s = (
            _logits_tile(
                XS,
                WS,
                BS,
                rows,
                m_mask,
                offs_v,
                v_mask,
                HS,
                stride_xs,
                stride_ws,
                HAS_BS,
                UPCAST,
                PREC,
                BLOCK_M,
                BLOCK_V,
                BLOCK_H,
            )
            * inv_t
        )
        t = (
            _teacher_tile(
                XT,
                WT,
                BT,
                TL,
                rows,
                m_mask,
                offs_v,
                v_mask,
                HT,
                stride_xt,
                stride_wt,
                stride_tl,
                TEACHER,
                HAS_BT,
                UPCAST,
                PREC,
                BLOCK_M,
                BLOCK_V,
                BLOCK_H,
            )
            * inv_t
        )
        log_q = s - lse_s[:, None]
        log_p = t - lse_t[:, None]
        q = tl.where(v_mask[None, :], tl.exp(log_q), 0.0)
        p = tl.where(v_mask[None, :], tl.exp(log_p), 0.0)
        if MODE == 3:
            log_m = tl.log(beta * p + (1.0 - beta) * q)
            r_p += tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), 1)
            r_q += tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), 1)
        if MODE == 4:
            d = q - p
            r_p += tl.sum(tl.abs(d), 1)
            r_q += tl.sum(tl.where(d > 0, q, tl.where(d < 0, -q, 0.0)), 1)
    if MODE == 3:
        kd = beta * r_p + (1.0 - beta) * r_q
        c = (1.0 - beta) * r_q
    else:
        kd = 0.5 * r_p
        c = 0.5 * r_q
    tl.store(KD + offs_m, kd, mask=m_mask)
    tl.store(C + offs_m, c, mask=m_mask)


@triton.jit
def _gather_kernel(
    ROWS,
    XS,
    WS,
    BS,
    IDX,
    OUT,
    K,
    HS,
    stride_xs,
    stride_ws,
    HAS_BS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Student logits at the teacher's top-k indices: ``OUT[i, k] = XS[rows[i]] . WS[IDX[i, k]] (+ BS)``."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.load(ROWS + pid_m)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    idx = tl.load(IDX + pid_m * K + offs_k, mask=k_mask, other=0)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for h0 in range(0, HS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HS
        x = tl.load(XS + row * stride_xs + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        w = tl.load(
            WS + idx[:, None] * stride_ws + offs_h[None, :], mask=k_mask[:, None] & h_mask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    if HAS_BS:
        acc += tl.load(BS + idx, mask=k_mask, other=0.0).to(tl.float32)
    tl.store(OUT + pid_m * K + offs_k, acc, mask=k_mask)


@triton.jit
def _dense_kd_grad_tile(q, log_q, log_p, C, offs_m, m_mask, beta, MODE: tl.constexpr):
    """``d KD-row / d s`` on a tile for a dense teacher (``s = z / T``); ``C`` holds the per-row scalar of the mode."""
    p = tl.exp(log_p)
    if MODE == 1:  # forward KL
        g = q - p
    elif MODE == 2:  # reverse KL: c = the row's divergence
        c = tl.load(C + offs_m, mask=m_mask, other=0.0)
        g = tl.where(q > 0, q * (log_q - log_p - c[:, None]), 0.0)
    elif MODE == 3:  # JSD: c = (1 - beta) * sum_j q_j log(q_j / m_j)
        c = tl.load(C + offs_m, mask=m_mask, other=0.0)
        log_m = tl.log(beta * p + (1.0 - beta) * q)
        g = tl.where(q > 0, q * ((1.0 - beta) * (log_q - log_m) - c[:, None]), 0.0)
    else:  # TVD: c = 0.5 * sum_j q_j sign(q_j - p_j)
        c = tl.load(C + offs_m, mask=m_mask, other=0.0)
        sg = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
        g = q * (sg - c[:, None])
    return g


@triton.jit
def _fold_grad_tile(
    d,
    XS,
    WS,
    GX,
    GW,
    rows,
    m_mask,
    offs_v,
    v_mask,
    HS,
    stride_xs,
    stride_ws,
    NEED_GX: tl.constexpr,
    NEED_GW: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``GX[rows] += d @ W[offs_v]`` and ``GW[offs_v] += d.T @ X[rows]`` (float32 atomics), ``BLOCK_H`` at a time."""
    if UPCAST:
        dd = d
    else:
        dd = d.to(XS.dtype.element_ty)
    for h0 in range(0, HS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < HS
        if NEED_GX:
            w = tl.load(
                WS + offs_v[:, None] * stride_ws + offs_h[None, :], mask=v_mask[:, None] & h_mask[None, :], other=0.0
            )
            if UPCAST:
                w = w.to(tl.float32)
            gx = tl.dot(dd, w, input_precision=PREC)
            tl.atomic_add(GX + rows[:, None] * HS + offs_h[None, :], gx, mask=m_mask[:, None] & h_mask[None, :])
        if NEED_GW:
            x = tl.load(
                XS + rows[:, None] * stride_xs + offs_h[None, :], mask=m_mask[:, None] & h_mask[None, :], other=0.0
            )
            if UPCAST:
                x = x.to(tl.float32)
            gw = tl.dot(tl.trans(dd), x, input_precision=PREC)
            tl.atomic_add(GW + offs_v[:, None] * HS + offs_h[None, :], gw, mask=v_mask[:, None] & h_mask[None, :])


@triton.jit
def _grad_kernel(
    ROWS,
    n_rows,
    XS,
    WS,
    BS,
    XT,
    WT,
    BT,
    TL,
    Y,
    LSE_S,
    LSE_T,
    LSE_1,
    C,
    TK_IDX,
    TK_G,
    K,
    SCALE,
    GX,
    GW,
    GB,
    V,
    HS,
    HT,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    stride_tl,
    inv_t,
    beta,
    MODE: tl.constexpr,
    TEACHER: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BT: tl.constexpr,
    HAS_CE: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GW: tl.constexpr,
    NEED_GB: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(ROWS + offs_m, mask=m_mask, other=0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    offs_v = offs_v.to(tl.int64)
    z = _logits_tile(
        XS,
        WS,
        BS,
        rows,
        m_mask,
        offs_v,
        v_mask,
        HS,
        stride_xs,
        stride_ws,
        HAS_BS,
        UPCAST,
        PREC,
        BLOCK_M,
        BLOCK_V,
        BLOCK_H,
    )
    w_kd = tl.load(SCALE)
    w_ce = tl.load(SCALE + 1)
    d = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    if HAS_CE:  # softmax(z) - onehot(y), at temperature 1
        lse_1 = tl.load(LSE_1 + offs_m, mask=m_mask, other=0.0)
        y = tl.load(Y + offs_m, mask=m_mask, other=-1)
        sm = tl.exp(z - lse_1[:, None])
        d += w_ce * (sm - tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0))
    if MODE != 0:
        lse_s = tl.load(LSE_S + offs_m, mask=m_mask, other=0.0)
        log_q = z * inv_t - lse_s[:, None]
        q = tl.exp(log_q)
        if MODE == 5:  # sparse teacher: scatter(G) - q * sum(G)
            c = tl.load(C + offs_m, mask=m_mask, other=0.0)
            g = -q * c[:, None]
            for k in range(0, K):
                ik = tl.load(TK_IDX + offs_m * K + k, mask=m_mask, other=-1)
                gk = tl.load(TK_G + offs_m * K + k, mask=m_mask, other=0.0)
                g += tl.where(offs_v[None, :] == ik[:, None], gk[:, None], 0.0)
        else:
            t = (
                _teacher_tile(
                    XT,
                    WT,
                    BT,
                    TL,
                    rows,
                    m_mask,
                    offs_v,
                    v_mask,
                    HT,
                    stride_xt,
                    stride_wt,
                    stride_tl,
                    TEACHER,
                    HAS_BT,
                    UPCAST,
                    PREC,
                    BLOCK_M,
                    BLOCK_V,
                    BLOCK_H,
                )
                * inv_t
            )
            lse_t = tl.load(LSE_T + offs_m, mask=m_mask, other=0.0)
            g = _dense_kd_grad_tile(q, log_q, t - lse_t[:, None], C, offs_m, m_mask, beta, MODE)
        d += (w_kd * inv_t) * g
    d = tl.where(m_mask[:, None] & v_mask[None, :], d, 0.0)
    if NEED_GB:
        tl.atomic_add(GB + offs_v, tl.sum(d, 0), mask=v_mask)
    _fold_grad_tile(
        d,
        XS,
        WS,
        GX,
        GW,
        rows,
        m_mask,
        offs_v,
        v_mask,
        HS,
        stride_xs,
        stride_ws,
        NEED_GX,
        NEED_GW,
        UPCAST,
        PREC,
        BLOCK_H,
    )


# ----------------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------------


def _contig(t):
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_args(spec: FusedKDSpec) -> dict:
    """Pointer, size, stride and flag arguments shared by the dense kernels."""
    xs, ws, bs = _contig(spec.student.x), _contig(spec.student.w), spec.student.b
    teacher = spec.teacher
    xt, wt, bt = (_contig(teacher.x), _contig(teacher.w), teacher.b) if teacher is not None else (None, None, None)
    tlog = _contig(spec.teacher_logits)
    dummy = xs  # placeholder pointer for absent optional tensors (never dereferenced)
    kind = 1 if xt is not None else (2 if tlog is not None else 0)
    return dict(
        XS=xs,
        WS=ws,
        BS=bs if bs is not None else dummy,
        XT=xt if xt is not None else dummy,
        WT=wt if wt is not None else dummy,
        BT=bt if bt is not None else dummy,
        TL=tlog if tlog is not None else dummy,
        HS=xs.shape[1],
        HT=xt.shape[1] if xt is not None else 1,
        stride_xs=xs.stride(0),
        stride_ws=ws.stride(0),
        stride_xt=xt.stride(0) if xt is not None else 0,
        stride_wt=wt.stride(0) if wt is not None else 0,
        stride_tl=tlog.stride(0) if tlog is not None else 0,
        TEACHER=kind,
        HAS_BS=bs is not None,
        HAS_BT=bt is not None,
    )


def _needs_upcast(spec: FusedKDSpec) -> bool:
    """The interpreter mis-computes ``tl.dot`` on 16-bit operands: upcast them there (float32 runs the GPU code)."""
    if not interpreter_enabled():
        return False
    xt = spec.teacher.x if spec.teacher is not None else None
    return any(t is not None and t.dtype != torch.float32 for t in (spec.student.x, xt))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_config(gpu_config: dict) -> dict:
    return dict(_INTERP_CONFIG) if interpreter_enabled() else dict(gpu_config)


class _RowStats:
    """The ``O(rows)`` float32 statistics of the forward pass (the backward pass needs ``lse_*``, ``c``, ``tk_g``)."""

    def __init__(self, n: int, device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        self.lse_s, self.lse_t, self.lse_1, self.zy, self.kd_rows, self.c = (torch.zeros(n, **f32) for _ in range(6))
        self.tk_g: torch.Tensor | None = None  # [rows, K] gradient of the sparse divergence w.r.t. log q at top-k


def _topk_stats(spec: FusedKDSpec, rows, st: _RowStats, common: dict, fwd: dict, need_grad: bool) -> None:
    """Sparse teacher: gather the student logits at the top-k indices, then evaluate the small problem in PyTorch."""
    n = int(rows.numel())
    idx = spec.topk.idx.contiguous()
    k = idx.shape[1]
    z_k = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    block_k = 16 if interpreter_enabled() else min(64, triton.next_power_of_2(max(k, 16)))
    _gather_kernel[(n, triton.cdiv(k, block_k))](
        rows,
        common["XS"],
        common["WS"],
        common["BS"],
        idx,
        z_k,
        k,
        common["HS"],
        common["stride_xs"],
        common["stride_ws"],
        HAS_BS=common["HAS_BS"],
        BLOCK_K=block_k,
        BLOCK_H=fwd["BLOCK_H"],
    )
    log_q_k = z_k * (1.0 / spec.temperature) - st.lse_s[:, None]
    kd_rows, tk_g = topk_rows_and_grad(log_q_k, spec.topk.log_probs, spec.topk.row_fn, spec.topk.tail, need_grad)
    st.kd_rows = kd_rows.float()
    if tk_g is not None:
        st.tk_g = tk_g.float().contiguous()
        st.c = st.tk_g.sum(-1)


def _forward_stats(spec: FusedKDSpec, rows, y, need_grad: bool) -> _RowStats:
    """Launch the forward kernels over the valid ``rows``; returns the per-row statistics."""
    n = int(rows.numel())
    st = _RowStats(n, rows.device)
    if not n:
        return st
    fwd = _block_config(FWD_CONFIG)
    common = _launch_args(spec)
    mode = _MODES[spec.mode]
    inv_t = 1.0 / spec.temperature
    v = spec.student.w.shape[0]
    kernel_flags = dict(UPCAST=_needs_upcast(spec), PREC=_precision(spec.student.x.dtype))
    grid = (triton.cdiv(n, fwd["BLOCK_M"]),)
    _stats_kernel[grid](
        rows,
        n,
        Y=y,
        LSE_S=st.lse_s,
        LSE_T=st.lse_t,
        LSE_1=st.lse_1,
        ZY=st.zy,
        KD=st.kd_rows,
        V=v,
        inv_t=inv_t,
        MODE=mode,
        HAS_CE=spec.need_ce,
        **kernel_flags,
        **common,
        **fwd,
    )
    if mode in (3, 4):
        _loss_kernel[grid](
            rows,
            n,
            LSE_S=st.lse_s,
            LSE_T=st.lse_t,
            KD=st.kd_rows,
            C=st.c,
            V=v,
            inv_t=inv_t,
            beta=spec.beta,
            MODE=mode,
            **kernel_flags,
            **common,
            **fwd,
        )
    elif mode == 2:
        st.c = st.kd_rows.clone()
    elif mode == 5:
        _topk_stats(spec, rows, st, common, fwd, need_grad)
    return st


def _launch_grad(ctx, grad_loss, lse_s, lse_t, lse_1, c, tk_g, gx, gw, gb) -> None:
    """Launch the backward kernel: accumulates into the float32 buffers ``gx``/``gw``/``gb`` (those not None)."""
    spec: FusedKDSpec = ctx.spec
    n, v = int(ctx.rows.numel()), spec.student.w.shape[0]
    bwd = _block_config(BWD_CONFIG)
    mode = _MODES[spec.mode]
    sc = spec.scales
    scale = torch.stack([grad_loss.float() * sc.kd_coef, grad_loss.float() * sc.ce_coef]).contiguous()
    topk = mode == 5
    grid = (triton.cdiv(n, bwd["BLOCK_M"]), triton.cdiv(v, bwd["BLOCK_V"]))
    _grad_kernel[grid](
        ctx.rows,
        n,
        Y=ctx.y,
        LSE_S=lse_s,
        LSE_T=lse_t,
        LSE_1=lse_1,
        C=c,
        TK_IDX=spec.topk.idx.contiguous() if topk else ctx.rows,
        TK_G=tk_g if topk else c,
        K=spec.topk.idx.shape[1] if topk else 0,
        SCALE=scale,
        GX=gx if gx is not None else c,
        GW=gw if gw is not None else c,
        GB=gb if gb is not None else c,
        V=v,
        inv_t=1.0 / spec.temperature,
        beta=spec.beta,
        MODE=mode,
        HAS_CE=spec.need_ce,
        NEED_GX=gx is not None,
        NEED_GW=gw is not None,
        NEED_GB=gb is not None,
        UPCAST=_needs_upcast(spec),
        PREC=_precision(spec.student.x.dtype),
        **_launch_args(spec),
        **bwd,
    )


class _TritonFusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, spec: FusedKDSpec, need_grad: bool):
        rows = spec.rows.contiguous()
        y = spec.labels.contiguous() if spec.need_ce else rows
        st = _forward_stats(spec, rows, y, need_grad)
        zero = torch.zeros((), dtype=torch.float32, device=xs.device)
        kd_sum = st.kd_rows.sum() if spec.mode != "none" else zero
        ce_sum = (st.lse_1 - st.zy).sum() if spec.need_ce else zero
        sc = spec.scales
        loss = kd_sum * sc.kd_coef + ce_sum * sc.ce_coef
        kd, ce = kd_sum * sc.kd_norm, ce_sum * sc.ce_norm
        ctx.mark_non_differentiable(kd, ce)
        ctx.save_for_backward(
            xs,
            ws,
            bs if bs is not None else torch.empty(0),
            st.lse_s,
            st.lse_t,
            st.lse_1,
            st.c,
            st.tk_g if st.tk_g is not None else torch.empty(0),
        )
        ctx.spec, ctx.has_bias, ctx.y, ctx.rows = spec, bs is not None, y, rows
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _gkd, _gce):
        xs, ws, bs, lse_s, lse_t, lse_1, c, tk_g = ctx.saved_tensors
        need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_gb = ctx.has_bias and ctx.needs_input_grad[2]
        f32 = dict(dtype=torch.float32, device=xs.device)
        gx = torch.zeros(xs.shape, **f32) if need_gx else None
        gw = torch.zeros(ws.shape, **f32) if need_gw else None
        gb = torch.zeros(ws.shape[0], **f32) if need_gb else None
        if ctx.rows.numel() and (need_gx or need_gw or need_gb):
            _launch_grad(ctx, grad_loss, lse_s, lse_t, lse_1, c, tk_g, gx, gw, gb)
        return (
            gx.to(xs.dtype) if need_gx else None,
            gw.to(ws.dtype) if need_gw else None,
            gb.to(bs.dtype) if need_gb else None,
            None,
            None,
        )


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_fused_linear_kd(spec: FusedKDSpec):
    """Run the Triton kernels on a validated :class:`~kd_plugins.kernels._spec.FusedKDSpec`.

    Returns ``(loss, kd, ce)`` like the chunked PyTorch path.
    """
    if spec.student.x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float32/bfloat16/float16 inputs, got {spec.student.x.dtype}; use "
            "backend='torch'"
        )
    if spec.teacher is not None and spec.teacher.x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float32/bfloat16/float16 teacher inputs, got {spec.teacher.x.dtype}"
        )
    s = spec.student
    return _TritonFusedLinearKD.apply(s.x, s.w, s.b, spec, spec.needs_student_grad())
