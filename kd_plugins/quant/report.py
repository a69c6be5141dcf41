"""Inspecting quantization: the quantization-kernel report and the alpha sweep."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ._core import STATIC_METHODS, check_alpha, check_method, kernel_counts, per_token_codes
from .api import quantize
from .calibration import (
    as_batches,
    call_model,
    collect_activation_stats,
    eval_no_grad,
    model_device,
    run_on_rows,
    with_progress,
)
from .targets import quantized_layers

__all__ = ["LayerKernel", "KernelReport", "quantization_kernel_report", "AlphaSweep", "sweep_alpha"]


# ---------------------------------------------------------------------------------------------------- kernel report
@dataclass
class LayerKernel:
    """Quantization-kernel counts of one layer (elements quantized to zero)."""

    name: str
    method: str
    elements: int = 0
    zeros: int = 0
    induced: int = 0
    exact_zeros: int = 0
    per_token_zeros: int = 0
    per_token_induced: int = 0

    @property
    def kernel(self) -> float:
        return self.zeros / max(self.elements, 1)

    @property
    def induced_kernel(self) -> float:
        return self.induced / max(self.elements, 1)

    @property
    def per_token_kernel(self) -> float:
        return self.per_token_zeros / max(self.elements, 1)

    @property
    def per_token_induced_kernel(self) -> float:
        return self.per_token_induced / max(self.elements, 1)


@dataclass
class KernelReport:
    """Per-layer quantization-kernel proportions for a quantized model, next to per-token on the same tensors.

    ``kernel``: fraction of activation elements whose int8 code is 0. ``induced``: fraction that is non-zero in full
    precision but 0 after quantization. Totals aggregate counts (not per-layer ratios). Padding rows are excluded.
    """

    layers: list[LayerKernel] = field(default_factory=list)

    def _sum(self, attr):
        return sum(getattr(l, attr) for l in self.layers)

    @property
    def kernel(self) -> float:
        return self._sum("zeros") / max(self._sum("elements"), 1)

    @property
    def induced(self) -> float:
        return self._sum("induced") / max(self._sum("elements"), 1)

    @property
    def per_token_kernel(self) -> float:
        return self._sum("per_token_zeros") / max(self._sum("elements"), 1)

    @property
    def per_token_induced(self) -> float:
        return self._sum("per_token_induced") / max(self._sum("elements"), 1)

    @property
    def layers_below_per_token(self) -> int:
        """Layers whose kernel is strictly smaller than per-token's (per-token layers never count)."""
        return sum(1 for l in self.layers if l.zeros < l.per_token_zeros)

    @property
    def layers_not_above_per_token(self) -> int:
        return sum(1 for l in self.layers if l.zeros <= l.per_token_zeros)

    def summary(self) -> dict[str, Any]:
        methods = sorted({l.method for l in self.layers})
        return {
            "method": methods[0] if len(methods) == 1 else methods,
            "layers": len(self.layers),
            "kernel": self.kernel,
            "induced": self.induced,
            "per_token_kernel": self.per_token_kernel,
            "per_token_induced": self.per_token_induced,
            "layers_below_per_token": self.layers_below_per_token,
            "layers_not_above_per_token": self.layers_not_above_per_token,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "layers": [asdict(l) for l in self.layers]}

    def by_suffix(self) -> list[tuple[str, int, float, float]]:
        """Aggregate by the layer-name suffix after the last digit component (``mlp.down_proj``,
        ``attention.output.dense``)."""
        groups: dict[str, list[LayerKernel]] = {}
        for l in self.layers:
            parts = l.name.split(".")
            idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
            key = ".".join(parts[idx + 1 :]) or l.name
            groups.setdefault(key, []).append(l)
        out = []
        for key, ls in groups.items():
            el = sum(l.elements for l in ls) or 1
            out.append((key, len(ls), sum(l.zeros for l in ls) / el, sum(l.per_token_zeros for l in ls) / el))
        return out

    def to_table(self, per_layer: bool = False) -> str:
        lines = ["| layer | n | kernel | per-token kernel |", "|---|---|---|---|"]
        if per_layer:
            for l in self.layers:
                lines.append(f"| {l.name} | 1 | {100 * l.kernel:.2f}% | {100 * l.per_token_kernel:.2f}% |")
        else:
            for key, n, k, pt in self.by_suffix():
                lines.append(f"| {key} | {n} | {100 * k:.2f}% | {100 * pt:.2f}% |")
        lines.append(
            f"| **all** | {len(self.layers)} | {100 * self.kernel:.2f}% | {100 * self.per_token_kernel:.2f}% |"
        )
        return "\n".join(lines)


def quantization_kernel_report(
    model: nn.Module,
    data,
    *,
    method: str | None = None,
    alpha: float | None = None,
    calibration_data=None,
    skip: Iterable[str] | None = None,
    progress: bool = False,
) -> KernelReport:
    """Per layer, the fraction of activation elements quantized to zero by the layer's method and by per-token.

    ``model`` is a model returned by :func:`quantize`; the layer inputs produced by running ``data`` through it are
    inspected (inputs are the quantized model's own activations). Alternatively pass a float model with ``method``
    (and ``alpha``, ``calibration_data`` for static methods): a quantized copy is made first and ``model`` is left
    unchanged.
    """
    if method is not None:
        if quantized_layers(model):
            raise ValueError("model is already quantized; call without method= to report its own method")
        model = quantize(
            copy.deepcopy(model),
            method=method,
            alpha=alpha,
            skip=skip,
            calibration_data=calibration_data if calibration_data is not None else data,
        )
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no QuantizedLinear layers: quantize it first or pass method=")
    batches = as_batches(data, "data")
    acc = {n: LayerKernel(n, m.method) for n, m in layers.items()}

    def on_rows(name, mod, rows):
        q, _, _ = mod.quantize_input(rows)
        z, ind, ex = kernel_counts(rows, q)
        pz, pind, _ = kernel_counts(rows, per_token_codes(rows)) if mod.method != "per_token" else (z, ind, ex)
        a = acc[name]
        a.elements += rows.numel()
        a.zeros += z
        a.induced += ind
        a.exact_zeros += ex
        a.per_token_zeros += pz
        a.per_token_induced += pind

    run_on_rows(model, layers, on_rows, batches, progress, "kernel report")
    return KernelReport([acc[n] for n in layers if acc[n].elements > 0])


# ---------------------------------------------------------------------------------------------------------- alpha sweep
def _primary(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        for k in ("logits", "last_hidden_state"):
            v = out.get(k) if hasattr(out, "get") else None
            if isinstance(v, torch.Tensor):
                return v
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def _has_labels(batches) -> bool:
    return all(isinstance(b, Mapping) and "labels" in b for b in batches)


@dataclass
class AlphaSweep:
    """Result of :func:`sweep_alpha`: one row per alpha (loss, kernel proportions), plus the float baseline loss."""

    method: str
    loss_name: str
    reference_loss: float | None
    rows: list[dict[str, float]]

    @property
    def best_alpha(self) -> float:
        return min(self.rows, key=lambda r: r["loss"])["alpha"]

    def to_table(self) -> str:
        ref = "" if self.reference_loss is None else f" (float: {self.reference_loss:.4g})"
        lines = [
            f"| alpha | {self.loss_name}{ref} | kernel | induced | per-token kernel | layers below per-token |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['alpha']:.2f} | {r['loss']:.4g} | {100 * r['kernel']:.2f}% | "
                f"{100 * r['induced']:.2f}% | {100 * r['per_token_kernel']:.2f}% | "
                f"{int(r['layers_below_per_token'])}/{int(r['layers'])} |"
            )
        return "\n".join(lines)


def sweep_alpha(
    model: nn.Module,
    calibration_data,
    eval_data=None,
    *,
    alphas: Iterable[float] = (0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0),
    method: str = "crossquant",
    loss_fn: Callable[[nn.Module, list], float] | None = None,
    skip: Iterable[str] | None = None,
    default_skip: bool = True,
    progress: bool = False,
) -> AlphaSweep:
    """Quantize a copy of ``model`` for every ``alpha`` and report loss and quantization-kernel proportion.

    Calibration statistics are collected once on the float model. ``eval_data`` (default: ``calibration_data``, which
    is optimistic) is used for the loss and the kernel report. Loss: ``loss_fn(model, batches)`` if given; otherwise
    the mean model loss when every batch carries ``labels`` (e.g. causal-LM NLL), else the relative L2 error of the
    primary output (``logits`` / ``last_hidden_state``) with respect to the float model (``||y_q - y||^2 / ||y||^2``
    summed over batches). ``model`` itself is not modified.
    """
    check_method(method)
    if method not in ("crossquant", "crossquant_dynamic", "crossquant_dynamic_int8", "smoothquant"):
        raise ValueError(f"sweep_alpha applies to methods with an alpha, got {method!r}")
    alphas = [check_alpha(method, a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty")
    calib = as_batches(calibration_data, "calibration_data")
    evalb = as_batches(eval_data, "eval_data") if eval_data is not None else calib
    stats = None
    if method in STATIC_METHODS:
        stats = collect_activation_stats(model, calib, skip=skip, default_skip=default_skip)
    loss_name, reference, loss_fn = _sweep_loss(model, evalb, loss_fn)
    rows = []
    for a in with_progress(alphas, progress, f"alpha sweep ({method})", unit="alpha"):
        qm = quantize(copy.deepcopy(model), method=method, alpha=a, skip=skip, default_skip=default_skip, stats=stats)
        loss = float(loss_fn(qm, evalb))
        rep = quantization_kernel_report(qm, evalb).summary()
        rows.append(
            {
                "alpha": a,
                "loss": loss if math.isfinite(loss) else float("inf"),
                **{k: rep[k] for k in ("kernel", "induced", "per_token_kernel", "layers_below_per_token", "layers")},
            }
        )
        del qm
    return AlphaSweep(method, loss_name, reference, rows)


def _sweep_loss(model: nn.Module, evalb: list, loss_fn) -> tuple[str, float | None, Callable[[nn.Module, list], float]]:
    """``(name, loss of the float model or None, loss function)`` for :func:`sweep_alpha` (see its docstring)."""
    device = model_device(model)
    if loss_fn is not None:
        return "loss", float(loss_fn(model, evalb)), loss_fn
    if _has_labels(evalb):

        def model_loss(m, bs):
            with eval_no_grad(m):
                return sum(float(call_model(m, b, device).loss) for b in bs) / len(bs)

        return "model loss", model_loss(model, evalb), model_loss
    with eval_no_grad(model):
        ref_outputs = [_primary(call_model(model, b, device)).float().cpu() for b in evalb]

    def relative_error(m, bs):
        num = den = 0.0
        with eval_no_grad(m):
            for b, ref in zip(bs, ref_outputs):
                y = _primary(call_model(m, b, device)).float().cpu()
                num += float((y - ref).pow(2).sum())
                den += float(ref.pow(2).sum())
        return num / max(den, 1e-30)

    return "relative output error", None, relative_error
