"""``QuantizedLinear``: a W8A8 replacement for ``nn.Linear`` and 1x1 ``nn.Conv2d`` that runs real int8 GEMMs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import cpu_int8
from . import dynamic
from ._core import (
    DYNAMIC_INT8_METHODS,
    INT8_METHODS,
    STATIC_METHODS,
    check_alpha,
    check_method,
    crossquant_inv_col,
    int8_mm,
    quantize_activations,
    quantize_weight_per_channel,
    smoothquant_inv_scale,
)

MODES = ("int8", "fake")
BACKENDS = ("auto", "torch", "triton")


def is_pointwise_conv(m: nn.Module) -> bool:
    """A 2-D convolution that is a per-pixel linear map: 1x1 kernel, no padding, one group (any stride)."""
    if not isinstance(m, nn.Conv2d):
        return False
    pad = m.padding
    zero_pad = (
        pad in ("valid", 0)
        or (isinstance(pad, tuple) and all(p == 0 for p in pad))
        or (pad == "same" and tuple(m.stride) == (1, 1))
    )
    return tuple(m.kernel_size) == (1, 1) and m.groups == 1 and zero_pad and m.padding_mode == "zeros"


def is_quantizable(m: nn.Module) -> bool:
    """Exact ``nn.Linear`` or a pointwise exact ``nn.Conv2d``. Subclasses (LoRA, bitsandbytes, MultiheadAttention's
    out_proj, ...) are left alone because their owners may read ``.weight`` directly."""
    if type(m) is nn.Linear:
        return True
    return type(m) is nn.Conv2d and is_pointwise_conv(m)


class QuantizedLinear(nn.Module):
    """W8A8 linear layer: int8 per-output-channel weights, int8 activations quantized on the fly.

    Computes ``y = (row_scale ⊗ weight_scale) * (q_x @ q_w^T) + bias`` where ``q_x`` are the activation codes of
    ``method`` (see :mod:`kd_plugins.quant._core`) and ``q_w`` the int8 weights of ``W * diag(1 / act_inv_col)``
    (the static per-input-channel factor of SmoothQuant / CrossQuant folded into the weight columns).

    Modes:
        ``"int8"``: real ``int8 x int8 -> int32`` GEMM (``torch._int_mm`` on CPU, the Triton kernel on CUDA when
        triton is installed, ``torch._int_mm`` with padding otherwise) followed by the rank-1 rescale.
        ``"fake"``: dequantize both operands and run a float32 ``F.linear`` (same codes, float accumulation) for
        debugging and for ``crossquant_dynamic``, which has no int8 form.

    ``crossquant_dynamic_int8`` (:mod:`kd_plugins.quant.dynamic`) stores the plain per-channel int8 weight and, on
    every call with at least ``fallback_rows`` rows, measures the column maxima of the call's input, folds
    ``c_j^(1-alpha)`` into a requantized copy of the weight and runs the int8 GEMM (the few outlier columns above
    ``outlier_threshold`` times the median column maximum are multiplied in float with the stored int8 weight);
    calls with fewer rows (decode) run ``fallback`` (``"weight_only"``: float activations x int8 weight;
    ``"per_token"``: W8A8 per-token).

    Buffers (all saved): ``weight_int8 [N, K] int8``, ``weight_scale [N] float32``, ``act_inv_col [K] float32``
    (static methods only), ``bias [N] float32`` (if the source layer had one).
    For a 1x1 convolution (``kind="conv1x1"``) inputs ``[B, C, H, W]`` are strided, flattened to pixels, multiplied
    and reshaped back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        method: str = "crossquant",
        alpha: float | None = None,
        kind: str = "linear",
        stride: tuple[int, int] = (1, 1),
        mode: str = "int8",
        backend: str = "auto",
        fallback: str = dynamic.DEFAULT_FALLBACK,
        fallback_rows: int = dynamic.DEFAULT_FALLBACK_ROWS,
        outlier_threshold: float = dynamic.DEFAULT_OUTLIER_THRESHOLD,
        compile_quantizer: bool = False,
    ):
        super().__init__()
        check_method(method)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.method = method
        self.alpha = check_alpha(method, alpha)
        if kind not in ("linear", "conv1x1"):
            raise ValueError(f"kind must be 'linear' or 'conv1x1', got {kind!r}")
        self.kind = kind
        self.stride = tuple(int(s) for s in stride)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if method in STATIC_METHODS:
            self.register_buffer("act_inv_col", torch.ones(in_features, dtype=torch.float32))
        else:
            self.act_inv_col = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None
        self.mode = "fake" if method not in INT8_METHODS else "int8"
        self.set_mode(mode if method in INT8_METHODS else "fake")
        self.set_backend(backend)
        self.set_fallback(fallback, fallback_rows)
        self.compile_quantizer = bool(compile_quantizer)
        if (
            isinstance(outlier_threshold, bool)
            or not isinstance(outlier_threshold, (int, float))
            or outlier_threshold < 0
        ):
            raise ValueError(
                f"outlier_threshold must be a number >= 0 (0: no outlier columns), got {outlier_threshold!r}"
            )
        self.outlier_threshold = float(outlier_threshold)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        method: str = "crossquant",
        alpha: float | None = None,
        col_max: torch.Tensor | None = None,
        mode: str = "int8",
        backend: str = "auto",
        **options,
    ) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` or pointwise ``nn.Conv2d``.

        ``col_max`` (per input channel abs-max of the calibration activations) is required by the static methods.
        """
        check_method(method)
        alpha = check_alpha(method, alpha)
        if isinstance(module, nn.Linear):
            w = module.weight.detach().float()
            kind, stride = "linear", (1, 1)
        elif is_pointwise_conv(module):
            w = module.weight.detach().float().flatten(1)
            kind, stride = "conv1x1", tuple(module.stride)
        else:
            raise TypeError(
                f"QuantizedLinear.from_float supports nn.Linear and 1x1 nn.Conv2d (groups=1, no padding), got "
                f"{type(module).__name__}"
            )
        n, k = w.shape
        q = cls(
            k,
            n,
            bias=module.bias is not None,
            method=method,
            alpha=alpha,
            kind=kind,
            stride=stride,
            mode=mode,
            backend=backend,
            **options,
        )
        if method in STATIC_METHODS:
            if col_max is None:
                raise ValueError(f"method {method!r} needs calibration statistics (col_max)")
            col_max = col_max.detach().float().cpu().reshape(-1)
            if col_max.numel() != k:
                raise ValueError(f"col_max has {col_max.numel()} entries, the layer has {k} input channels")
            if method == "crossquant":
                inv = crossquant_inv_col(col_max, alpha)
            else:
                inv = smoothquant_inv_scale(col_max, w.cpu(), alpha)
            w_fold = w.cpu().double() / inv.double()[None, :]
            q.act_inv_col.copy_(inv)
        else:
            w_fold = w.cpu()
        qw, sw = quantize_weight_per_channel(w_fold)
        q.weight_int8.copy_(qw)
        q.weight_scale.copy_(sw)
        if module.bias is not None:
            q.bias.copy_(module.bias.detach().float().cpu())
        return q.to(module.weight.device)

    # ------------------------------------------------------------------ configuration
    def set_mode(self, mode: str) -> QuantizedLinear:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "int8" and self.method not in INT8_METHODS:
            raise ValueError(
                f"method {self.method!r} is the fake-quant reference of dynamic CrossQuant (static weights, float "
                "matmul) and runs in fake-quant mode only; for real int8 GEMMs re-quantize the float model with "
                "method='crossquant_dynamic_int8'"
            )
        self.mode = mode
        return self

    def set_backend(self, backend: str) -> QuantizedLinear:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        return self

    def set_fallback(self, fallback: str, fallback_rows: int) -> QuantizedLinear:
        """What a ``crossquant_dynamic_int8`` call with fewer than ``fallback_rows`` rows runs (0: never fall back)."""
        if fallback not in dynamic.FALLBACKS:
            raise ValueError(f"fallback must be one of {dynamic.FALLBACKS}, got {fallback!r}")
        if isinstance(fallback_rows, bool) or not isinstance(fallback_rows, int) or fallback_rows < 0:
            raise ValueError(f"fallback_rows must be an int >= 0 (0: never fall back), got {fallback_rows!r}")
        self.fallback = fallback
        self.fallback_rows = fallback_rows
        return self

    def extra_repr(self) -> str:
        a = "" if self.alpha is None else f", alpha={self.alpha:g}"
        s = f", stride={self.stride}" if self.kind == "conv1x1" and self.stride != (1, 1) else ""
        if self.method in DYNAMIC_INT8_METHODS:
            s += f", outlier_threshold={self.outlier_threshold:g}"
            s += f", fallback={self.fallback} below {self.fallback_rows} rows"
        return (
            f"{self.in_features}, {self.out_features}, kind={self.kind}, method={self.method}{a}, "
            f"mode={self.mode}, bias={self.bias is not None}{s}"
        )

    # ------------------------------------------------------------------ math
    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes, row scales and the per-channel multiplier used for a ``[M, K]`` input (float32).

        ``crossquant_dynamic_int8``: the codes of the dynamic path for these rows taken as one call (also below
        ``fallback_rows``, where the forward runs the fallback instead).
        """
        if self.method in DYNAMIC_INT8_METHODS:
            return self._dynamic_codes(x2d)
        return quantize_activations(x2d.float(), self.method, self.alpha, self.act_inv_col)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``[N, K]`` this layer effectively applies (in the original input space)."""
        w = self.weight_int8.float() * self.weight_scale[:, None]
        if self.act_inv_col is not None:
            w = w * self.act_inv_col[None, :]
        return w

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[M, K]`` matrix this layer multiplies for input ``x`` (pixels for a 1x1 conv)."""
        if self.kind == "conv1x1":
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return x.reshape(-1, x.shape[-1])

    #: Rows per block on the ``torch._int_mm`` path. Quantizer, GEMM and rescale then work on cache-sized pieces;
    #: measured on CPU (1 thread): 576x1536 at M=4096 47 ms -> 27 ms, 4096x4096 at M=2048 245 ms -> 194 ms. Every
    #: activation quantizer of an int8 method is per row, so blocking does not change a single output bit (the block
    #: is a multiple of every SIMD width, so the vectorised exp2/log2 of the row factor splits rows the same way).
    ROW_BLOCK = 1024

    def _matmul_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.method in DYNAMIC_INT8_METHODS:
            return self._dynamic_matmul(x2d)
        if self.mode == "int8" and x2d.shape[0] > self.ROW_BLOCK and not x2d.is_cuda:
            out = torch.empty(x2d.shape[0], self.out_features, dtype=torch.float32, device=x2d.device)
            for i in range(0, x2d.shape[0], self.ROW_BLOCK):
                out[i : i + self.ROW_BLOCK] = self._matmul_block(x2d[i : i + self.ROW_BLOCK])
            return out
        return self._matmul_block(x2d)

    def _matmul_block(self, x2d: torch.Tensor) -> torch.Tensor:
        q, rs, inv = self.quantize_input(x2d)
        if self.mode == "fake":
            xq = q.float() * rs[:, None]
            wq = self.weight_int8.float() * self.weight_scale[:, None]
            if self.method == "crossquant_dynamic":
                # dequantize the activation back to the original space: x ~= q * r_i / 127 / inv_col_j
                xq = xq / inv[None, :]
            return F.linear(xq, wq, self.bias)
        if self._backend_for(x2d) == "triton":
            from ..kernels.int8_gemm import int8_gemm

            return int8_gemm(q, self.weight_int8.t(), rs, self.weight_scale, self.bias)
        return self._int8_product(q, rs, self.weight_int8, self.weight_scale)

    def _backend_for(self, x2d: torch.Tensor) -> str:
        if self.backend == "auto":
            return "triton" if x2d.is_cuda and _triton_ok(x2d.device) else "torch"
        return self.backend

    def _int8_product(
        self,
        q: torch.Tensor,
        rs: torch.Tensor,
        w_int8: torch.Tensor,
        w_scale: torch.Tensor,
        out: torch.Tensor | None = None,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(rs ⊗ w_scale) * (q @ w_int8^T) + bias (+ extra[0] @ extra[1])`` with an exact int32 accumulation
        (``torch._int_mm``), written into ``out`` (a row slice of the call's output) when given. ``extra``: the float
        product over dynamic CrossQuant's outlier columns (``[M, R]`` and ``[R, N]``)."""
        shape = (q.shape[0], w_int8.shape[0])
        native = cpu_int8.worth(shape[0] * shape[1]) and cpu_int8.usable(q, w_int8)  # worth(): size of the product
        if native:  # exact int32 product into a reused buffer (worth() implies a non-empty product)
            acc = torch._int_mm(q, w_int8.t(), out=cpu_int8.workspace("int8.acc", shape, torch.int32))
        else:
            acc = int8_mm(q, w_int8.t())
        if native:  # one pass, the same float operations
            bias = None if self.bias is None else self.bias.float().contiguous()
            if extra is not None:
                extra = (extra[0].float().contiguous(), extra[1].float().contiguous())
            return cpu_int8.scale_int32(acc, rs.float().contiguous(), w_scale.float().contiguous(), bias, out, extra)
        y = acc.float().mul_(rs[:, None]).mul_(w_scale[None, :])  # measured faster than a mixed-dtype mul
        if self.bias is not None:
            y.add_(self.bias)
        if extra is not None:
            y.addmm_(extra[0], extra[1])
        if out is not None:
            return out.copy_(y)
        return y

    # ------------------------------------------------------------------ crossquant_dynamic_int8
    def _dynamic_plan(self, x: torch.Tensor, block: int) -> dynamic.CallPlan:
        return dynamic.plan_call(x, self.alpha, self.outlier_threshold, block, self.compile_quantizer)

    def _dynamic_codes(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, row scales and ``inv`` of ``x2d`` taken as one call of the dynamic path."""
        x = x2d.float()
        plan = self._dynamic_plan(x, x.shape[0])
        t = dynamic.row_absmax(x, plan.outliers, x.shape[0], self.compile_quantizer)
        q, rs = dynamic.step("quantize", self.compile_quantizer)(x, dynamic.row_factors(t, self.alpha), plan.inv)
        return q, rs, plan.inv

    def _dynamic_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """One call of ``crossquant_dynamic_int8`` (see :mod:`kd_plugins.quant.dynamic`)."""
        if x2d.shape[0] < self.fallback_rows or x2d.shape[0] == 0:
            return self._fallback_matmul(x2d)
        x = x2d.float()
        if self.mode == "fake":
            plan = self._dynamic_plan(x, x.shape[0])
            out = self._dynamic_fake(x, plan)
        elif self._backend_for(x) == "triton":
            plan = self._dynamic_plan(x, x.shape[0])
            out = self._dynamic_triton(x, plan)
        else:
            cc = dynamic.shared_call_codes(
                x, self.alpha, self.outlier_threshold, self.ROW_BLOCK, self.compile_quantizer
            )
            return self._dynamic_torch(x, cc)  # its epilogue adds the outlier columns' product
        return dynamic.outlier_product(out, x, plan.outliers, self.weight_int8, self.weight_scale)

    def _requantized_weight(self, plan: dynamic.CallPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This call's folded int8 weight (valid until the next layer call on this thread)."""
        return dynamic.requantize_for_call(self.weight_int8, self.weight_scale, plan.g, self.compile_quantizer)

    def _dynamic_fake(self, x: torch.Tensor, plan: dynamic.CallPlan) -> torch.Tensor:
        """The int8 path's codes and weights, dequantized, in a float matmul (``mode="fake"``)."""
        wq, ws = self._requantized_weight(plan)
        r = dynamic.row_factors(dynamic.row_absmax(x, plan.outliers, x.shape[0], self.compile_quantizer), self.alpha)
        q, rs = dynamic.step("quantize", self.compile_quantizer)(x, r, plan.inv)
        return F.linear(q.float() * rs[:, None], wq.float() * ws[:, None], self.bias)

    def _dynamic_torch(self, x: torch.Tensor, cc: dynamic.CallCodes) -> torch.Tensor:
        """``torch._int_mm`` on row blocks with this layer's requantized weight and the call's (shared) codes; the
        outlier columns' float product is added in each block's epilogue."""
        wq, ws = self._requantized_weight(cc.plan)
        extra = dynamic.outlier_operands(x, cc.plan.outliers, self.weight_int8, self.weight_scale)
        if x.shape[0] <= self.ROW_BLOCK:
            return self._int8_product(cc.codes, cc.row_scale, wq, ws, extra=extra)
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], self.ROW_BLOCK):  # cache-sized int32 / float32 temporaries (measured faster)
            rows = slice(i, i + self.ROW_BLOCK)
            part = None if extra is None else (extra[0][rows], extra[1])
            self._int8_product(cc.codes[rows], cc.row_scale[rows], wq, ws, out=out[rows], extra=part)
        return out

    def _dynamic_triton(self, x: torch.Tensor, plan: dynamic.CallPlan) -> torch.Tensor:
        from ..kernels.int8_gemm import int8_gemm, quantize_rows

        if plan.outliers.numel():  # the row quantizer takes t_i over every column it sees
            x = x.index_fill(1, plan.outliers, 0.0)
        wq, wr = quantize_rows(self.weight_int8, plan.g, alpha=1.0, rowmax_after_col=True)
        q, rs = quantize_rows(x, plan.inv, alpha=self.alpha, rowmax_after_col=False)
        return int8_gemm(q, wq.t(), rs, self.weight_scale * wr, self.bias)

    def _fallback_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """Few rows (decode): weight-only (float activations) or per-token W8A8 on the stored weight."""
        x = x2d.float()
        if self.fallback == "weight_only":
            if self.mode == "fake":
                return F.linear(x, self.weight_int8.float() * self.weight_scale[:, None], self.bias)
            return dynamic.weight_only_linear(x, self.weight_int8, self.weight_scale, self.bias)
        q, rs, _ = quantize_activations(x, "per_token", None, None)
        if self.mode == "fake":
            return F.linear(q.float() * rs[:, None], self.weight_int8.float() * self.weight_scale[:, None], self.bias)
        if self._backend_for(x) == "triton":
            from ..kernels.int8_gemm import int8_gemm

            return int8_gemm(q, self.weight_int8.t(), rs, self.weight_scale, self.bias)
        return self._int8_product(q, rs, self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kind == "conv1x1":
            if x.dim() != 4:
                raise ValueError(f"1x1-conv QuantizedLinear expects [B, C, H, W] input, got {tuple(x.shape)}")
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            b, c, h, w = x.shape
            y = self._matmul_2d(x.permute(0, 2, 3, 1).reshape(-1, c))
            return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2).to(dtype)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._matmul_2d(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features).to(dtype)


_TRITON_OK: dict[str, bool] = {}


def _triton_ok(device: torch.device) -> bool:
    key = str(device)
    if key not in _TRITON_OK:
        try:
            from ..kernels import triton_available

            _TRITON_OK[key] = triton_available(device)
        except Exception:  # pragma: no cover - broken triton install: fall back to torch._int_mm
            _TRITON_OK[key] = False
    return _TRITON_OK[key]
