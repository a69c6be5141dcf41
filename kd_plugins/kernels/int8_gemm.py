"""Triton kernels for W8A8 linear layers: a row quantizer and an int8 x int8 -> int32 GEMM with a row x column epilogue.

* :func:`quantize_rows` turns a float ``[M, K]`` activation into int8 codes and a per-row dequantization factor,
  optionally multiplying by a per-input-channel vector first (SmoothQuant / CrossQuant fold) and optionally
  raising the row maximum to a power ``alpha`` (CrossQuant's ``t_i^alpha``). Same math as
  :func:`kd_plugins.quant._core.quantize_activations`. Given an int8 weight and the per-call column factor it also
  requantizes the folded weight of dynamic CrossQuant (:mod:`kd_plugins.quant.dynamic`).
* :func:`int8_gemm` computes ``A @ B`` for int8 ``A [M, K]`` and int8 ``B [K, N]`` with an int32 accumulator and,
  when scales are given, the epilogue ``acc * row_scale[:, None] * col_scale[None, :] (+ bias)``.

Both use fixed block configurations (no autotuning): one for real GPUs, a smaller one for the Triton interpreter.
They run on a CUDA GPU, or on CPU tensors when ``TRITON_INTERPRET=1`` is set in the environment **before triton is
first imported** (triton's own helpers are built at import time; the interpreter is slow and only meant for tests at
small shapes). Anything else raises :class:`TritonUnavailableError` with the reason. ``triton_available`` and
``interpreter_enabled`` are re-exported from :mod:`._triton` (the package's single reader of ``TRITON_INTERPRET``).

Rounding: the quantizer rounds half to even like ``torch.round``, using the ``(v + 1.5*2^23) - 1.5*2^23`` identity on
fp32 values already clamped to ``[-127, 127]`` (``libdevice.rint`` is not implemented by the interpreter).
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

__all__ = [
    "TritonUnavailableError",
    "triton_available",
    "interpreter_enabled",
    "quantize_rows",
    "int8_gemm",
    "int8_gemm_reference",
    "GPU_CONFIG",
    "INTERPRETER_CONFIG",
]

_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds an fp32 |v| < 2**22 to the nearest even integer
_QMAX = 127.0
_TINY = 1e-30

#: Fixed block sizes. GPU: a conventional Ampere/Hopper-class int8 tile; interpreter: small blocks so CPU tests
#: stay fast.
GPU_CONFIG = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "BLOCK_K": 64,
    "GROUP_M": 8,
    "num_warps": 8,
    "num_stages": 3,
    "ROW_BLOCK": 1024,
}
INTERPRETER_CONFIG = {
    "BLOCK_M": 32,
    "BLOCK_N": 32,
    "BLOCK_K": 32,
    "GROUP_M": 4,
    "num_warps": 1,
    "num_stages": 1,
    "ROW_BLOCK": 64,
}


class TritonUnavailableError(RuntimeError):
    """The Triton path was requested where it cannot run (no GPU and no interpreter, or triton not installed)."""


def _check_runtime(*tensors: torch.Tensor) -> dict:
    if not _HAS_TRITON:
        raise TritonUnavailableError(
            "The Triton int8 kernels need the `triton` package (pip install 'kd-plugins[gpu]')."
        )
    devices = {t.device.type for t in tensors if t is not None}
    if interpreter_enabled():
        if type(tl.cdiv).__name__ != "InterpretedFunction":
            raise TritonUnavailableError(
                "TRITON_INTERPRET=1 was set after triton had been imported; triton decides at import time. Set it in "
                "the environment before the first `import triton` (e.g. TRITON_INTERPRET=1 python ...)."
            )
        if devices != {"cpu"}:
            raise TritonUnavailableError(
                f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got tensors on {sorted(devices)}."
            )
        return INTERPRETER_CONFIG
    if devices == {"cuda"} and torch.cuda.is_available():
        return GPU_CONFIG
    raise TritonUnavailableError(
        "The Triton int8 path needs CUDA tensors on a GPU, or TRITON_INTERPRET=1 in the environment to simulate the "
        f"kernels on CPU (slow, for tests). Got tensors on {sorted(devices)}, cuda available: "
        f"{torch.cuda.is_available()}. On CPU use backend='torch' (torch._int_mm) instead."
    )


if _HAS_TRITON:

    def _row_quant_kernel(
        x_ptr,
        inv_ptr,
        q_ptr,
        rs_ptr,
        K,
        stride_xm,
        stride_qm,
        alpha,
        HAS_COL: tl.constexpr,
        MAX_AFTER_COL: tl.constexpr,
        USE_POW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + offs
            msk = cols < K
            x = tl.load(x_ptr + row * stride_xm + cols, mask=msk, other=0.0).to(tl.float32)
            if HAS_COL and MAX_AFTER_COL:
                x = x * tl.load(inv_ptr + cols, mask=msk, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        t = tl.max(amax, axis=0)
        if USE_POW:
            r = tl.exp2(alpha * tl.log2(tl.maximum(t, 1e-30)))
        else:
            r = t
        r = tl.maximum(r, 1e-30)
        mult = 127.0 / r
        for k0 in range(0, K, BLOCK):
            cols = k0 + offs
            msk = cols < K
            x = tl.load(x_ptr + row * stride_xm + cols, mask=msk, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(inv_ptr + cols, mask=msk, other=0.0)
            v = x * mult
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)
            v = (v + 12582912.0) - 12582912.0
            tl.store(q_ptr + row * stride_qm + cols, v.to(tl.int8), mask=msk)
        tl.store(rs_ptr + row, r / 127.0)

    def _int8_gemm_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        rs_ptr,
        cs_ptr,
        bias_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_cm,
        stride_cn,
        EPILOGUE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_n
        group = pid // group_size
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = offs_k < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            )
            b = tl.load(
                b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            )
            acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = mask_m[:, None] & mask_n[None, :]
        if EPILOGUE:
            rs = tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0)
            cs = tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0)
            out = acc.to(tl.float32) * rs[:, None] * cs[None, :]
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
        else:
            tl.store(c_ptrs, acc, mask=c_mask)


_BUILT: dict[bool, tuple] = {}


def _kernels():
    """JIT-wrap the kernels once per mode (the interpreter decision is taken when ``triton.jit`` runs)."""
    key = interpreter_enabled()
    if key not in _BUILT:
        _BUILT[key] = (triton.jit(_row_quant_kernel), triton.jit(_int8_gemm_kernel))
    return _BUILT[key]


def quantize_rows(
    x: torch.Tensor,
    inv_col: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    rowmax_after_col: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8 quantization of a 2-D float tensor.

    ``v = x * inv_col`` (if given); the row factor is ``r_i = m_i ** alpha`` where ``m_i`` is the row abs-max of ``v``
    (``rowmax_after_col=True``: per-token / SmoothQuant) or of ``x`` (``False``: CrossQuant). Codes are
    ``clamp(round(127 * v / r_i), -127, 127)`` and the returned row scale is ``r_i / 127``.

    ``x`` may also be an int8 weight: ``quantize_rows(w_int8, g)`` requantizes ``w_int8 diag(g)`` per output channel
    (the per-call weight fold of dynamic CrossQuant, :mod:`kd_plugins.quant.dynamic`); multiply the stored per-channel
    weight scale by the returned row scale.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype == torch.int8):
        raise TypeError(f"quantize_rows expects a float (or int8) tensor, got {x.dtype}")
    if inv_col is not None and inv_col.shape != (x.shape[1],):
        raise ValueError(f"inv_col must have shape ({x.shape[1]},), got {tuple(inv_col.shape)}")
    cfg = _check_runtime(x, inv_col)
    row_kernel, _ = _kernels()
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    rs = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, rs
    inv = inv_col.float().contiguous() if inv_col is not None else rs  # dummy pointer when unused
    block = min(cfg["ROW_BLOCK"], triton.next_power_of_2(max(k, 16)))
    row_kernel[(m,)](
        x,
        inv,
        q,
        rs,
        k,
        x.stride(0),
        q.stride(0),
        float(alpha),
        HAS_COL=inv_col is not None,
        MAX_AFTER_COL=bool(rowmax_after_col),
        USE_POW=float(alpha) != 1.0,
        BLOCK=block,
    )
    return q, rs


def _check_gemm_args(a, b, row_scale, col_scale, bias) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_gemm needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int8_gemm shape mismatch: A {tuple(a.shape)} @ B {tuple(b.shape)}")
    if (row_scale is None) != (col_scale is None):
        raise ValueError("pass both row_scale and col_scale, or neither (raw int32 output)")
    if bias is not None and row_scale is None:
        raise ValueError("bias needs the scaled epilogue (row_scale and col_scale)")
    if row_scale is None:
        return
    m, n = a.shape[0], b.shape[1]
    if row_scale.numel() != m or col_scale.numel() != n:
        raise ValueError(
            f"row_scale must have {m} entries and col_scale {n}, got {row_scale.numel()} and {col_scale.numel()}"
        )
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must have {n} entries, got {bias.numel()}")


def int8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``int8 A [M, K] @ int8 B [K, N]``. Without scales returns the exact int32 product; with ``row_scale [M]`` and
    ``col_scale [N]`` returns ``acc * row_scale[:, None] * col_scale[None, :] + bias`` in ``out_dtype``.

    ``B`` may be any strided view (pass ``weight_int8.t()`` for an ``[N, K]`` weight without copying).
    """
    _check_gemm_args(a, b, row_scale, col_scale, bias)
    m, k = a.shape
    n = b.shape[1]
    epilogue = row_scale is not None
    cfg = _check_runtime(a, b, row_scale, col_scale, bias)
    _, gemm_kernel = _kernels()
    c = torch.empty((m, n), dtype=out_dtype if epilogue else torch.int32, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_() if bias is None else c.copy_(bias.to(c.dtype).expand(m, n))
    rs = row_scale.float().contiguous() if epilogue else c
    cs = col_scale.float().contiguous() if epilogue else c
    bs = bias.float().contiguous() if bias is not None else c
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    gemm_kernel[grid](
        a,
        b,
        c,
        rs,
        cs,
        bs,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        EPILOGUE=epilogue,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return c


def int8_gemm_reference(a: torch.Tensor, b: torch.Tensor, row_scale=None, col_scale=None, bias=None) -> torch.Tensor:
    """Exact integer reference (int64 accumulation); with scales, the epilogue in float64."""
    acc = a.to(torch.int64) @ b.to(torch.int64)
    if row_scale is None:
        return acc
    out = acc.double() * row_scale.double()[:, None] * col_scale.double()[None, :]
    if bias is not None:
        out = out + bias.double()[None, :]
    return out
