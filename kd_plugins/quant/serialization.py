"""Save / load quantized models: one safetensors file + ``quant_config.json`` (with per-tensor SHA-256), written atomically.

Layout of a checkpoint directory::

    quant_config.json     format, method, alpha, per-layer description, per-tensor dtype/shape/sha256, architecture
    model.safetensors     every tensor of the state dict: int8 ``weight_int8`` + float32 ``weight_scale``,
                          ``act_inv_col`` and ``bias`` for quantized layers; the float tensors of everything else
    config.json           (Hugging Face models) the model config, so the architecture can be rebuilt offline, with a
                          ``quantization_config`` (``quant_method: "kd_plugins_w8a8"``) so that
                          ``AutoModel*.from_pretrained(dir)`` also loads it after ``import kd_plugins`` (see
                          :mod:`kd_plugins.quant.hf_quantizer`; ``load_quantized`` ignores that entry)
    ...                   tokenizer files when a tokenizer is passed

Tensors that share storage (tied embeddings / ``lm_head``) are stored once and listed under ``aliases``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._atomic import atomic_dir
from ._core import STATIC_METHODS
from .api import quantized_layers
from .layers import QuantizedLinear, is_pointwise_conv

__all__ = ["save_quantized", "load_quantized", "QuantizedCheckpointError", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT",
           "HF_QUANT_METHOD"]

CONFIG_NAME = "quant_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "kd_plugins.quant"
FORMAT_VERSION = 1
#: ``quant_method`` of the ``quantization_config`` written into a Hugging Face checkpoint's ``config.json``; the
#: quantizer registered for it (:mod:`kd_plugins.quant.hf_quantizer`) lets ``AutoModel*.from_pretrained`` load it.
HF_QUANT_METHOD = "kd_plugins_w8a8"


class QuantizedCheckpointError(ValueError):
    """A directory is not a valid kd_plugins quantized checkpoint (missing config, shape or checksum mismatch, ...)."""


def _sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _architecture(model: nn.Module, build_kwargs: dict | None) -> dict[str, Any]:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if PreTrainedModel and isinstance(model, PreTrainedModel):
        return {"kind": "hf", "class": type(model).__name__}
    pcfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.startswith("timm.") and isinstance(pcfg, dict) and pcfg.get("architecture"):
        kwargs = {"num_classes": int(getattr(model, "num_classes", 0) or 0)}
        kwargs.update(build_kwargs or {})
        return {"kind": "timm", "name": pcfg["architecture"], "kwargs": kwargs}
    return {"kind": "torch", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _layer_entry(m: QuantizedLinear) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "method": m.method,
        "alpha": m.alpha,
        "stride": list(m.stride),
        "mode": m.mode,
    }


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
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")

    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    float_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters()})
    info = getattr(model, "kd_quantization", {}) or {}
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": info.get("method", sorted({m.method for m in qlayers.values()})[0]),
        "alpha": info.get("alpha"),
        "layer_alpha": info.get("layer_alpha"),
        "skip": info.get("skip", []),
        "default_skip": info.get("default_skip", True),
        "weights": {"bits": 8, "symmetric": True, "strategy": "channel"},
        "activations": {"bits": 8, "symmetric": True, "dynamic": True, "strategy": "token"},
        "float_dtype": float_dtypes[0] if len(float_dtypes) == 1 else "torch.float32",
        "architecture": _architecture(model, build_kwargs),
        "layers": {n: _layer_entry(m) for n, m in qlayers.items()},
        "aliases": aliases,
        "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": _sha256(t)}
                    for n, t in tensors.items()},
        # Non-persistent float buffers (RoPE inv_freq, ...) are recomputed by the loaders, not stored; their dtype is
        # recorded because it depends on how the model was made (`.to(bf16)` rounds them, `from_pretrained(dtype=)`
        # keeps them float32) and it changes the outputs.
        "buffer_dtypes": {n: str(t.dtype).replace("torch.", "") for n, t in _nonpersistent_buffers(model).items()
                          if t.is_floating_point()},
    }

    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        if cfg["architecture"]["kind"] == "hf":
            _hf_config_with_quantization(model, cfg).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, sort_keys=False))
    return out


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
    """The ``quantization_config`` entry of ``config.json`` for a checkpoint described by ``cfg`` (quant_config.json):
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


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise QuantizedCheckpointError(
            f"{path} has no {CONFIG_NAME}: it is not a kd_plugins quantized checkpoint (write one with save_quantized)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise QuantizedCheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if cfg.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{cfg_path}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    if int(cfg.get("format_version", -1)) > FORMAT_VERSION:
        raise QuantizedCheckpointError(
            f"{cfg_path}: format_version {cfg.get('format_version')} is newer than this library ({FORMAT_VERSION})"
        )
    for key in ("layers", "tensors", "architecture"):
        if not isinstance(cfg.get(key), dict):
            raise QuantizedCheckpointError(f"{cfg_path}: missing or malformed {key!r}")
    return cfg


def _load_tensors(path: Path, cfg: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise QuantizedCheckpointError(f"{path} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise QuantizedCheckpointError(f"{wpath} cannot be read: {e}") from None
    expected = cfg["tensors"]
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise QuantizedCheckpointError(
            f"{wpath} does not match {CONFIG_NAME}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"
        )
    bad_shape, bad_sum = [], []
    for name, meta in expected.items():
        t = tensors[name]
        if list(t.shape) != list(meta["shape"]) or str(t.dtype).replace("torch.", "") != meta["dtype"]:
            bad_shape.append(f"{name}: file {tuple(t.shape)} {t.dtype}, config {tuple(meta['shape'])} {meta['dtype']}")
        elif verify and _sha256(t) != meta["sha256"]:
            bad_sum.append(name)
    if bad_shape:
        raise QuantizedCheckpointError(f"tensor shape/dtype mismatch in {wpath}: " + "; ".join(bad_shape[:5]))
    if bad_sum:
        raise QuantizedCheckpointError(
            f"checksum mismatch in {wpath} for {len(bad_sum)} tensor(s): {bad_sum[:5]} (file corrupted or edited)"
        )
    # quantized-layer tensors must agree with the layer descriptions
    for lname, l in cfg["layers"].items():
        want = {f"{lname}.weight_int8": [l["out_features"], l["in_features"]], f"{lname}.weight_scale": [l["out_features"]]}
        if l["method"] in STATIC_METHODS:
            want[f"{lname}.act_inv_col"] = [l["in_features"]]
        if l["bias"]:
            want[f"{lname}.bias"] = [l["out_features"]]
        for tname, shape in want.items():
            src = cfg.get("aliases", {}).get(tname, tname)
            if src not in tensors:
                raise QuantizedCheckpointError(f"layer {lname} needs tensor {tname}, which the file does not have")
            if list(tensors[src].shape) != shape:
                raise QuantizedCheckpointError(
                    f"layer {lname}: tensor {tname} has shape {tuple(tensors[src].shape)}, expected {tuple(shape)}"
                )
    return tensors


def _build_skeleton(path: Path, cfg: dict) -> nn.Module:
    arch = cfg["architecture"]
    kind = arch.get("kind")
    if kind == "hf":
        import transformers

        cls = getattr(transformers, arch["class"], None)
        if cls is None:
            raise QuantizedCheckpointError(f"transformers has no class {arch['class']!r}; pass model= to load_quantized")
        config = transformers.AutoConfig.from_pretrained(str(path))
        if "quantization_config" in vars(config):  # for from_pretrained only; the skeleton is the float model
            del config.quantization_config
        return cls(config)
    if kind == "timm":
        import timm

        return timm.create_model(arch["name"], pretrained=False, **arch.get("kwargs", {}))
    raise QuantizedCheckpointError(
        f"checkpoint was saved from a plain torch model ({arch.get('class')}); pass an instance of that architecture "
        "as load_quantized(path, model=...)"
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
    path = Path(path)
    cfg = _read_config(path)
    tensors = _load_tensors(path, cfg, verify)
    if model is None:
        model = _build_skeleton(path, cfg)
        fp32_buffers = _nonpersistent_buffers(model)
        fdt = cfg.get("float_dtype", "torch.float32")
        dt = getattr(torch, fdt.replace("torch.", ""), torch.float32)
        if dt != torch.float32:
            model = model.to(dt)
        if cfg.get("buffer_dtypes"):  # checkpoints from before buffer_dtypes was recorded: unchanged behaviour
            for name, t in fp32_buffers.items():
                parent_name, _, leaf = name.rpartition(".")
                (model.get_submodule(parent_name) if parent_name else model)._buffers[leaf] = t
            _restore_buffer_dtypes(model, cfg["buffer_dtypes"])
    if quantized_layers(model):
        raise ValueError("model= must be the float architecture, not an already quantized model")
    for lname, l in cfg["layers"].items():
        try:
            sub = model.get_submodule(lname)
        except AttributeError:
            raise QuantizedCheckpointError(f"the architecture has no module {lname!r} listed in {CONFIG_NAME}") from None
        if l["kind"] == "linear":
            ok = isinstance(sub, nn.Linear) and (sub.in_features, sub.out_features) == (l["in_features"], l["out_features"])
        else:
            ok = is_pointwise_conv(sub) and (sub.in_channels, sub.out_channels) == (l["in_features"], l["out_features"])
        if not ok:
            raise QuantizedCheckpointError(
                f"module {lname} is {sub!r}, which does not match the saved {l['kind']} "
                f"{l['in_features']}->{l['out_features']}"
            )
    new = {}
    for lname, l in cfg["layers"].items():
        lmode = mode or l.get("mode", "int8")
        new[lname] = QuantizedLinear(
            l["in_features"], l["out_features"], bias=l["bias"], method=l["method"], alpha=l["alpha"], kind=l["kind"],
            stride=tuple(l.get("stride", (1, 1))), mode=lmode, backend=backend,
        )
    full = dict(tensors)
    for alias, src in cfg.get("aliases", {}).items():
        if src not in tensors:
            raise QuantizedCheckpointError(f"alias {alias!r} points to {src!r}, which is not in {WEIGHTS_NAME}")
        full[alias] = tensors[src]
    # Check the complete key set and every shape before touching the model, so a mismatch leaves it unchanged.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not any(k.startswith(l + ".") for l in new)}
    for lname, q in new.items():
        expected.update({f"{lname}.{k}": tuple(v.shape) for k, v in q.state_dict().items()})
    missing = sorted(set(expected) - set(full))
    unexpected = sorted(set(full) - set(expected))
    wrong = [f"{k}: file {tuple(full[k].shape)}, model {expected[k]}" for k in sorted(set(expected) & set(full))
             if tuple(full[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise QuantizedCheckpointError(
            f"checkpoint does not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    for lname, q in new.items():
        parent_name, _, leaf = lname.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, q)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise QuantizedCheckpointError(f"checkpoint does not fit the architecture: {e}") from None
    model.kd_quantization = {
        "method": cfg.get("method"),
        "alpha": cfg.get("alpha"),
        "skip": cfg.get("skip", []),
        "default_skip": cfg.get("default_skip", True),
        "layers": sorted(cfg["layers"]),
    }
    if cfg.get("layer_alpha"):
        model.kd_quantization["layer_alpha"] = dict(cfg["layer_alpha"])
    model.eval()
    if device is not None:
        model.to(device)
    return model
