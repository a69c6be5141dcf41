"""``quantize``: one call that turns a float model into a W8A8 model (validate, calibrate, convert)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .._config import resolve_config
from ._core import DYNAMIC_INT8_METHODS, STATIC_METHODS
from .calibration import (
    LayerStats,
    as_batches,
    calibrate_layer_alphas,
    check_stats_cover,
    collect_activation_stats,
    with_progress,
)
from .config import QuantConfig
from .layers import QuantizedLinear
from .targets import find_quantizable, replace_submodule

__all__ = ["quantize"]

logger = logging.getLogger("kd_plugins.quant")

#: Positional parameters after ``method`` in the original signature ``quantize(model, method, alpha, data, skip)``.
_LEGACY_POSITIONAL = ("alpha", "calibration_data", "skip")


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None = None,
    *legacy_args: Any,
    calibration_data=None,
    stats: dict[str, LayerStats] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Quantize ``model`` in place to W8A8 and return it.

    Every ``nn.Linear`` (and, for timm/CNN models, every 1x1 ``nn.Conv2d``) is replaced by a
    :class:`~kd_plugins.quant.QuantizedLinear`, except those named in ``skip`` and, unless ``default_skip=False``,
    the output embeddings / ``lm_head``, classifier heads, and anything under a name containing ``embed`` or ``norm``
    (embedding and norm layers themselves are never linear and never touched).

    Methods (weights are always int8 per output channel):

    * ``"crossquant_dynamic_int8"`` (default, :data:`~kd_plugins.quant.config.DEFAULT_METHOD`): CrossQuant with the
      column maxima ``c_j`` measured on every call (all rows of the call's flattened ``[tokens, in]`` input) and
      ``c_j^(1-alpha)`` folded into a per-call requantized copy of the int8 weight, then one int8 GEMM; the few
      outlier columns (per call, above ``outlier_threshold`` times the median column maximum) are multiplied in
      float with the int8 weights instead (:mod:`kd_plugins.quant.dynamic`). No clamping and no calibration data
      (``calibration_data`` is accepted and used only by ``alpha="auto"``). A token's output depends on the other
      rows of the same call. Calls with fewer than ``fallback_rows`` rows (decode) run ``fallback``
      (``"per_token"``, default, or ``"weight_only"``). Lowest perplexity of the deployable methods on text of
      another domain than the calibration data in our measurements.
    * ``"crossquant"``: element step ``t_i^alpha * c_j^(1-alpha) / 127`` with ``t_i`` the dynamic per-token
      abs-max and ``c_j`` the *static* per-input-channel abs-max from ``calibration_data``. ``c_j^(1-alpha)`` is folded
      into the weight columns, so inference is one int8 GEMM with a row x column rescale. Codes are clamped because a
      test-time value may exceed its calibrated column maximum. ``alpha=1`` is per-token; smaller ``alpha`` shrinks
      the quantization kernel. Default ``alpha``: :data:`DEFAULT_ALPHA` (chosen from our sweeps).
    * ``"crossquant_dynamic"``: the paper-faithful form, recomputing ``c_j`` from every input tensor, with the plain
      per-channel int8 weights (no fold): **fake-quant only, the reference for accuracy studies** (same activation
      codes as ``"crossquant_dynamic_int8"``). Needs no calibration data.
    * ``"per_token"``: W8A8 baseline, dynamic per-token activations. Needs no calibration data.
    * ``"smoothquant"``: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (calibrated), activations divided by ``s`` (as a
      per-channel multiply in the quantizer) and weights multiplied by it, then per-token. Default ``alpha=0.5``.

    Options come from ``config`` (a :class:`QuantConfig`; default ``QuantConfig()``) and keyword ``overrides`` of its
    fields, which take precedence (``quantize(model, method="smoothquant", alpha=0.6, calibration_data=batches)``).
    For backward compatibility ``config`` may also be the method name, followed positionally by ``alpha``,
    ``calibration_data`` and ``skip`` (``quantize(model, "crossquant", 0.5, batches)``).

    Args:
        alpha: a float in ``[0, 1]`` for every layer; ``"auto"`` (``crossquant_dynamic_int8``, ``crossquant``,
            ``smoothquant``) to choose it per layer on the
            calibration data with :func:`calibrate_layer_alphas` over ``alpha_grid`` (lowest matmul error among the
            alphas whose kernel is below per-token's); or a ``{layer name: alpha}`` mapping covering every target.
            ``None``: :data:`DEFAULT_ALPHA`. The chosen values are in ``model.kd_quantization["layer_alpha"]``.
        calibration_data: iterable of batches (dict of model kwargs, tensor, or tuple of args); padding rows
            (``attention_mask == 0``) are ignored. Required for ``crossquant`` and ``smoothquant``.
        skip: module names / globs (or one comma-separated string) to keep in float, besides the default skips.
        mode: ``"int8"`` (real int8 GEMMs) or ``"fake"`` (dequantize-and-float-matmul, debugging).
        fallback, fallback_rows, outlier_threshold, compile_quantizer: ``crossquant_dynamic_int8`` only (see
            :class:`QuantConfig`).
        backend: ``"auto"`` (Triton on CUDA if available, else ``torch._int_mm``), ``"torch"`` or ``"triton"``.
        stats: precomputed :func:`collect_activation_stats` result (reused by :func:`sweep_alpha`).
        progress: tqdm bars for calibration and conversion.
        Other :class:`QuantConfig` fields: ``default_skip``, ``min_calibration_rows``, ``alpha_grid``.

    Validation (method, alpha, skip names, calibration data, layer coverage) happens before the model is modified:
    on error the model is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    config, calibration_data = _resolve_call(config, legacy_args, calibration_data, overrides)
    plan = _plan(model, config, calibration_data, stats)  # everything that can fail, before the model changes
    new = _convert(plan, config)
    for name, q in new.items():
        replace_submodule(model, name, q)
    model.kd_quantization = {
        "method": config.method,
        "alpha": plan.alpha,
        "skip": list(config.skip),
        "default_skip": bool(config.default_skip),
        "layers": sorted(new),
        "skipped": dict(sorted(plan.skipped.items())),
    }
    if plan.layer_alpha is not None:
        model.kd_quantization["layer_alpha"] = dict(sorted(plan.layer_alpha.items()))
    return model


def _resolve_call(config, legacy_args: tuple, calibration_data, overrides: dict) -> tuple[QuantConfig, Any]:
    """The :class:`QuantConfig` of one call (``config``, then ``overrides``) and its calibration data, also accepting
    the original positional form ``quantize(model, method, alpha, calibration_data, skip)``."""
    if isinstance(config, str):
        if "method" in overrides:
            raise TypeError("quantize() got the method twice (positionally and as method=)")
        overrides = {"method": config, **overrides}
        config = None
    if legacy_args:
        if config is not None:
            raise TypeError("quantize(model, config, ...): pass the other options as keywords")
        if len(legacy_args) > len(_LEGACY_POSITIONAL):
            raise TypeError(f"quantize() takes at most {2 + len(_LEGACY_POSITIONAL)} positional arguments")
        for name, value in zip(_LEGACY_POSITIONAL, legacy_args):
            given = calibration_data is not None if name == "calibration_data" else name in overrides
            if given:
                raise TypeError(f"quantize() got multiple values for {name!r}")
            if name == "calibration_data":
                calibration_data = value
            else:
                overrides[name] = value
    return resolve_config(QuantConfig, config, overrides), calibration_data


@dataclass
class _Plan:
    """What :func:`quantize` will do, fully validated: the layers, their statistics and their alphas."""

    targets: dict[str, nn.Module]
    skipped: dict[str, str]
    stats: dict[str, LayerStats] | None
    #: recorded in ``kd_quantization``: a float, ``None`` (per_token), ``"auto"`` or ``"per_layer"``
    alpha: float | str | None
    layer_alpha: dict[str, float] | None


def _plan(model: nn.Module, config: QuantConfig, calibration_data, stats) -> _Plan:
    targets, skipped = find_quantizable(model, config.skip, default_skip=config.default_skip)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers: quantize() replaces nn.Linear and 1x1 nn.Conv2d, "
            f"and after skips none is left (skipped: {sorted(skipped)[:5]})"
        )
    if config.method in DYNAMIC_INT8_METHODS and calibration_data is not None and config.resolved_alpha != "auto":
        as_batches(calibration_data, "calibration_data")  # a mistake (empty, wrong type) still raises
        logger.info(
            "kd_plugins.quant: method %r measures its column statistics on every call; calibration_data is not used",
            config.method,
        )
    if config.method in STATIC_METHODS:
        if stats is None:
            if calibration_data is None:
                raise ValueError(f"method {config.method!r} needs calibration_data (static per-channel factors)")
            stats = collect_activation_stats(
                model,
                calibration_data,
                skip=config.skip,
                default_skip=config.default_skip,
                min_rows=config.min_calibration_rows,
                progress=config.progress,
            )
        check_stats_cover(stats, targets)
    alpha, layer_alpha = _layer_alphas(model, config, calibration_data, stats, targets)
    return _Plan(targets, skipped, stats, alpha, layer_alpha)


def _layer_alphas(model, config: QuantConfig, calibration_data, stats, targets) -> tuple[Any, dict | None]:
    """``(recorded alpha, {layer: alpha} or None)``; ``alpha="auto"`` runs the per-layer search here."""
    alpha = config.resolved_alpha
    if isinstance(alpha, Mapping):
        alpha, layer_alpha = "per_layer", dict(alpha)
    elif alpha == "auto":
        if calibration_data is None:
            raise ValueError("alpha='auto' needs calibration_data (the per-layer search runs on it)")
        search = calibrate_layer_alphas(
            model,
            calibration_data,
            method=config.method,
            stats=stats,
            grid=config.alpha_grid,
            outlier_threshold=config.outlier_threshold,
            skip=config.skip,
            default_skip=config.default_skip,
            min_rows=config.min_calibration_rows,
            progress=config.progress,
        )
        layer_alpha = {n: r.chosen for n, r in search.items()}
    else:
        return alpha, None
    absent = [n for n in targets if n not in layer_alpha]
    extra = [n for n in layer_alpha if n not in targets]
    if absent or extra:
        raise ValueError(
            f"per-layer alpha mapping must name exactly the layers to quantize: missing {absent[:3]}, "
            f"not quantized {extra[:3]}"
        )
    return alpha, layer_alpha


def _convert(plan: _Plan, config: QuantConfig) -> dict[str, QuantizedLinear]:
    """The int8 replacement of every target layer (the model itself is not touched here)."""
    static = config.method in STATIC_METHODS
    options = {}
    if config.method in DYNAMIC_INT8_METHODS:
        options = {
            "fallback": config.fallback,
            "fallback_rows": config.fallback_rows,
            "outlier_threshold": config.outlier_threshold,
            "compile_quantizer": config.compile_quantizer,
        }
    new: dict[str, QuantizedLinear] = {}
    layers = with_progress(list(plan.targets.items()), config.progress, f"quantizing ({config.method})", unit="layer")
    for name, m in layers:
        alpha = plan.layer_alpha[name] if plan.layer_alpha is not None else plan.alpha
        new[name] = QuantizedLinear.from_float(
            m,
            method=config.method,
            alpha=alpha,
            col_max=plan.stats[name].col_max if static else None,
            mode=config.mode,
            backend=config.backend,
            **options,
        )
    return new
