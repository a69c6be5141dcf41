"""Triton kernels for ACM inference: a grouped two-layer MLP over tokens that each run their own number of learners.

An ACM block (``kd_plugins.acm``) holds ``N`` learners of hidden width ``w`` as contiguous slices of one weight, so a
token that runs ``k`` learners computes the dense block of width ``k*w``::

    out[t] = act(x[t] @ W1[:k_t w].T + b1[:k_t w]) @ W2[:k_t w] + (b2 if k_t >= 1 else 0)
    (SwiGLU learners: act(x W1.T + b1) * (x W3.T + b3) in place of act(x W1.T + b1))

The tokens are sorted by ``k`` in descending order once (``torch.sort``); then

1. ``_hidden_kernel`` computes ``H[i, j] = act(x[perm[i]] @ W1[j] + b1[j])`` tile by tile, reading the rows of ``x``
   through ``perm`` (the gather is fused) and skipping every column tile at or beyond ``k_max * w`` of its row tile
   (``k_max`` = the ``k`` of the tile's first row, the largest in a descending order);
2. ``_output_kernel`` computes ``out[perm[i]] = H[i, :k_i w] @ W2[:k_i w] (+ b2)`` with a reduction loop that stops at
   the tile's ``k_max * w`` and loads ``H`` masked by each row's own ``k_i * w`` (entries a row does not own are read
   as 0, never from memory), and writes through ``perm`` (the scatter is fused). Rows with ``k = 0`` get 0.

No host synchronisation: the grid depends on the number of tokens only, so the kernels can be queued behind the
gate. Accumulation is float32; ``H`` is stored in the input dtype, like the PyTorch paths do. Fixed block sizes, no
autotuning: one configuration for GPUs, a small one for the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported; CPU tensors; slow, for tests). ``acm_grouped_mlp_reference`` is the pure-PyTorch masked
definition the kernels are tested against.
"""

from __future__ import annotations

import torch

from ._triton import interpreter_enabled, triton_available

try:  # triton is an optional dependency (extra "gpu")
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = ["ACT_KINDS", "acm_grouped_mlp", "acm_grouped_mlp_reference", "ACMKernelUnavailableError"]

#: Activations the kernels implement (``kd_plugins.acm`` maps an activation module to one of these by probing it).
ACT_KINDS = ("gelu", "gelu_tanh", "relu", "silu", "identity")
_ACT_CODE = {name: i for i, name in enumerate(ACT_KINDS)}

GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}


class ACMKernelUnavailableError(RuntimeError):
    """The Triton ACM kernels were asked for where they cannot run (no triton, no GPU and no interpreter)."""


if _HAS_TRITON:

    @triton.jit
    def _activate(v, ACT: tl.constexpr):
        if ACT == 0:  # gelu (erf form)
            v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
        elif ACT == 1:  # gelu, tanh approximation: tanh(u) = 2 sigmoid(2u) - 1
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            v = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))
        elif ACT == 2:
            v = tl.maximum(v, 0.0)
        elif ACT == 3:
            v = v / (1.0 + tl.exp(-v))
        return v

    @triton.jit
    def _xw_tile(
        x_ptr,
        w_ptr,
        rows,
        mask_m,
        offs_n,
        mask_n,
        D_IN,
        stride_xm,
        stride_wn,
        UPCAST: tl.constexpr,
        PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``x[rows] @ W[offs_n].T`` as a float32 ``[BLOCK_M, BLOCK_N]`` tile."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D_IN
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            # W tile as [BLOCK_N, BLOCK_K] (rows of W are contiguous along K), transposed for the dot
            b = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0
            )
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _hidden_kernel(
        x_ptr,
        perm_ptr,
        ks_ptr,
        w1_ptr,
        b1_ptr,
        w3_ptr,
        b3_ptr,
        h_ptr,
        T,
        D_IN,
        D_HID,
        WIDTH,
        stride_xm,
        stride_w1n,
        stride_w3n,
        stride_hm,
        ACT: tl.constexpr,
        GLU: tl.constexpr,
        HAS_B1: tl.constexpr,
        HAS_B3: tl.constexpr,
        UPCAST: tl.constexpr,
        PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        k_max = tl.load(ks_ptr + m0)  # tokens are sorted by k, descending: the tile's first row runs the most
        if n0 < k_max * WIDTH:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < T
            rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # fused gather
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < D_HID
            acc = _xw_tile(
                x_ptr,
                w1_ptr,
                rows,
                mask_m,
                offs_n,
                mask_n,
                D_IN,
                stride_xm,
                stride_w1n,
                UPCAST,
                PREC,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
            )
            if HAS_B1:
                acc += tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            h = _activate(acc, ACT)
            if GLU:
                up = _xw_tile(
                    x_ptr,
                    w3_ptr,
                    rows,
                    mask_m,
                    offs_n,
                    mask_n,
                    D_IN,
                    stride_xm,
                    stride_w3n,
                    UPCAST,
                    PREC,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                )
                if HAS_B3:
                    up += tl.load(b3_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                h = h * up
            h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _output_kernel(
        h_ptr,
        perm_ptr,
        ks_ptr,
        w2_ptr,
        b2_ptr,
        out_ptr,
        T,
        D_HID,
        D_OUT,
        WIDTH,
        stride_hm,
        stride_w2k,
        stride_om,
        HAS_B2: tl.constexpr,
        UPCAST: tl.constexpr,
        PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D_OUT
        k_row = tl.load(ks_ptr + offs_m, mask=mask_m, other=0)
        own = k_row * WIDTH  # hidden units each row owns
        k_max = tl.load(ks_ptr + m0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_max * WIDTH, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a_mask = mask_m[:, None] & (offs_k[None, :] < own[:, None])  # never read units a row does not own
            a = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :], mask=a_mask, other=0.0)
            b_mask = (offs_k[:, None] < D_HID) & mask_n[None, :]
            b = tl.load(w2_ptr + offs_k[:, None] * stride_w2k + offs_n[None, :], mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        if HAS_B2:
            b2 = tl.load(b2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.where(k_row[:, None] > 0, b2[None, :], 0.0)
        rows = tl.load(perm_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)  # fused scatter
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _runtime_config(*tensors: torch.Tensor) -> dict:
    if not _HAS_TRITON:
        raise ACMKernelUnavailableError(
            "the Triton ACM kernels need the `triton` package (pip install 'kd-plugins[gpu]'); use "
            "execution='prefix' (pure PyTorch) instead"
        )
    devices = {t.device.type for t in tensors}
    if interpreter_enabled():
        if devices != {"cpu"}:
            raise ACMKernelUnavailableError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got {devices}")
        return dict(INTERPRETER_CONFIG)
    if triton_available("cuda") and devices == {"cuda"}:
        return dict(GPU_CONFIG)
    raise ACMKernelUnavailableError(
        f"the Triton ACM kernels need CUDA tensors (got {sorted(devices)}), or TRITON_INTERPRET=1 set before triton "
        "is imported for CPU tests; on CPU use execution='prefix'"
    )


def _check_args(x, k, w1, w2, num_learners, width, act, w3) -> None:
    if act not in _ACT_CODE:
        raise ValueError(f"act must be one of {ACT_KINDS}, got {act!r}")
    if x.dim() != 2 or k.shape != x.shape[:1]:
        raise ValueError(f"x must be [T, d_in] and k [T], got {tuple(x.shape)} and {tuple(k.shape)}")
    hid = num_learners * width
    if w1.shape != (hid, x.shape[1]) or w2.shape[0] != hid or (w3 is not None and w3.shape != w1.shape):
        raise ValueError(
            f"weights must be w1/w3 [N*width={hid}, d_in={x.shape[1]}] and w2 [N*width, d_out], got "
            f"{tuple(w1.shape)}, {None if w3 is None else tuple(w3.shape)}, {tuple(w2.shape)}"
        )


def acm_grouped_mlp(
    x: torch.Tensor,
    k: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    num_learners: int,
    width: int,
    act: str = "gelu",
    w3: torch.Tensor | None = None,
    b3: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = act(x[t] W1[:k_t w].T + b1) W2[:k_t w] (+ b2 when k_t >= 1)`` for ``x [T, d_in]``, ``k [T]``.

    ``w1 [N*w, d_in]`` (and ``w3`` for SwiGLU learners: ``act(x W1.T + b1) * (x W3.T + b3)``), ``w2 [N*w, d_out]``,
    ``act`` one of :data:`ACT_KINDS`. Inference only (no autograd). See the module docstring for the scheme.
    """
    _check_args(x, k, w1, w2, num_learners, width, act, w3)
    tensors = [t for t in (x, k, w1, b1, w2, b2, w3, b3) if t is not None]
    cfg = _runtime_config(*tensors)
    T, d_in = x.shape
    d_hid, d_out = w1.shape[0], w2.shape[1]
    out = x.new_empty(T, d_out)
    if T == 0:
        return out
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    w3 = w3.contiguous() if w3 is not None else None
    ks, perm = torch.sort(k.clamp(0, num_learners).to(torch.int32), descending=True, stable=True)
    perm = perm.to(torch.int32)
    h = x.new_empty(T, d_hid)
    upcast = interpreter_enabled() and x.dtype != torch.float32  # the interpreter mis-computes 16-bit tl.dot
    prec = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dummy = ks  # pointer for absent biases / w3 (never read: the constexpr flag is off)
    _hidden_kernel[(triton.cdiv(T, bm), triton.cdiv(d_hid, bn))](
        x,
        perm,
        ks,
        w1,
        dummy if b1 is None else b1,
        dummy if w3 is None else w3,
        dummy if b3 is None else b3,
        h,
        T,
        d_in,
        d_hid,
        width,
        x.stride(0),
        w1.stride(0),
        0 if w3 is None else w3.stride(0),
        h.stride(0),
        ACT=_ACT_CODE[act],
        GLU=w3 is not None,
        HAS_B1=b1 is not None,
        HAS_B3=b3 is not None,
        UPCAST=upcast,
        PREC=prec,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **launch,
    )
    _output_kernel[(triton.cdiv(T, bm), triton.cdiv(d_out, bn))](
        h,
        perm,
        ks,
        w2,
        dummy if b2 is None else b2,
        out,
        T,
        d_hid,
        d_out,
        width,
        h.stride(0),
        w2.stride(0),
        out.stride(0),
        HAS_B2=b2 is not None,
        UPCAST=upcast,
        PREC=prec,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **launch,
    )
    return out


_ACT_TORCH = {
    "gelu": lambda v: torch.nn.functional.gelu(v),
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "identity": lambda v: v,
}


def acm_grouped_mlp_reference(
    x: torch.Tensor,
    k: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    num_learners: int,
    width: int,
    act: str = "gelu",
    w3: torch.Tensor | None = None,
    b3: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition :func:`acm_grouped_mlp` computes, in float32 PyTorch: every hidden unit for every token, then
    the units a token does not own masked to 0 before the second layer (dense cost; for tests)."""
    _check_args(x, k, w1, w2, num_learners, width, act, w3)
    xf = x.float()
    h = _ACT_TORCH[act](torch.nn.functional.linear(xf, w1.float(), None if b1 is None else b1.float()))
    if w3 is not None:
        h = h * torch.nn.functional.linear(xf, w3.float(), None if b3 is None else b3.float())
    own = (torch.arange(w1.shape[0], device=x.device)[None, :] < (k.clamp(0, num_learners) * width)[:, None]).float()
    out = (h * own) @ w2.float()
    if b2 is not None:
        out = out + (k[:, None] > 0).float() * b2.float()
    return out.to(x.dtype)
