"""Dynamic CrossQuant on real int8 GEMMs (method ``"crossquant_dynamic_int8"``): the math of one call.

CrossQuant (Liu et al., arXiv 2410.07505) quantizes activation element ``(i, j)`` with step
``t_i^alpha * c_j^(1-alpha) / 127``, ``t_i`` the row abs-max and ``c_j`` the column abs-max *of the tensor itself*.
Here both are measured on every call, and the column factor is moved into the weights on every call.

**What "per call" means.** One forward call of a layer sees ``X [M, K]``: every row of its input flattened to
``[tokens, in_features]`` -- all sequences of the batch and all their positions (padding positions included: the
layer has no attention mask), or every pixel of the batch for a 1x1 convolution. ``c_j = max_i |X_ij|`` runs over
those ``M`` rows, so a token's output depends on the other rows of the same call (batch composition, padding, prefill
length). ``M`` is also what the decode fallback looks at (below).

**Per call** (``W ~= diag(s0) w0``: the stored int8 weight, per output channel, quantized once):

1. ``c_j = max_i |X_ij|`` (:func:`plan_call`); columns below ``COL_FLOOR * max(c)`` are raised to it. *Outlier
   columns* ``O``: the at most ``K // 64`` largest ``c_j`` that exceed ``outlier_threshold`` times the median ``c``
   (``outlier_threshold=0``: none). ``g_j = c_j^(1-alpha)``, ``inv_j = 1 / g_j`` (float64, then float32), both set
   to 0 on ``O``.
2. Weight fold and requantization (:func:`requantize_weight`, ``O(N*K)``): ``m_k = max_j |w0_kj| g_j``,
   ``w'_kj = round(127 w0_kj g_j / m_k)``, ``s'_k = s0_k m_k / 127`` -- the per-output-channel int8 form of
   ``W diag(g)``. Requantizing the int8 codes (not a float copy) keeps the layer int8 in memory and on disk.
3. Activation codes (:func:`row_absmax`, :func:`row_factors`, :func:`quantize_rows_dynamic`):
   ``t_i = max_{j not in O} |X_ij|``, ``q_ij = round(127 X_ij inv_j / t_i^alpha)`` (0 on ``O``). No clamp is needed:
   ``|X_ij| = |X_ij|^alpha |X_ij|^(1-alpha) <= t_i^alpha c_j^(1-alpha)``, so ``|q_ij| <= 127``. Without outlier
   columns these are exactly the codes of the fake-quant ``"crossquant_dynamic"``.
4. ``Y_ik = (t_i^alpha / 127) s'_k sum_j q_ij w'_kj + b_k + sum_{j in O} X_ij s0_k w0_kj``: one
   ``int8 x int8 -> int32`` GEMM with a row x column epilogue, plus a float product over the few outlier columns
   with the stored int8 weights (the mixed-precision decomposition of LLM.int8(), Dettmers et al. 2022).

Why the outlier columns: the fold multiplies weight column ``j`` by ``g_j``, so the per-output-channel step of ``w'``
is set by the largest ``g_j`` -- a handful of outlier channels coarsen every other weight of the row. Measured on
SmolLM2-135M (benchmarks/quant/RESULTS_quant.md) the fold's weight error dominated the int8 form's perplexity loss;
taking the (per call, about 1 of 576 and 5 of 1536) outlier columns out of the fold brings it to the accuracy of the
fake-quant paper form.

Cost: step 2 is ``O(N*K)`` per call, about ``1/M`` of the GEMM, negligible at prefill but dominant at decode. So a
call with fewer than ``fallback_rows`` rows (default 32) does not run steps 1-4 (:data:`FALLBACKS`): ``"per_token"``
(default) runs W8A8 per-token on the stored weight (the accuracy of ``method="per_token"`` for those tokens);
``"weight_only"`` multiplies the float activations by the stored int8 weight (``torch._weight_int8pack_mm`` on CPU:
no activation rounding at all, but slow on CPUs without a fast kernel for it).

On CPU every step runs on the native kernels of :mod:`kd_plugins.kernels.cpu_int8` (one pass each, bit for bit the
eager steps below, which stay the reference and the fallback; see :func:`step`).

The torch path (CPU: ``torch._int_mm``) and the Triton path (:mod:`kd_plugins.kernels.int8_gemm`: the same row
quantizer on the weight and on the activation, then the int8 GEMM) use the same float operations in the same order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import cpu_int8
from ._core import QMAX, TINY, absmax, floor_columns, pow_alpha

__all__ = [
    "FALLBACKS",
    "DEFAULT_FALLBACK",
    "DEFAULT_FALLBACK_ROWS",
    "DEFAULT_OUTLIER_THRESHOLD",
    "OUTLIER_SHARE",
    "CallPlan",
    "CallCodes",
    "plan_call",
    "call_codes",
    "shared_call_codes",
    "clear_shared_call",
    "select_outliers",
    "column_factors",
    "requantize_weight",
    "requantize_for_call",
    "row_absmax",
    "row_factors",
    "quantize_rows_dynamic",
    "outlier_operands",
    "outlier_product",
    "weight_only_linear",
    "step",
]

#: What a ``crossquant_dynamic_int8`` layer does on calls with fewer than ``fallback_rows`` rows (decode).
FALLBACKS = ("weight_only", "per_token")
#: ``"per_token"``: on CPU (measured, SmolLM2-135M shapes, 1 thread) it runs a 1-row call as fast as fp32 and 4-64
#: rows 2-3.5x faster, while ``torch._weight_int8pack_mm`` (``"weight_only"``) was 5x slower than fp32 at 1 row and
#: grows with every row (benchmarks/quant/RESULTS_quant.md). ``"weight_only"`` is the more accurate one (no
#: activation rounding) where that kernel is fast.
DEFAULT_FALLBACK = "per_token"
#: Calls with fewer rows use the fallback. Measured per layer (SmolLM2 576 x 1536 and 1536 x 576, 1 thread, native
#: CPU kernels; benchmarks/quant/RESULTS_quant.md): the dynamic path, the accurate one, is as fast as fp32 at 16 rows
#: and 1.2-1.3x faster from 32 rows (2x faster at 128). 32 keeps every call of 32 rows or more (prompts, batched
#: decoding of 32+ sequences) on it. (With the eager steps the crossover was near 256 rows and the default was 128.)
DEFAULT_FALLBACK_ROWS = 32
#: Outlier columns: per-call column abs-max above this multiple of the median column abs-max (0: none).
DEFAULT_OUTLIER_THRESHOLD = 8.0
#: At most ``K // OUTLIER_SHARE`` (and at least 1) outlier columns per call, so the float part stays small.
OUTLIER_SHARE = 64


@dataclass
class CallPlan:
    """The per-call column quantities of one ``[M, K]`` input."""

    #: ``c_j^-(1-alpha)`` (float32 ``[K]``), 0 on outlier columns
    inv: torch.Tensor
    #: ``c_j^(1-alpha)`` (float32 ``[K]``), 0 on outlier columns
    g: torch.Tensor
    #: indices of the outlier columns (int64, ascending; may be empty)
    outliers: torch.Tensor


@dataclass
class CallCodes:
    """Everything of one call that depends on the input only (not on the layer's weight)."""

    plan: CallPlan
    #: activation codes, int8 ``[M, K]`` (0 on outlier columns)
    codes: torch.Tensor
    #: row scales ``t_i^alpha / 127``, float32 ``[M]``
    row_scale: torch.Tensor


def select_outliers(col_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (ascending) of the at most ``K // 64`` largest column maxima above ``threshold * median``."""
    k = col_max.numel()
    if threshold <= 0 or k == 0:
        return torch.zeros(0, dtype=torch.long, device=col_max.device)
    top = torch.topk(col_max, max(1, k // OUTLIER_SHARE)).indices
    keep = top[col_max[top] > threshold * col_max.median()]
    return keep.sort().values


def column_factors(col_max: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, g)`` float32: ``inv_j = c_j^-(1-alpha)`` and ``g_j = c_j^(1-alpha)`` of the floored column maxima.

    ``inv`` is computed exactly as :func:`~kd_plugins.quant._core.crossquant_inv_col` does, so without outlier columns
    the activation codes equal those of the fake-quant ``crossquant_dynamic``.
    """
    c = floor_columns(col_max).double()
    return c.pow(-(1.0 - alpha)).float(), c.pow(1.0 - alpha).float()


def _col_absmax(x: torch.Tensor) -> torch.Tensor:
    return absmax(x, 0)


def plan_call(x: torch.Tensor, alpha: float, outlier_threshold: float, block: int, compiled: bool = False) -> CallPlan:
    """Column maxima of the whole call ``x [M, K]`` (on row blocks of ``block`` rows: cache-sized ``|x|``
    temporaries; a maximum does not depend on how the rows are split), outlier columns and column factors."""
    fn = step("colmax", compiled)
    if x.shape[0] <= block:
        c = fn(x)
    else:
        c = fn(x[:block])
        for i in range(block, x.shape[0], block):
            c = torch.maximum(c, fn(x[i : i + block]))
    outliers = select_outliers(c, outlier_threshold)
    inv, g = column_factors(c, alpha)
    if outliers.numel():
        inv[outliers] = 0.0
        g[outliers] = 0.0
    return CallPlan(inv, g, outliers)


def _row_absmax_masked(x: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """``max_j |x_ij|`` over the columns that are not outlier columns."""
    if not x.shape[1]:
        return x.new_zeros(x.shape[0])
    if not outliers.numel():
        return absmax(x, 1)
    a = x.abs()
    a.index_fill_(1, outliers, 0.0)
    return a.amax(1)


def row_absmax(x: torch.Tensor, outliers: torch.Tensor, block: int, compiled: bool = False) -> torch.Tensor:
    """``t_i``: the row abs-max of ``x`` outside the outlier columns (on row blocks of ``block`` rows)."""
    fn = step("rowmax", compiled)
    if x.shape[0] <= block:
        return fn(x, outliers)
    return torch.cat([fn(x[i : i + block], outliers) for i in range(0, x.shape[0], block)])


def row_factors(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``t_i^alpha`` (float32, floored at ``TINY``) from the row abs-maxima, computed once for the whole call (the
    vectorised ``exp2`` / ``log2`` then see the same lanes whatever the row blocks)."""
    return pow_alpha(t.clamp_min(TINY), alpha).clamp_min_(TINY)


def requantize_weight(
    w_int8: torch.Tensor, w_scale: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 form of ``diag(w_scale) w_int8 diag(g)``: ``(codes int8 [N, K], scale float32 [N])``.

    ``m_k = max_j |w_kj g_j|``, codes ``round(w_kj g_j * (127 / m_k))``, scale ``w_scale_k * m_k / 127``: the same float
    operations as :func:`kd_plugins.kernels.int8_gemm.quantize_rows` with ``inv_col=g`` (no clamp needed: every
    ``|w_kj g_j| <= m_k``).
    """
    # exact int8 -> float32 conversion first: a mixed-dtype ``w_int8 * g`` was measured 9x slower on CPU
    v = w_int8.to(g.dtype).mul_(g)
    m = absmax(v, 1).clamp_min_(TINY) if v.shape[1] else v.new_full((v.shape[0],), TINY)
    v.mul_((QMAX / m)[:, None]).round_()
    return v.to(torch.int8), w_scale * (m / QMAX)


def quantize_rows_dynamic(x: torch.Tensor, r: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``round(127 x_ij inv_j / r_i)`` (int8) and row scales ``r_i / 127`` of a ``[M, K]`` block.

    ``r`` are the row factors (:func:`row_factors`). Same float operations in the same order as
    :func:`~kd_plugins.quant._core.quantize_activations` (``"crossquant"`` branch) minus its clamp, which cannot
    trigger here (see the module docstring).
    """
    v = x * inv
    v.mul_((QMAX / r)[:, None]).round_()
    return v.to(torch.int8), r / QMAX


def outlier_operands(
    x: torch.Tensor, outliers: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x[:, O], (diag(w_scale) w_int8[:, O])^T)`` (``[M, R]``, ``[R, N]``): the two factors of the float product
    over the outlier columns; ``None`` without outlier columns."""
    if not outliers.numel():
        return None
    w = w_int8[:, outliers].to(x.dtype) * w_scale.to(x.dtype)[:, None]
    return x[:, outliers], w.t()


def outlier_product(
    y: torch.Tensor, x: torch.Tensor, outliers: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """``y += x[:, O] @ (diag(w_scale) w_int8[:, O])^T`` in float (the outlier columns; in place, returns ``y``)."""
    factors = outlier_operands(x, outliers, w_int8, w_scale)
    if factors is not None:
        y.addmm_(*factors)
    return y


def call_codes(x: torch.Tensor, alpha: float, outlier_threshold: float, block: int, compiled: bool) -> CallCodes:
    """Steps 1 and 3 of the module docstring for a float32 ``[M, K]`` call (codes on row blocks of ``block``; the
    native kernels stream the whole call: blocking changes no result, only the eager temporaries' size)."""
    if not compiled and x.dtype == torch.float32 and cpu_int8.usable(x):
        block = max(block, x.shape[0])
    plan = plan_call(x, alpha, outlier_threshold, block, compiled)
    r = row_factors(row_absmax(x, plan.outliers, block, compiled), alpha)
    quantize = step("quantize", compiled)
    if x.shape[0] <= block:
        q, rs = quantize(x, r, plan.inv)
        return CallCodes(plan, q, rs)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    for i in range(0, x.shape[0], block):
        codes[i : i + block] = quantize(x[i : i + block], r[i : i + block], plan.inv)[0]
    return CallCodes(plan, codes, r / QMAX)


class _LastCall(threading.local):
    """The input and codes of the last dynamic call on this thread (see :func:`shared_call_codes`)."""

    key: tuple | None = None
    input: torch.Tensor | None = None
    codes: CallCodes | None = None


_LAST = _LastCall()


def _call_key(x: torch.Tensor, *options) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype, x.device, *options)


def shared_call_codes(x: torch.Tensor, alpha: float, outlier_threshold: float, block: int, compiled: bool) -> CallCodes:
    """:func:`call_codes`, reused by consecutive layers that read the same input with the same options.

    Projections that share an input (attention q/k/v, MLP gate/up) would otherwise measure the same column and row
    maxima and quantize the same activation codes once each. The last call's input is kept referenced, so its memory
    cannot be reused by another tensor while its key (address, shape, strides, version counter, options) is cached;
    an in-place write bumps the version and misses. Inputs that require grad are never shared.
    """
    if x.requires_grad:
        return call_codes(x, alpha, outlier_threshold, block, compiled)
    key = _call_key(x, alpha, outlier_threshold, block, compiled)
    if _LAST.key == key and _LAST.input is not None:
        return _LAST.codes
    codes = call_codes(x, alpha, outlier_threshold, block, compiled)
    _LAST.key, _LAST.input, _LAST.codes = key, x, codes
    return codes


def clear_shared_call() -> None:
    """Drop the cached last call (it holds one input and its codes)."""
    _LAST.key, _LAST.input, _LAST.codes = None, None, None


def weight_only_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ (diag(w_scale) w_int8)^T + bias`` with float ``x`` [M, K] (the decode fallback ``"weight_only"``).

    On CPU ``torch._weight_int8pack_mm`` reads the int8 weight directly (a kernel for few rows: slow at prefill
    sizes); elsewhere the weight is dequantized first.
    """
    if x.device.type == "cpu" and _int8pack_ok(x, w_int8):
        y = torch._weight_int8pack_mm(x.contiguous(), w_int8, w_scale)
    else:
        y = F.linear(x, w_int8.to(x.dtype) * w_scale.to(x.dtype)[:, None])
    return y if bias is None else y.add_(bias)


def _int8pack_ok(x: torch.Tensor, w_int8: torch.Tensor) -> bool:
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and x.dtype == torch.float32
        and 0 < x.shape[0] <= 256
        and w_int8.is_contiguous()
        and w_int8.shape[1] > 0
    )


_EAGER = {
    "colmax": _col_absmax,
    "rowmax": _row_absmax_masked,
    "requantize": requantize_weight,
    "quantize": quantize_rows_dynamic,
}
_COMPILED: dict[str, object] = {}


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _native_colmax(x: torch.Tensor) -> torch.Tensor:
    if not cpu_int8.usable(x) or x.dtype != torch.float32:
        return _col_absmax(x)
    return cpu_int8.col_absmax(x.contiguous())


def _native_rowmax(x: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    if not cpu_int8.usable(x) or x.dtype != torch.float32:
        return _row_absmax_masked(x, outliers)
    keep = None
    if outliers.numel():
        keep = torch.ones(x.shape[1], dtype=torch.float32)
        keep[outliers] = 0.0
    return cpu_int8.row_absmax(x.contiguous(), keep)


def _native_requantize(
    w_int8: torch.Tensor, w_scale: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not cpu_int8.usable(w_int8, g) or g.dtype != torch.float32:
        return requantize_weight(w_int8, w_scale, g)
    q, m = cpu_int8.requantize_weight(w_int8.contiguous(), g.contiguous(), out=out)
    return q, w_scale * (m / QMAX)


def requantize_for_call(
    w_int8: torch.Tensor, w_scale: torch.Tensor, g: torch.Tensor, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 for one layer call: :func:`step` ``("requantize")``, except that on the native CPU kernels the codes are
    written into this thread's workspace (:func:`kd_plugins.kernels.cpu_int8.workspace`): they are valid until the
    next call, which is all a layer call needs, and no fresh weight-sized buffer is allocated per call."""
    if compiled:
        return step("requantize", compiled)(w_int8, w_scale, g)
    out = cpu_int8.workspace("dynamic.weight", tuple(w_int8.shape), torch.int8) if cpu_int8.usable(w_int8, g) else None
    return _native_requantize(w_int8, w_scale, g, out)


def _native_quantize(x: torch.Tensor, r: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not cpu_int8.usable(x, r, inv) or x.dtype != torch.float32:
        return quantize_rows_dynamic(x, r, inv)
    return cpu_int8.quantize_rows(x.contiguous(), _f32(QMAX / r), _f32(inv)), r / QMAX


#: The same four steps on the native CPU kernels (:mod:`kd_plugins.kernels.cpu_int8`): bit for bit the eager results
#: (each native function falls back to its eager twin off CPU or when the kernels could not be built).
_NATIVE = {
    "colmax": _native_colmax,
    "rowmax": _native_rowmax,
    "requantize": _native_requantize,
    "quantize": _native_quantize,
}


def step(name: str, compiled: bool = False):
    """One step of the dynamic path (``"colmax"``, ``"rowmax"``, ``"requantize"``, ``"quantize"``).

    Default: the native CPU kernels (one OpenMP pass per step, the eager step's exact results) where they are built,
    else eager PyTorch. ``compiled=True`` (``QuantConfig(compile_quantizer=True)``): the ``torch.compile``d eager
    step (one fused loop, shapes symbolic), which also serves non-CPU tensors.
    """
    if compiled:
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True)
        return _COMPILED[name]
    return _NATIVE[name]
