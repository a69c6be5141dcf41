"""One-call post-training quantization: ``quantize``, calibration, the quantization-kernel report and the alpha sweep."""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ._core import (
    STATIC_METHODS,
    check_alpha,
    check_method,
    crossquant_inv_col,
    kernel_counts,
    per_token_codes,
    quantize_activations,
    quantize_weight_per_channel,
    smoothquant_inv_scale,
)
from .layers import QuantizedLinear, is_pointwise_conv, is_quantizable

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_SKIP_COMPONENTS",
    "LayerStats",
    "KernelReport",
    "LayerKernel",
    "AlphaSweep",
    "find_quantizable",
    "collect_activation_stats",
    "quantize",
    "quantization_kernel_report",
    "sweep_alpha",
    "quantized_layers",
    "LayerAlphaSearch",
    "calibrate_layer_alphas",
    "DEFAULT_ALPHA_GRID",
]

#: Default ``alpha`` per method. CrossQuant's 0.35 is our own choice (the paper's value could not be verified): it gave
#: the lowest validation perplexity of SmolLM2-135M in a sweep over 0.05..0.8 (Mansfield Park windows, calibration on
#: Emma; see benchmarks/RESULTS_quant.md); on all-MiniLM-L6-v2 embedding agreement was flat between 0.35 and 0.8.
#: SmoothQuant's 0.5 is the migration strength of its reference implementation (0.65 was best on SmolLM2).
DEFAULT_ALPHA: dict[str, float | None] = {
    "crossquant": 0.35,
    "crossquant_dynamic": 0.35,
    "smoothquant": 0.5,
    "per_token": None,
}

#: A module is skipped by default when a dotted component of its name equals one of these ...
DEFAULT_SKIP_COMPONENTS = ("lm_head", "embed_out", "classifier", "pre_classifier", "score", "qa_outputs", "cls", "head")
#: ... or contains one of these substrings (embeddings, norms).
DEFAULT_SKIP_SUBSTRINGS = ("embed", "norm")


# ---------------------------------------------------------------------------------------------------------- targets
def _component_match(name: str, entry: str) -> bool:
    if any(ch in entry for ch in "*?["):
        import fnmatch

        return fnmatch.fnmatchcase(name, entry)
    return f".{entry}." in f".{name}."


def _special_heads(model: nn.Module) -> dict[int, str]:
    """Modules that are output embeddings (HF) or classifiers (timm), by ``id``."""
    out: dict[int, str] = {}
    for getter, why in (("get_output_embeddings", "output embeddings"), ("get_classifier", "classifier head")):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                m = fn()
            except Exception:  # some HF models raise NotImplementedError
                m = None
            if isinstance(m, nn.Module):
                for sub in m.modules():
                    out[id(sub)] = why
    return out


def _default_skip_reason(name: str, module: nn.Module, special: dict[int, str]) -> str | None:
    if id(module) in special:
        return special[id(module)]
    for comp in name.split("."):
        if comp in DEFAULT_SKIP_COMPONENTS:
            return f"default skip ({comp})"
        low = comp.lower()
        for s in DEFAULT_SKIP_SUBSTRINGS:
            if s in low:
                return f"default skip (*{s}*)"
    return None


def _parent_is_mha(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            ids.update(id(c) for c in m.modules() if c is not m)
    return ids


def find_quantizable(
    model: nn.Module, skip: Iterable[str] | None = None, *, default_skip: bool = True
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Return ``(targets, skipped)``: the layers ``quantize`` would replace and the quantizable ones it leaves alone
    (name -> reason).

    ``skip`` entries match a module when they equal a dotted run of its name components (``"lm_head"``,
    ``"down_proj"``, ``"model.layers.0"``, ``"layers.3.mlp"``) or, if they contain ``* ? [``, as a glob over the full
    name. Raises ``ValueError`` for an entry that matches no module and ``TypeError`` for one that only names modules
    of types ``quantize`` never touches (norms, embeddings, 3x3 convs, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    for e in skip:
        if not isinstance(e, str) or not e.strip():
            raise ValueError(f"skip entries must be non-empty module names or globs, got {e!r}")
    named = [(n, m) for n, m in model.named_modules() if n]
    for entry in skip:
        hits = [(n, m) for n, m in named if _component_match(n, entry)]
        if not hits:
            leaf_names = sorted({n.split(".")[-1] for n, _ in named} | {n for n, _ in named})
            close = difflib.get_close_matches(entry, leaf_names, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"skip entry {entry!r} matches no module of {type(model).__name__}.{hint}")
        if not any(is_quantizable(s) for _, m in hits for s in m.modules()):
            types = sorted({type(m).__name__ for _, m in hits})
            raise TypeError(
                f"skip entry {entry!r} names {types}, which quantize() never quantizes (it replaces nn.Linear and "
                "1x1 nn.Conv2d only); remove it from skip."
            )
    special = _special_heads(model) if default_skip else {}
    mha = _parent_is_mha(model)
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, m in named:
        if isinstance(m, QuantizedLinear):
            raise ValueError(f"{name} is already a QuantizedLinear: the model has been quantized before")
        if not is_quantizable(m):
            continue
        if id(m) in mha:
            skipped[name] = "inside nn.MultiheadAttention (reads .weight directly)"
            continue
        user = next((e for e in skip if _component_match(name, e)), None)
        if user is not None:
            skipped[name] = f"skip={user!r}"
            continue
        reason = _default_skip_reason(name, m, special) if default_skip else None
        if reason:
            skipped[name] = reason
            continue
        targets[name] = m
    return targets, skipped


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# ---------------------------------------------------------------------------------------------------------- batches
_ROW_MASK: list[torch.Tensor | None] = [None]


def _as_batches(data, what: str) -> list:
    if data is None:
        raise ValueError(f"{what} is required")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"{what} must be an iterable of batches (dicts, tensors or tuples), got {type(data).__name__}") from None
    if not batches:
        raise ValueError(f"{what} is empty: pass at least one batch")
    for b in batches:
        if not isinstance(b, (torch.Tensor, Mapping, tuple, list)):
            raise TypeError(f"{what}: each batch must be a dict of model inputs, a tensor or a tuple, got {type(b).__name__}")
    return batches


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _call(model: nn.Module, batch, device):
    batch = _to(batch, device)
    mask = None
    if isinstance(batch, Mapping):
        am = batch.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            mask = am.bool()
        _ROW_MASK[0] = mask
        try:
            return model(**batch)
        finally:
            _ROW_MASK[0] = None
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``[rows, K]`` float32 matrix a linear / pointwise conv multiplies, padding rows removed."""
    if isinstance(module, QuantizedLinear):
        if module.kind == "conv1x1":
            return module.rows(x).float()
    elif is_pointwise_conv(module):
        s = module.stride
        if tuple(s) != (1, 1):
            x = x[:, :, :: s[0], :: s[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
    mask = _ROW_MASK[0]
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)].reshape(-1, x.shape[-1]).float()
    return x.reshape(-1, x.shape[-1]).float()


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _iter(batches, progress: bool, desc: str):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(batches, desc=desc, unit="batch")
    return batches


def _run_on_rows(model: nn.Module, modules: Mapping[str, nn.Module], on_rows, batches, progress: bool, desc: str) -> None:
    """Run ``batches`` through ``model`` (eval, no grad) and call ``on_rows(name, module, rows)`` with the ``[rows, K]``
    input matrix of every module in ``modules`` (padding rows removed; empty inputs skipped)."""

    def hook_for(name):
        def hook(mod, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            rows = _input_rows(mod, x.detach())
            if rows.shape[0] and rows.numel():
                on_rows(name, mod, rows)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    device = _model_device(model)
    try:
        with _eval_no_grad(model):
            for b in _iter(batches, progress, desc):
                _call(model, b, device)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------- calibration
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
    batches = _as_batches(calibration_data, "calibration_data")
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

    _run_on_rows(model, targets, on_rows, batches, progress, "calibrating")
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
    return stats


#: Alphas tried per layer by ``alpha="auto"`` (:func:`calibrate_layer_alphas`).
DEFAULT_ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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


def calibrate_layer_alphas(
    model: nn.Module,
    calibration_data,
    *,
    method: str = "crossquant",
    stats: dict[str, LayerStats] | None = None,
    grid: Iterable[float] = DEFAULT_ALPHA_GRID,
    max_rows: int = 2048,
    require_kernel_below_per_token: bool = True,
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

    Why per layer: with a *static* column maximum ``c_j``, rows whose own maximum ``t_i`` is below ``c_j`` get a
    larger step than per-token (``t_i^a c_j^(1-a) > t_i``); in layers fed by a few outlier tokens (``down_proj``,
    ``o_proj`` of LLMs) one global alpha can therefore enlarge the kernel, while other layers want a small alpha.

    Costs one extra pass over ``calibration_data`` plus ``len(grid)`` quantized matmuls per layer on ``max_rows`` rows.
    """
    check_method(method)
    if method not in STATIC_METHODS:
        raise ValueError(f"per-layer alpha calibration applies to {STATIC_METHODS}, got {method!r}")
    grid = sorted({check_alpha(method, a) for a in grid})
    if not grid:
        raise ValueError("grid is empty")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    batches = _as_batches(calibration_data, "calibration_data")
    if stats is None:
        stats = collect_activation_stats(model, batches, skip=skip, default_skip=default_skip, min_rows=min_rows,
                                         progress=progress)
    targets, _ = find_quantizable(model, skip, default_skip=default_skip)
    missing = [n for n in targets if n not in stats]
    if missing:
        raise ValueError(f"stats has no entry for {len(missing)} layer(s), e.g. {missing[:3]}")
    per_batch = max(1, -(-max_rows // len(batches)))
    acc: dict[str, dict[str, Any]] = {
        n: {"err": [0.0] * len(grid), "zeros": [0] * len(grid), "ref": 0.0, "pt_zeros": 0, "elements": 0}
        for n in targets
    }

    def on_rows(name, mod, rows):
        if rows.shape[0] > per_batch:
            idx = torch.linspace(0, rows.shape[0] - 1, per_batch, device=rows.device).round().long()
            rows = rows[idx]
        rows = rows.float().cpu()
        w = _layer_weight(mod).cpu()
        ref = rows @ w.T
        a = acc[name]
        a["ref"] += float(ref.pow(2).sum())
        a["elements"] += rows.numel()
        a["pt_zeros"] += int((per_token_codes(rows) == 0).sum())
        col_max = stats[name].col_max
        for i, alpha in enumerate(grid):
            if method == "crossquant":
                inv = crossquant_inv_col(col_max, alpha)
            else:
                inv = smoothquant_inv_scale(col_max, w, alpha)
            qw, sw = quantize_weight_per_channel(w.double() / inv.double()[None, :])
            wq = (qw.float() * sw[:, None]) * inv[None, :]
            codes, rs, _ = quantize_activations(rows, method, alpha, inv)
            xq = codes.float() * rs[:, None] / inv[None, :]
            a["err"][i] += float((xq @ wq.T - ref).pow(2).sum())
            a["zeros"][i] += int((codes == 0).sum())

    _run_on_rows(model, targets, on_rows, batches, progress, "per-layer alpha")
    out: dict[str, LayerAlphaSearch] = {}
    for name in targets:
        a = acc[name]
        if a["elements"] == 0:
            raise ValueError(f"layer {name} never ran on the calibration data; pass data that reaches it or skip it")
        errors = [e / max(a["ref"], 1e-30) for e in a["err"]]
        kernels = [z / a["elements"] for z in a["zeros"]]
        ok = [i for i in range(len(grid)) if a["zeros"][i] < a["pt_zeros"]]
        pool = ok if (ok and require_kernel_below_per_token) else range(len(grid))
        best = min(pool, key=lambda i: (errors[i], i))
        out[name] = LayerAlphaSearch(name, list(grid), errors, kernels, a["pt_zeros"] / a["elements"], grid[best],
                                     bool(ok))
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def quantize(
    model: nn.Module,
    method: str = "crossquant",
    alpha: float | str | Mapping[str, float] | None = None,
    calibration_data=None,
    skip: Iterable[str] | None = None,
    *,
    default_skip: bool = True,
    mode: str = "int8",
    backend: str = "auto",
    min_calibration_rows: int = 16,
    stats: dict[str, LayerStats] | None = None,
    alpha_grid: Iterable[float] = DEFAULT_ALPHA_GRID,
    progress: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place to W8A8 and return it.

    Every ``nn.Linear`` (and, for timm/CNN models, every 1x1 ``nn.Conv2d``) is replaced by a
    :class:`~kd_plugins.quant.QuantizedLinear`, except those named in ``skip`` and, unless ``default_skip=False``,
    the output embeddings / ``lm_head``, classifier heads, and anything under a name containing ``embed`` or ``norm``
    (embedding and norm layers themselves are never linear and never touched).

    Methods (weights are always int8 per output channel):

    * ``"crossquant"`` (default): element step ``t_i^alpha * c_j^(1-alpha) / 127`` with ``t_i`` the dynamic per-token
      abs-max and ``c_j`` the *static* per-input-channel abs-max from ``calibration_data``. ``c_j^(1-alpha)`` is folded
      into the weight columns, so inference is one int8 GEMM with a row x column rescale. Codes are clamped because a
      test-time value may exceed its calibrated column maximum. ``alpha=1`` is per-token; smaller ``alpha`` shrinks
      the quantization kernel. Default ``alpha``: :data:`DEFAULT_ALPHA` (chosen from our sweeps).
    * ``"crossquant_dynamic"``: the paper-faithful form, recomputing ``c_j`` from every input tensor. Outputs then
      depend on the other rows in the batch and no int8 GEMM is possible: **fake-quant only, for accuracy studies**.
      Weights are the plain per-channel int8 weights. Needs no calibration data.
    * ``"per_token"``: W8A8 baseline, dynamic per-token activations. Needs no calibration data.
    * ``"smoothquant"``: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (calibrated), activations divided by ``s`` (as a
      per-channel multiply in the quantizer) and weights multiplied by it, then per-token. Default ``alpha=0.5``.

    Args:
        alpha: a float in ``[0, 1]`` for every layer; ``"auto"`` (static methods) to choose it per layer on the
            calibration data with :func:`calibrate_layer_alphas` over ``alpha_grid`` (lowest matmul error among the
            alphas whose kernel is below per-token's); or a ``{layer name: alpha}`` mapping covering every target.
            ``None``: :data:`DEFAULT_ALPHA`. The chosen values are in ``model.kd_quantization["layer_alpha"]``.
        calibration_data: iterable of batches (dict of model kwargs, tensor, or tuple of args); padding rows
            (``attention_mask == 0``) are ignored. Required for ``crossquant`` and ``smoothquant``.
        mode: ``"int8"`` (real int8 GEMMs) or ``"fake"`` (dequantize-and-float-matmul, debugging).
        backend: ``"auto"`` (Triton on CUDA if available, else ``torch._int_mm``), ``"torch"`` or ``"triton"``.
        stats: precomputed :func:`collect_activation_stats` result (reused by :func:`sweep_alpha`).
        progress: tqdm bars for calibration and conversion.

    Validation (method, alpha, skip names, calibration data, layer coverage) happens before the model is modified:
    on error the model is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    check_method(method)
    if alpha is None:
        alpha = DEFAULT_ALPHA[method]
    layer_alpha: dict[str, float] | None = None
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"alpha must be a number in [0, 1], 'auto' or a {{layer: alpha}} mapping, got {alpha!r}")
        if method not in STATIC_METHODS:
            raise ValueError(f"alpha='auto' is calibrated per layer and applies to {STATIC_METHODS}, not {method!r}")
    elif isinstance(alpha, Mapping):
        if method == "per_token":
            raise ValueError("per_token has no alpha")
        layer_alpha = {str(k): check_alpha(method, v) for k, v in alpha.items()}
        alpha = "per_layer"
    else:
        alpha = check_alpha(method, alpha)
    if mode not in ("int8", "fake"):
        raise ValueError(f"mode must be 'int8' or 'fake', got {mode!r}")
    targets, skipped = find_quantizable(model, skip, default_skip=default_skip)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers: quantize() replaces nn.Linear and 1x1 nn.Conv2d, "
            f"and after skips none is left (skipped: {sorted(skipped)[:5]})"
        )
    if method in STATIC_METHODS:
        if stats is None:
            if calibration_data is None:
                raise ValueError(f"method {method!r} needs calibration_data (static per-channel factors)")
            stats = collect_activation_stats(
                model, calibration_data, skip=skip, default_skip=default_skip, min_rows=min_calibration_rows,
                progress=progress,
            )
        missing = [n for n in targets if n not in stats]
        if missing:
            raise ValueError(f"stats has no entry for {len(missing)} layer(s), e.g. {missing[:3]}")
    if alpha == "auto":
        if calibration_data is None:
            raise ValueError("alpha='auto' needs calibration_data (the per-layer search runs on it)")
        search = calibrate_layer_alphas(model, calibration_data, method=method, stats=stats, grid=alpha_grid,
                                        skip=skip, default_skip=default_skip, min_rows=min_calibration_rows,
                                        progress=progress)
        layer_alpha = {n: r.chosen for n, r in search.items()}
    if layer_alpha is not None:
        absent = [n for n in targets if n not in layer_alpha]
        extra = [n for n in layer_alpha if n not in targets]
        if absent or extra:
            raise ValueError(f"per-layer alpha mapping must name exactly the layers to quantize: missing {absent[:3]}, "
                             f"not quantized {extra[:3]}")
    new: dict[str, QuantizedLinear] = {}
    it = targets.items()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc=f"quantizing ({method})", unit="layer")
    for name, m in it:
        cm = stats[name].col_max if method in STATIC_METHODS else None
        a = layer_alpha[name] if layer_alpha is not None else alpha
        new[name] = QuantizedLinear.from_float(m, method=method, alpha=a, col_max=cm, mode=mode, backend=backend)
    for name, q in new.items():
        _set_submodule(model, name, q)
    model.kd_quantization = {
        "method": method,
        "alpha": alpha,
        "skip": list(skip) if skip is not None and not isinstance(skip, str) else ([skip] if skip else []),
        "default_skip": bool(default_skip),
        "layers": sorted(new),
        "skipped": dict(sorted(skipped.items())),
    }
    if layer_alpha is not None:
        model.kd_quantization["layer_alpha"] = dict(sorted(layer_alpha.items()))
    return model


# ---------------------------------------------------------------------------------------------------------- kernel report
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
        """Aggregate by the layer-name suffix after the last digit component (``mlp.down_proj``, ``attention.output.dense``)."""
        groups: dict[str, list[LayerKernel]] = {}
        for l in self.layers:
            parts = l.name.split(".")
            idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
            key = ".".join(parts[idx + 1:]) or l.name
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
        lines.append(f"| **all** | {len(self.layers)} | {100 * self.kernel:.2f}% | {100 * self.per_token_kernel:.2f}% |")
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
        model = quantize(copy.deepcopy(model), method, alpha,
                         calibration_data=calibration_data if calibration_data is not None else data, skip=skip)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no QuantizedLinear layers: quantize it first or pass method=")
    batches = _as_batches(data, "data")
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

    _run_on_rows(model, layers, on_rows, batches, progress, "kernel report")
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
        lines = [f"| alpha | {self.loss_name}{ref} | kernel | induced | per-token kernel | layers below per-token |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['alpha']:.2f} | {r['loss']:.4g} | {100 * r['kernel']:.2f}% | {100 * r['induced']:.2f}% | "
                         f"{100 * r['per_token_kernel']:.2f}% | {int(r['layers_below_per_token'])}/{int(r['layers'])} |")
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
    if method not in ("crossquant", "crossquant_dynamic", "smoothquant"):
        raise ValueError(f"sweep_alpha applies to methods with an alpha, got {method!r}")
    alphas = [check_alpha(method, a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty")
    calib = _as_batches(calibration_data, "calibration_data")
    evalb = _as_batches(eval_data, "eval_data") if eval_data is not None else calib
    stats = collect_activation_stats(model, calib, skip=skip, default_skip=default_skip) if method in STATIC_METHODS else None
    device = _model_device(model)

    if loss_fn is not None:
        loss_name, ref_outputs = "loss", None
        reference = float(loss_fn(model, evalb))
    elif _has_labels(evalb):
        loss_name, ref_outputs = "model loss", None

        def loss_fn(m, bs):
            with _eval_no_grad(m):
                return sum(float(_call(m, b, device).loss) for b in bs) / len(bs)

        reference = loss_fn(model, evalb)
    else:
        loss_name, reference = "relative output error", None
        with _eval_no_grad(model):
            ref_outputs = [_primary(_call(model, b, device)).float().cpu() for b in evalb]

        def loss_fn(m, bs):
            num = den = 0.0
            with _eval_no_grad(m):
                for b, ref in zip(bs, ref_outputs):
                    y = _primary(_call(m, b, device)).float().cpu()
                    num += float((y - ref).pow(2).sum())
                    den += float(ref.pow(2).sum())
            return num / max(den, 1e-30)

    rows = []
    it = alphas
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(alphas, desc=f"alpha sweep ({method})", unit="alpha")
    for a in it:
        qm = quantize(copy.deepcopy(model), method, a, skip=skip, default_skip=default_skip, stats=stats)
        loss = float(loss_fn(qm, evalb))
        rep = quantization_kernel_report(qm, evalb).summary()
        rows.append({"alpha": a, "loss": loss if math.isfinite(loss) else float("inf"), **{
            k: rep[k] for k in ("kernel", "induced", "per_token_kernel", "layers_below_per_token", "layers")}})
        del qm
    return AlphaSweep(method, loss_name, reference, rows)

