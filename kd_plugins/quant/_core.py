"""Quantizer math shared by the int8 layer, the calibration code, the kernel report and the Triton kernels.

Notation (a linear layer computes ``Y = X W^T``): ``X`` is ``[M, K]`` (rows = tokens, columns = input channels),
``W`` is ``[N, K]``. Everything is symmetric int8 with ``Q = 127`` (codes in ``[-127, 127]``; -128 is never used).

Activation quantizers (``x`` is one ``[M, K]`` float32 tensor; ``t_i = max_j |x_ij|``):

* ``per_token``:   ``q_ij = round(127 * x_ij / t_i)``
* ``smoothquant``: ``v = x * inv_s`` (``inv_s_j = 1 / s_j``, calibrated), ``q_ij = round(127 * v_ij / max_j |v_ij|)``
* ``crossquant``:  ``q_ij = clamp(round(127 * x_ij / (t_i^alpha * c_j^(1-alpha))))`` with *static* column maxima
  ``c_j`` from calibration; ``inv_col_j = c_j^-(1-alpha)`` is stored and ``c_j^(1-alpha)`` is folded into the weight
  columns, so the GEMM only needs the row factor ``t_i^alpha / 127`` and the weight scale ``s_k``.
* ``crossquant_dynamic``: same formula with ``c_j`` recomputed from the tensor itself (fake-quant reference, the
  weights are the plain per-channel int8 weights).
* ``crossquant_dynamic_int8``: the same codes; ``c_j^(1-alpha)`` is folded into the weights on every call and the
  layer runs an int8 GEMM (:mod:`kd_plugins.quant.dynamic`).

Every quantizer returns int8 codes and the per-row dequantization factor ``row_scale_i`` such that
``x_ij ~= q_ij * row_scale_i / inv_col_j``.
"""

from __future__ import annotations

import torch

from ..kernels import cpu_int8

QMAX = 127
#: Smallest row factor / column maximum used in a division (all-zero rows or channels quantize to code 0).
TINY = 1e-30
#: Column maxima below ``COL_FLOOR * max(c)`` are raised to that value (channels silent during calibration).
COL_FLOOR = 1e-5

METHODS = ("crossquant_dynamic_int8", "crossquant", "crossquant_dynamic", "per_token", "smoothquant")
#: Methods that need calibration statistics (static per-input-channel vector folded into the weights).
STATIC_METHODS = ("crossquant", "smoothquant")
#: Methods that measure column statistics on every call and fold them into the weights per call.
DYNAMIC_INT8_METHODS = ("crossquant_dynamic_int8",)
#: Methods whose alpha can be chosen per layer on calibration data (``alpha="auto"``).
AUTO_ALPHA_METHODS = (*STATIC_METHODS, *DYNAMIC_INT8_METHODS)
#: Methods that run as one int8 GEMM with a row x column epilogue.
INT8_METHODS = ("crossquant", "per_token", "smoothquant", *DYNAMIC_INT8_METHODS)


def check_method(method: str) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_alpha(method: str, alpha) -> float | None:
    if method == "per_token":
        return None
    if alpha is None:
        raise ValueError(f"method {method!r} needs alpha")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {a}")
    return a


def pow_alpha(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``t ** alpha`` for positive ``t`` as ``exp2(alpha * log2(t))`` (the Triton quantizer uses the same form)."""
    if alpha == 1.0:
        return t
    if alpha == 0.0:
        return torch.ones_like(t)
    return torch.exp2(alpha * torch.log2(t))


def floor_columns(c: torch.Tensor) -> torch.Tensor:
    """Raise tiny / zero column maxima to ``COL_FLOOR * max(c)`` so the column factor is finite."""
    c = c.float()
    top = float(c.max()) if c.numel() else 0.0
    return c.clamp_min(max(top * COL_FLOOR, TINY))


def crossquant_inv_col(col_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``c_j^-(1-alpha)`` (float32); the weight columns are multiplied by its reciprocal."""
    c = floor_columns(col_max).double()
    return c.pow(-(1.0 - alpha)).float()


def smoothquant_inv_scale(act_col_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """``1 / s_j`` with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (SmoothQuant migration)."""
    cx = floor_columns(act_col_max).double()
    cw = floor_columns(weight.detach().abs().amax(0)).double()
    s = cx.pow(alpha) / cw.pow(1.0 - alpha)
    s = s.clamp_min(TINY)
    return (1.0 / s).float()


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``w ~= q * scale[:, None]``. Returns (int8 ``[N, K]``, float32 ``[N]``)."""
    w = w.detach().double()
    scale = (w.abs().amax(1) / QMAX).clamp_min(TINY)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.float()


def quantize_activations(
    x: torch.Tensor, method: str, alpha: float | None, inv_col: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a ``[M, K]`` float32 activation. Returns ``(codes int8 [M,K], row_scale float32 [M], inv_col)``.

    ``inv_col`` is the per-input-channel multiplier applied before rounding (``None`` for per-token); for
    ``crossquant_dynamic`` / ``crossquant_dynamic_int8`` it is computed here from the column maxima of ``x`` (all its
    rows) and returned.
    """
    # The scaled copy is rounded and clamped in place (fewer full-size temporaries). Same float operations in the
    # same order as the Triton row quantizer, so the codes are identical.
    if method == "per_token" and _native_ok(x):
        # the native kernels: the same float operations, one pass each (the clamp cannot trigger: |x_i| <= t_i)
        r = cpu_int8.row_absmax(x).clamp_min_(TINY)
        return cpu_int8.quantize_rows(x, (QMAX / r).float()), r / QMAX, None
    if method == "per_token":
        r = _row_absmax(x)
        v = None
    elif method == "smoothquant":
        v = x * inv_col
        r = _row_absmax(v)
    elif method in ("crossquant", "crossquant_dynamic", "crossquant_dynamic_int8"):
        if method != "crossquant":
            inv_col = crossquant_inv_col(absmax(x, 0), alpha)
        v = x * inv_col
        r = pow_alpha(_row_absmax(x).clamp_min(TINY), alpha)
    else:
        raise ValueError(f"unknown method {method!r}")
    r = r.clamp_min(TINY)
    mult = (QMAX / r)[:, None]
    v = x * mult if v is None else v.mul_(mult)
    q = v.round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, r / QMAX, inv_col


def _native_ok(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.is_contiguous() and cpu_int8.usable(x)


def absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.abs().amax(dim)`` without the ``|x|`` temporary: ``max(amax, -amin)``, the same values (measured 1.4-3x
    faster on CPU at 2 threads; ``linalg.vector_norm(x, inf)`` was ~15x slower)."""
    return torch.maximum(x.amax(dim), x.amin(dim).neg_())


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return absmax(x, -1)


def per_token_codes(x: torch.Tensor) -> torch.Tensor:
    return quantize_activations(x, "per_token", None, None)[0]


def kernel_counts(x: torch.Tensor, q: torch.Tensor) -> tuple[int, int, int]:
    """(elements quantized to 0, of those the ones non-zero in full precision, exact zeros in x)."""
    zq = q == 0
    zx = x == 0
    zeros = int(zq.sum())
    exact = int(zx.sum())
    induced = int((zq & ~zx).sum())
    return zeros, induced, exact


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``int8 [M,K] @ int8 [K,N] -> int32 [M,N]`` through ``torch._int_mm``.

    On CPU (checked on torch 2.14) ``_int_mm`` accepts any shape, including ragged ones, and is exact. The CUDA
    implementation requires ``M > 16`` and ``K, N`` multiples of 8; there the operands are zero-padded (zero rows and
    columns do not change the integer result) and the result is sliced back.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm needs int8 operands, got {a.dtype} and {b.dtype}")
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cuda":
        return padded_int_mm(a, b, min_m=17, multiple=8)
    return torch._int_mm(a, b)


def padded_int_mm(a: torch.Tensor, b: torch.Tensor, *, min_m: int = 17, multiple: int = 8) -> torch.Tensor:
    """``_int_mm`` on operands zero-padded to ``M >= min_m`` and ``K, N`` multiples of ``multiple``."""
    m, k = a.shape
    n = b.shape[1]
    mp = max(m, min_m)
    kp = -(-k // multiple) * multiple
    np_ = -(-n // multiple) * multiple
    if (mp, kp) != (m, k):
        a = torch.nn.functional.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        b = torch.nn.functional.pad(b, (0, np_ - n, 0, kp - k))
    out = torch._int_mm(a.contiguous(), b)
    return out[:m, :n]
