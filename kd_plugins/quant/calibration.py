"""Running calibration batches through a model: layer-input capture, activation statistics, per-layer alpha search."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._utils import model_device
from . import dynamic
from ._core import (
    AUTO_ALPHA_METHODS,
    DYNAMIC_INT8_METHODS,
    check_alpha,
    check_method,
    crossquant_inv_col,
    per_token_codes,
    quantize_activations,
    quantize_weight_per_channel,
    smoothquant_inv_scale,
)
from .config import DEFAULT_ALPHA_GRID
from .layers import QuantizedLinear, is_pointwise_conv
from .targets import find_quantizable

__all__ = [
    "LayerStats",
    "collect_activation_stats",
    "LayerAlphaSearch",
    "calibrate_layer_alphas",
    "DEFAULT_ALPHA_GRID",
]

#: ``on_rows(layer name, module, rows)``: called with the ``[rows, K]`` float32 input matrix of a layer.
RowCallback = Callable[[str, nn.Module, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------------------- batches
def as_batches(data, what: str) -> list:
    """``data`` as a non-empty list of batches (a single dict / tensor is one batch); clear errors otherwise."""
    if data is None:
        raise ValueError(f"{what} is required")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(
            f"{what} must be an iterable of batches (dicts, tensors or tuples), got {type(data).__name__}"
        ) from None
    if not batches:
        raise ValueError(f"{what} is empty: pass at least one batch")
    for b in batches:
        if not isinstance(b, (torch.Tensor, Mapping, tuple, list)):
            raise TypeError(
                f"{what}: each batch must be a dict of model inputs, a tensor or a tuple, got {type(b).__name__}"
            )
    return batches


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _forward(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def call_model(model: nn.Module, batch, device):
    """``model`` on ``batch`` (dict: keyword inputs, tuple: positional inputs, tensor: the input) on ``device``."""
    return _forward(model, _to(batch, device))


def _padding_mask(batch) -> torch.Tensor | None:
    """The ``[batch, seq]`` boolean ``attention_mask`` of a dict batch (True = real token), if it has one."""
    am = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else None


def _input_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The ``[rows, K]`` float32 matrix a linear / pointwise conv multiplies, padding rows (``mask`` False) removed."""
    if isinstance(module, QuantizedLinear):
        if module.kind == "conv1x1":
            return module.rows(x).float()
    elif is_pointwise_conv(module):
        s = module.stride
        if tuple(s) != (1, 1):
            x = x[:, :, :: s[0], :: s[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, x.shape[-1]).float()
    return x.reshape(-1, x.shape[-1]).float()


@contextlib.contextmanager
def eval_no_grad(model: nn.Module):
    """``model`` in eval mode under ``torch.no_grad()``; its training flag is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def with_progress(items, progress: bool, desc: str, unit: str = "batch"):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit)
    return items


class _RowCapture:
    """Forward pre-hooks that hand the input rows of some layers to ``on_rows``.

    The padding mask of the batch being run lives on this object, which belongs to one :func:`run_on_rows` call, so
    nested or concurrent calibration runs never see each other's masks.
    """

    def __init__(self, on_rows: RowCallback):
        self.on_rows = on_rows
        self.mask: torch.Tensor | None = None

    def hook_for(self, name: str):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            rows = _input_rows(mod, x.detach(), self.mask)
            if rows.shape[0] and rows.numel():
                self.on_rows(name, mod, rows)

        return hook

    def run(self, model: nn.Module, batch, device) -> None:
        batch = _to(batch, device)
        self.mask = _padding_mask(batch)
        try:
            _forward(model, batch)
        finally:
            self.mask = None


def run_on_rows(
    model: nn.Module, modules: Mapping[str, nn.Module], on_rows: RowCallback, batches, progress: bool, desc: str
) -> None:
    """Run ``batches`` through ``model`` (eval, no grad) and call ``on_rows(name, module, rows)`` with the ``[rows, K]``
    input matrix of every module in ``modules`` (padding rows removed; empty inputs skipped)."""
    capture = _RowCapture(on_rows)
    handles = [m.register_forward_pre_hook(capture.hook_for(n)) for n, m in modules.items()]
    device = model_device(model)
    try:
        with eval_no_grad(model):
            for b in with_progress(batches, progress, desc):
                capture.run(model, b, device)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Calibration statistics of one layer input: per-input-channel abs-max and the number of rows seen."""

    col_max: torch.Tensor
    rows: int = 0


def collect_activation_stats(
    model: nn.Module,
    calibration_data,
    *,
    skip: Iterable[str] | None = None,
    default_skip: bool = True,
    min_rows: int = 16,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Run ``calibration_data`` through the float model and record each target layer's input column abs-max.

    Padding positions (``attention_mask == 0`` in dict batches) are excluded. Raises ``ValueError`` when the data is
    empty, when a layer never runs, or when a layer saw fewer than ``min_rows`` rows (too little data for a static
    column maximum).
    """
    targets, _ = find_quantizable(model, skip, default_skip=default_skip)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no quantizable layers (nn.Linear / 1x1 nn.Conv2d) after skips")
    batches = as_batches(calibration_data, "calibration_data")
    stats: dict[str, LayerStats] = {}

    def on_rows(name, mod, rows):
        cm = rows.abs().amax(0).cpu()
        if not torch.isfinite(cm).all():
            raise ValueError(f"non-finite activations reached {name} during calibration")
        st = stats.get(name)
        if st is None:
            stats[name] = LayerStats(cm, rows.shape[0])
        else:
            torch.maximum(st.col_max, cm, out=st.col_max)
            st.rows += rows.shape[0]

    run_on_rows(model, targets, on_rows, batches, progress, "calibrating")
    _check_coverage(targets, stats, min_rows)
    return stats


def _check_coverage(targets: Mapping[str, nn.Module], stats: Mapping[str, LayerStats], min_rows: int) -> None:
    missing = [n for n in targets if n not in stats]
    if missing:
        raise ValueError(
            f"{len(missing)} layer(s) never ran on the calibration data (e.g. {missing[:3]}); pass data that reaches "
            "them or add them to skip"
        )
    short = {n: s.rows for n, s in stats.items() if s.rows < min_rows}
    if short:
        n0 = next(iter(short))
        raise ValueError(
            f"calibration data too short: {len(short)} layer(s) saw fewer than {min_rows} rows (e.g. {n0}: "
            f"{short[n0]} rows); pass more or longer calibration samples"
        )


# ----------------------------------------------------------------------------------------------------- alpha search
@dataclass
class LayerAlphaSearch:
    """Per-layer alpha search of one layer: relative matmul error and kernel share for every alpha tried."""

    name: str
    alphas: list[float]
    errors: list[float]
    kernels: list[float]
    per_token_kernel: float
    chosen: float
    #: False when no alpha of the grid had a kernel strictly below per-token's on the calibration rows (the alpha
    #: with the lowest error was taken anyway).
    kernel_below_per_token: bool


def _layer_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().float()
    return w.flatten(1) if w.dim() == 4 else w


class _AlphaScores:
    """Accumulates, for one layer, the matmul error and the zero codes of every alpha of the grid on its rows."""

    def __init__(self, grid: list[float]):
        self.err = [0.0] * len(grid)
        self.zeros = [0] * len(grid)
        self.ref = 0.0
        self.pt_zeros = 0
        self.elements = 0

    def add(
        self,
        method: str,
        grid: list[float],
        rows: torch.Tensor,
        w: torch.Tensor,
        col_max: torch.Tensor,
        outlier_threshold: float = 0.0,
    ) -> None:
        """Quantize the layer exactly as :func:`quantize` would, for every alpha, and score it on ``rows``.

        ``col_max``: the calibrated column maxima (static methods) or those of the call ``rows`` come from (dynamic).
        """
        ref = rows @ w.T
        self.ref += float(ref.pow(2).sum())
        self.elements += rows.numel()
        self.pt_zeros += int((per_token_codes(rows) == 0).sum())
        if method in DYNAMIC_INT8_METHODS:
            self._add_dynamic(grid, rows, w, col_max, ref, outlier_threshold)
            return
        for i, alpha in enumerate(grid):
            if method == "crossquant":
                inv = crossquant_inv_col(col_max, alpha)
            else:
                inv = smoothquant_inv_scale(col_max, w, alpha)
            qw, sw = quantize_weight_per_channel(w.double() / inv.double()[None, :])
            wq = (qw.float() * sw[:, None]) * inv[None, :]
            codes, rs, _ = quantize_activations(rows, method, alpha, inv)
            xq = codes.float() * rs[:, None] / inv[None, :]
            self.err[i] += float((xq @ wq.T - ref).pow(2).sum())
            self.zeros[i] += int((codes == 0).sum())

    def _add_dynamic(self, grid, rows, w, col_max, ref, outlier_threshold: float) -> None:
        """``crossquant_dynamic_int8``: per-call column factor (and outlier columns), weight requantized from its
        stored int8 form, as the layer does."""
        w_int8, w_scale = quantize_weight_per_channel(w)
        outliers = dynamic.select_outliers(col_max, outlier_threshold)
        for i, alpha in enumerate(grid):
            inv, g = dynamic.column_factors(col_max, alpha)
            inv[outliers], g[outliers] = 0.0, 0.0
            wq, ws = dynamic.requantize_weight(w_int8, w_scale, g)
            t = dynamic.row_absmax(rows, outliers, rows.shape[0])
            codes, rs = dynamic.quantize_rows_dynamic(rows, dynamic.row_factors(t, alpha), inv)
            y = (codes.float() * rs[:, None]) @ (wq.float() * ws[:, None]).T
            dynamic.outlier_product(y, rows, outliers, w_int8, w_scale)
            self.err[i] += float((y - ref).pow(2).sum())
            self.zeros[i] += int((codes == 0).sum())

    def choose(self, name: str, grid: list[float], require_kernel_below_per_token: bool) -> LayerAlphaSearch:
        if self.elements == 0:
            raise ValueError(f"layer {name} never ran on the calibration data; pass data that reaches it or skip it")
        errors = [e / max(self.ref, 1e-30) for e in self.err]
        kernels = [z / self.elements for z in self.zeros]
        ok = [i for i in range(len(grid)) if self.zeros[i] < self.pt_zeros]
        pool = ok if (ok and require_kernel_below_per_token) else range(len(grid))
        best = min(pool, key=lambda i: (errors[i], i))
        return LayerAlphaSearch(name, list(grid), errors, kernels, self.pt_zeros / self.elements, grid[best], bool(ok))


def calibrate_layer_alphas(
    model: nn.Module,
    calibration_data,
    *,
    method: str = "crossquant",
    stats: dict[str, LayerStats] | None = None,
    grid: Iterable[float] = DEFAULT_ALPHA_GRID,
    max_rows: int = 2048,
    require_kernel_below_per_token: bool = True,
    outlier_threshold: float = 0.0,
    skip: Iterable[str] | None = None,
    default_skip: bool = True,
    min_rows: int = 16,
    progress: bool = False,
) -> dict[str, LayerAlphaSearch]:
    """Choose ``alpha`` separately for every layer from the calibration data (what ``quantize(alpha="auto")`` uses).

    For each target layer and each ``alpha`` in ``grid`` the layer is quantized exactly as :func:`quantize` would
    (static column factor folded into the weights, int8 weights per output channel, int8 activation codes) and
    applied, in float, to up to ``max_rows`` of its own calibration input rows (evenly spaced, padding excluded). The
    score is the relative error of the matmul, ``||Q(X) Q(W)^T - X W^T||^2 / ||X W^T||^2``. The chosen alpha has the
    lowest error among those whose quantization kernel (share of activation codes equal to 0) is strictly below
    per-token's on the same rows; with ``require_kernel_below_per_token=False`` (or when no alpha qualifies, which is
    recorded in the result) it is simply the lowest error.

    ``crossquant_dynamic_int8``: no statistics pass; each call's column maxima (over its non-padding rows) define the
    column factor and the outlier columns (``outlier_threshold``) of that call, and the weight is requantized from its
    stored int8 form, as the layer does.

    Why per layer: with a *static* column maximum ``c_j``, rows whose own maximum ``t_i`` is below ``c_j`` get a
    larger step than per-token (``t_i^a c_j^(1-a) > t_i``); in layers fed by a few outlier tokens (``down_proj``,
    ``o_proj`` of LLMs) one global alpha can therefore enlarge the kernel, while other layers want a small alpha.

    Costs one extra pass over ``calibration_data`` plus ``len(grid)`` quantized matmuls per layer on ``max_rows`` rows.
    """
    check_method(method)
    if method not in AUTO_ALPHA_METHODS:
        raise ValueError(f"per-layer alpha calibration applies to {AUTO_ALPHA_METHODS}, got {method!r}")
    grid = sorted({check_alpha(method, a) for a in grid})
    if not grid:
        raise ValueError("grid is empty")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    batches = as_batches(calibration_data, "calibration_data")
    per_call = method in DYNAMIC_INT8_METHODS  # column maxima of each call, no static statistics
    if stats is None and not per_call:
        stats = collect_activation_stats(
            model, batches, skip=skip, default_skip=default_skip, min_rows=min_rows, progress=progress
        )
    targets, _ = find_quantizable(model, skip, default_skip=default_skip)
    if not per_call:
        check_stats_cover(stats, targets)
    per_batch = max(1, -(-max_rows // len(batches)))
    scores = {n: _AlphaScores(grid) for n in targets}

    def on_rows(name, mod, rows):
        col_max = rows.abs().amax(0).cpu() if per_call else stats[name].col_max
        if rows.shape[0] > per_batch:
            idx = torch.linspace(0, rows.shape[0] - 1, per_batch, device=rows.device).round().long()
            rows = rows[idx]
        scores[name].add(method, grid, rows.float().cpu(), _layer_weight(mod).cpu(), col_max, outlier_threshold)

    run_on_rows(model, targets, on_rows, batches, progress, "per-layer alpha")
    return {name: scores[name].choose(name, grid, require_kernel_below_per_token) for name in targets}


def check_stats_cover(stats: Mapping[str, Any], targets: Mapping[str, nn.Module]) -> None:
    """Raise when precomputed ``stats`` lack an entry for a layer to quantize."""
    missing = [n for n in targets if n not in stats]
    if missing:
        raise ValueError(f"stats has no entry for {len(missing)} layer(s), e.g. {missing[:3]}")
