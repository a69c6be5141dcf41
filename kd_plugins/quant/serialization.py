"""Save / load quantized models: one safetensors file + ``quant_config.json`` (the kd_plugins checkpoint manifest,
with per-tensor SHA-256), written atomically (:mod:`kd_plugins._checkpoint`).

Layout of a checkpoint directory::

    quant_config.json     manifest (kind "quant"): per-tensor dtype/shape/sha256, architecture, and as metadata the
                          method, alpha, per-layer description, float / buffer dtypes
    model.safetensors     every tensor of the state dict: int8 ``weight_int8`` + float32 ``weight_scale``,
                          ``act_inv_col`` and ``bias`` for quantized layers; the float tensors of everything else
    config.json           (Hugging Face models) the model config, so the architecture can be rebuilt offline, with a
                          ``quantization_config`` (``quant_method: "kd_plugins_w8a8"``) so that
                          ``AutoModel*.from_pretrained(dir)`` also loads it after ``import kd_plugins`` (see
                          :mod:`kd_plugins.quant.hf_quantizer`; ``load_quantized`` ignores that entry), and a load
                          guard (:data:`HF_LOAD_GUARD`) so that ``from_pretrained`` without kd_plugins raises instead
                          of initialising the quantized layers at random
    ...                   tokenizer files when a tokenizer is passed

Tensors that share storage (tied embeddings / ``lm_head``) are stored once and listed under ``aliases``. Checkpoints
written before the common manifest (``format: "kd_plugins.quant"``, method fields at the top level) still load.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSpec,
    architecture_record,
    dedupe_shared_tensors,
    read_checkpoint,
    read_manifest,
    rebuild_model,
    write_checkpoint,
)
from ._core import DYNAMIC_INT8_METHODS, INT8_METHODS, METHODS, STATIC_METHODS
from .dynamic import DEFAULT_FALLBACK, DEFAULT_FALLBACK_ROWS, FALLBACKS
from .layers import QuantizedLinear, is_pointwise_conv
from .targets import quantized_layers, replace_submodule

__all__ = [
    "save_quantized",
    "load_quantized",
    "QuantizedCheckpointError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "HF_QUANT_METHOD",
    "HF_LOAD_GUARD",
]

CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "model.safetensors"
#: ``format`` / ``format_version`` of the ``quantization_config`` entry of ``config.json`` (and of the manifests
#: written before the common checkpoint manifest).
FORMAT = "kd_plugins.quant"
FORMAT_VERSION = 1
#: ``quant_method`` of the ``quantization_config`` written into a Hugging Face checkpoint's ``config.json``; the
#: quantizer registered for it (:mod:`kd_plugins.quant.hf_quantizer`) lets ``AutoModel*.from_pretrained`` load it.
HF_QUANT_METHOD = "kd_plugins_w8a8"
#: What plain ``from_pretrained`` (kd_plugins not imported) raises on a quantized checkpoint's ``config.json``
#: (:data:`kd_plugins._checkpoint.HF_LOAD_GUARD_KEY`); the registered quantizer drops it.
HF_LOAD_GUARD = (
    "kd_plugins W8A8-quantized checkpoint, which transformers alone would load with its quantized layers initialised "
    "at random. Run `import kd_plugins` before from_pretrained (AutoModel*.from_pretrained then loads it "
    "bit-identically), or load it with kd_plugins.quant.load_quantized(path)"
)


class QuantizedCheckpointError(CheckpointError):
    """A directory is not a valid kd_plugins quantized checkpoint (missing config, shape or checksum mismatch, ...)."""


SPEC = CheckpointSpec(
    kind="quant",
    manifest_name=CONFIG_NAME,
    tensor_file=WEIGHTS_NAME,
    description="a kd_plugins quantized checkpoint",
    writer="kd_plugins.quant.save_quantized",
    legacy_format=FORMAT,
    hf_load_guard=HF_LOAD_GUARD,
    error=QuantizedCheckpointError,
    missing_error=QuantizedCheckpointError,
)


def _layer_entry(m: QuantizedLinear) -> dict[str, Any]:
    entry = {
        "kind": m.kind,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "method": m.method,
        "alpha": m.alpha,
        "stride": list(m.stride),
        "mode": m.mode,
    }
    if m.method in DYNAMIC_INT8_METHODS:
        entry.update(layer_options(m))
    return entry


def layer_options(m: QuantizedLinear) -> dict[str, Any]:
    """The options of a ``crossquant_dynamic_int8`` layer that change its outputs (saved in its layer entry)."""
    return {
        "fallback": m.fallback,
        "fallback_rows": m.fallback_rows,
        "outlier_threshold": m.outlier_threshold,
        "compile_quantizer": m.compile_quantizer,
    }


def layer_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    """``QuantizedLinear`` keyword arguments of the dynamic-method options of a saved layer entry."""
    keys = ("fallback", "fallback_rows", "outlier_threshold", "compile_quantizer")
    return {k: entry[k] for k in keys if k in entry}


def _quant_metadata(model: nn.Module, qlayers: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """The method part of the manifest: how the model was quantized and how to rebuild its quantized layers."""
    float_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters()})
    info = getattr(model, "kd_quantization", {}) or {}
    return {
        "quant_format_version": FORMAT_VERSION,
        "method": info.get("method", sorted({m.method for m in qlayers.values()})[0]),
        "alpha": info.get("alpha"),
        "layer_alpha": info.get("layer_alpha"),
        "skip": info.get("skip", []),
        "default_skip": info.get("default_skip", True),
        "weights": {"bits": 8, "symmetric": True, "strategy": "channel"},
        "activations": {"bits": 8, "symmetric": True, "dynamic": True, "strategy": _activation_strategy(qlayers)},
        "float_dtype": float_dtypes[0] if len(float_dtypes) == 1 else "torch.float32",
        "layers": {n: _layer_entry(m) for n, m in qlayers.items()},
        # Non-persistent float buffers (RoPE inv_freq, ...) are recomputed by the loaders, not stored; their dtype is
        # recorded because it depends on how the model was made (`.to(bf16)` rounds them, `from_pretrained(dtype=)`
        # keeps them float32) and it changes the outputs.
        "buffer_dtypes": {
            n: str(t.dtype).replace("torch.", "")
            for n, t in _nonpersistent_buffers(model).items()
            if t.is_floating_point()
        },
    }


def _activation_strategy(qlayers: dict[str, QuantizedLinear]) -> str:
    """``"token"``; ``"token_and_channel_per_call"`` when a layer measures column maxima on every call (its weights
    are then requantized per call as well)."""
    return "token_and_channel_per_call" if any(m.method in DYNAMIC_INT8_METHODS for m in qlayers.values()) else "token"


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    build_kwargs: dict | None = None,
) -> Path:
    """Write ``model`` (returned by :func:`~kd_plugins.quant.quantize`) to ``out_dir`` atomically.

    Everything is written to a temporary sibling directory that is renamed into place with ``os.replace`` only when
    complete, so an interrupted or failed save never leaves a half-written checkpoint. An existing non-empty
    ``out_dir`` is refused unless ``overwrite=True`` (then it is swapped out and removed after the new one is in place).

    For Hugging Face models ``config.json`` also gets a ``quantization_config`` (``quant_method: "kd_plugins_w8a8"``)
    and the float dtype of the model, so ``AutoModel*.from_pretrained(out_dir)`` loads the quantized model too (see
    :mod:`kd_plugins.quant.hf_quantizer`); ``model.config`` itself is not modified.

    ``build_kwargs``: for timm models, extra ``timm.create_model`` arguments needed to rebuild the architecture
    (e.g. ``img_size``); ``num_classes`` is recorded automatically.
    """
    qlayers = quantized_layers(model)
    if not qlayers:
        raise ValueError("model has no QuantizedLinear layers: call kd_plugins.quant.quantize(model, ...) first")
    tensors, aliases = dedupe_shared_tensors(model.state_dict())
    metadata = _quant_metadata(model, qlayers)
    arch = architecture_record(model, build_kwargs)
    hf_config = _hf_config_with_quantization(model, metadata) if arch["kind"] == "hf" else None
    return write_checkpoint(
        SPEC,
        out_dir,
        tensors,
        aliases=aliases,
        architecture=arch,
        metadata=metadata,
        hf_config=hf_config,
        tokenizer=tokenizer,
        overwrite=overwrite,
    )


def _nonpersistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        for b in sorted(getattr(mod, "_non_persistent_buffers_set", ())):
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{mname}.{b}" if mname else b] = t
    return out


def _restore_buffer_dtypes(model: nn.Module, buffer_dtypes: dict[str, str] | None, rename=None) -> None:
    """Cast the recomputed non-persistent buffers of ``model`` to the dtypes recorded at save time (computed in the
    precision the loader built them in, then cast exactly as ``.to(dtype)`` did on the saved model)."""
    if not buffer_dtypes:
        return
    current = _nonpersistent_buffers(model)
    for name, dt in buffer_dtypes.items():
        name = rename(name) if rename is not None else name
        t = current.get(name) if name is not None else None
        want = getattr(torch, str(dt), None)
        if t is None or not isinstance(want, torch.dtype) or t.dtype == want or not t.is_floating_point():
            continue
        parent_name, _, leaf = name.rpartition(".")
        (model.get_submodule(parent_name) if parent_name else model)._buffers[leaf] = t.to(want)


def hf_quantization_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json`` for a checkpoint whose manifest metadata is ``cfg``:
    everything needed to rebuild the quantized modules; the per-tensor checksums stay in quant_config.json."""
    fdt = cfg.get("float_dtype")
    return {
        "quant_method": HF_QUANT_METHOD,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": cfg.get("method"),
        "alpha": cfg.get("alpha"),
        "layer_alpha": cfg.get("layer_alpha"),
        # None when the non-quantized parameters have mixed float dtypes (from_pretrained loads one dtype only)
        "float_dtype": fdt.replace("torch.", "") if isinstance(fdt, str) and fdt else None,
        "layers": {n: dict(l) for n, l in cfg["layers"].items()},
        "buffer_dtypes": dict(cfg.get("buffer_dtypes") or {}),
    }


def _hf_config_with_quantization(model: nn.Module, cfg: dict[str, Any]):
    """A copy of ``model.config`` carrying ``quantization_config`` and the dtype of the non-quantized parameters (so
    ``from_pretrained``'s default ``dtype="auto"`` restores them as saved). ``model.config`` is not modified."""
    config = copy.deepcopy(model.config)
    qc = hf_quantization_config(cfg)
    float_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(float_dtypes) == 1:
        config.dtype = next(iter(float_dtypes))
    else:
        qc["float_dtype"] = None
    config.quantization_config = qc
    return config


def read_quant_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest (:func:`kd_plugins._checkpoint.read_manifest`) of the quantized checkpoint in ``path``;
    its ``metadata`` holds the method fields and the ``layers`` table."""
    manifest = read_manifest(SPEC, path)
    _check_quant_manifest(Path(path), manifest)
    return manifest


def _check_quant_manifest(path: Path, manifest: dict[str, Any]) -> None:
    for key, table in (("layers", manifest["metadata"].get("layers")), ("architecture", manifest["architecture"])):
        if not isinstance(table, dict):
            raise QuantizedCheckpointError(f"{path / CONFIG_NAME}: missing or malformed {key!r}")
    meta = manifest["metadata"]
    check_supported(
        meta.get("quant_format_version", 1), meta["layers"], f"{path / CONFIG_NAME}", manifest.get("kd_plugins_version")
    )


def check_supported(format_version: Any, layers: dict[str, Any], where: str, writer: str | None = None) -> None:
    """Refuse a checkpoint this kd_plugins cannot run: a newer quantized-layer format, or a quantization method or
    layer kind it does not know (written by a newer kd_plugins). The error says to upgrade."""
    by = f" (written by kd_plugins {writer})" if writer else ""
    upgrade = "upgrade kd_plugins (pip install -U kd-plugins) to load it"
    if not isinstance(format_version, int) or isinstance(format_version, bool):
        raise QuantizedCheckpointError(f"{where}: malformed quantized-layer format version {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise QuantizedCheckpointError(
            f"{where}{by} uses quantized-layer format {format_version}; this kd_plugins reads up to "
            f"{FORMAT_VERSION}: {upgrade}"
        )
    for name, layer in layers.items():
        method, kind = (layer.get("method"), layer.get("kind")) if isinstance(layer, dict) else (None, None)
        if method not in METHODS or kind not in ("linear", "conv1x1"):
            raise QuantizedCheckpointError(
                f"{where}{by}: layer {name} is quantized with method {method!r} (kind {kind!r}), which this "
                f"kd_plugins does not know (methods {list(METHODS)}): {upgrade}"
            )
        if method in DYNAMIC_INT8_METHODS:
            _check_dynamic_options(name, layer, f"{where}{by}", upgrade)


def _check_dynamic_options(name: str, layer: dict[str, Any], where: str, upgrade: str) -> None:
    fallback, rows = layer.get("fallback", DEFAULT_FALLBACK), layer.get("fallback_rows", DEFAULT_FALLBACK_ROWS)
    if fallback not in FALLBACKS:
        raise QuantizedCheckpointError(
            f"{where}: layer {name} uses the decode fallback {fallback!r}, which this kd_plugins does not know "
            f"(fallbacks {list(FALLBACKS)}): {upgrade}"
        )
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise QuantizedCheckpointError(f"{where}: layer {name} has a malformed fallback_rows {rows!r}")
    tau = layer.get("outlier_threshold", 0.0)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise QuantizedCheckpointError(f"{where}: layer {name} has a malformed outlier_threshold {tau!r}")


def _check_layer_tensors(ckpt: Checkpoint) -> None:
    """The tensors of every quantized layer exist with the shapes its layer description implies."""
    tensors = ckpt.tensors
    for lname, l in ckpt.metadata["layers"].items():
        want = {
            f"{lname}.weight_int8": [l["out_features"], l["in_features"]],
            f"{lname}.weight_scale": [l["out_features"]],
        }
        if l["method"] in STATIC_METHODS:
            want[f"{lname}.act_inv_col"] = [l["in_features"]]
        if l["bias"]:
            want[f"{lname}.bias"] = [l["out_features"]]
        for tname, shape in want.items():
            src = ckpt.aliases.get(tname, tname)
            if src not in tensors:
                raise QuantizedCheckpointError(f"layer {lname} needs tensor {tname}, which the file does not have")
            if list(tensors[src].shape) != shape:
                raise QuantizedCheckpointError(
                    f"layer {lname}: tensor {tname} has shape {tuple(tensors[src].shape)}, expected {tuple(shape)}"
                )


def _float_skeleton(ckpt: Checkpoint) -> nn.Module:
    """The float architecture of ``ckpt`` in its saved float dtype, non-persistent buffers as the saved model had
    them."""
    model = rebuild_model(ckpt.architecture, ckpt.directory, error=QuantizedCheckpointError)
    fp32_buffers = _nonpersistent_buffers(model)
    fdt = ckpt.metadata.get("float_dtype") or "torch.float32"
    dt = getattr(torch, fdt.replace("torch.", ""), torch.float32)
    if dt != torch.float32:
        model = model.to(dt)
    buffer_dtypes = ckpt.metadata.get("buffer_dtypes")
    if buffer_dtypes:  # checkpoints from before buffer_dtypes was recorded: unchanged behaviour
        for name, t in fp32_buffers.items():
            parent_name, _, leaf = name.rpartition(".")
            (model.get_submodule(parent_name) if parent_name else model)._buffers[leaf] = t
        _restore_buffer_dtypes(model, buffer_dtypes)
    return model


def _check_mode(layers: dict[str, dict], mode: str | None) -> None:
    """``mode="int8"`` for a fake-quant-only layer is refused (silently running fake quantization would not be what
    was asked for); the error says how to get int8 GEMMs."""
    if mode != "int8":
        return
    fake_only = sorted({l["method"] for l in layers.values() if l["method"] not in INT8_METHODS})
    if fake_only:
        raise QuantizedCheckpointError(
            f"mode='int8' was requested, but the checkpoint's {fake_only} layers are the fake-quant reference of "
            "dynamic CrossQuant (static weights, float matmul) and have no int8 GEMM form. Load it without mode= "
            "(fake quantization, as saved), or re-quantize the float model with "
            "quantize(model, method='crossquant_dynamic_int8') for real int8 GEMMs"
        )


def _check_layer_modules(model: nn.Module, layers: dict[str, dict]) -> None:
    """Every saved quantized layer names a float module of ``model`` with the same kind and shape."""
    for lname, l in layers.items():
        try:
            sub = model.get_submodule(lname)
        except AttributeError:
            raise QuantizedCheckpointError(
                f"the architecture has no module {lname!r} listed in {CONFIG_NAME}"
            ) from None
        if l["kind"] == "linear":
            ok = isinstance(sub, nn.Linear) and (sub.in_features, sub.out_features) == (
                l["in_features"],
                l["out_features"],
            )
        else:
            ok = is_pointwise_conv(sub) and (sub.in_channels, sub.out_channels) == (l["in_features"], l["out_features"])
        if not ok:
            raise QuantizedCheckpointError(
                f"module {lname} is {sub!r}, which does not match the saved {l['kind']} "
                f"{l['in_features']}->{l['out_features']}"
            )


def _check_fit(model: nn.Module, new: dict[str, QuantizedLinear], full: dict[str, torch.Tensor]) -> None:
    """The complete key set and every shape of ``model`` with ``new`` swapped in match ``full``, checked before the
    model is touched so that a mismatch leaves it unchanged."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not any(k.startswith(l + ".") for l in new)}
    for lname, q in new.items():
        expected.update({f"{lname}.{k}": tuple(v.shape) for k, v in q.state_dict().items()})
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    wrong = [
        f"{k}: file {tuple(full[k].shape)}, model {expected[k]}"
        for k in sorted(set(expected) & set(full))
        if tuple(full[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise QuantizedCheckpointError(
            f"checkpoint does not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )


def load_quantized(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    mode: str | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    verify: bool = True,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; its outputs are bit-identical to the saved model's.

    The architecture comes from the checkpoint (Hugging Face config / timm name) or from ``model`` (a float instance of
    the same architecture, modified in place). Shapes, dtypes and SHA-256 checksums of every tensor are verified
    before anything is built (``verify=False`` skips only the checksums). ``mode`` overrides the saved int8/fake mode.
    """
    ckpt = read_checkpoint(SPEC, path, verify=verify)
    _check_quant_manifest(ckpt.directory, ckpt.manifest)
    _check_layer_tensors(ckpt)
    layers = ckpt.metadata["layers"]
    if model is None:
        model = _float_skeleton(ckpt)
    if quantized_layers(model):
        raise ValueError("model= must be the float architecture, not an already quantized model")
    _check_mode(layers, mode)
    _check_layer_modules(model, layers)
    new = {
        lname: QuantizedLinear(
            l["in_features"],
            l["out_features"],
            bias=l["bias"],
            method=l["method"],
            alpha=l["alpha"],
            kind=l["kind"],
            stride=tuple(l.get("stride", (1, 1))),
            mode=mode or l.get("mode", "int8"),
            backend=backend,
            **layer_kwargs(l),
        )
        for lname, l in layers.items()
    }
    full = ckpt.state_dict()
    _check_fit(model, new, full)
    for lname, q in new.items():
        replace_submodule(model, lname, q)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise QuantizedCheckpointError(f"checkpoint does not fit the architecture: {e}") from None
    model.kd_quantization = _loaded_record(ckpt.metadata)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _loaded_record(meta: dict[str, Any]) -> dict[str, Any]:
    """``model.kd_quantization`` of a loaded model (what :func:`~kd_plugins.quant.quantize` records, minus the
    skipped-layer table, which is not saved)."""
    record = {
        "method": meta.get("method"),
        "alpha": meta.get("alpha"),
        "skip": meta.get("skip", []),
        "default_skip": meta.get("default_skip", True),
        "layers": sorted(meta["layers"]),
    }
    if meta.get("layer_alpha"):
        record["layer_alpha"] = dict(meta["layer_alpha"])
    return record
