"""Save / load an ACMized model: ``model.safetensors`` (the whole state dict) + ``acm_config.json`` (layout), written
atomically (a temporary sibling directory renamed into place)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .._atomic import atomic_dir
from .convert import rebuild_layout
from .modules import acm_blocks

__all__ = ["save_acm", "load_acm"]

FORMAT = "kd_plugins.acm"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "acm_config.json"


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _architecture(model: nn.Module, build_kwargs: dict | None) -> dict:
    if hasattr(model, "config") and hasattr(model.config, "to_dict") and hasattr(model, "save_pretrained"):
        return {"kind": "hf", "class": type(model).__name__}
    arch = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    if arch.get("architecture"):
        kw = dict(build_kwargs or {})
        kw.setdefault("num_classes", getattr(model, "num_classes", None))
        return {"kind": "timm", "name": arch["architecture"], "kwargs": kw}
    return {"kind": "other", "class": type(model).__name__}


def save_acm(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
             build_kwargs: dict | None = None) -> Path:
    """Write an ACMized ``model`` (all weights, gates included, plus its ACM layout) to ``out_dir`` atomically.

    Nothing is left half-written if the save fails; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``. HF models also get their ``config.json`` (and ``tokenizer`` files when given), so
    :func:`load_acm` can rebuild the architecture without the original checkpoint; timm models record their
    ``architecture`` name and ``build_kwargs`` (``num_classes`` automatically).
    """
    if not acm_blocks(model) or not hasattr(model, "kd_acm"):
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": _architecture(model, build_kwargs),
           "acm": model.kd_acm, "aliases": aliases,
           "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": _sha256(t)}
                       for n, t in tensors.items()}}
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": FORMAT})
        if cfg["architecture"]["kind"] == "hf":
            model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
    return out


def _build_base(path: Path, arch: dict) -> nn.Module:
    if arch["kind"] == "hf":
        import transformers

        cls = getattr(transformers, arch["class"], None)
        if cls is None:
            raise ValueError(f"transformers has no class {arch['class']!r}; pass model= to load_acm")
        config = transformers.AutoConfig.from_pretrained(path)
        return cls(config)
    if arch["kind"] == "timm":
        import timm

        return timm.create_model(arch["name"], pretrained=False, **{k: v for k, v in arch["kwargs"].items()
                                                                     if v is not None})
    raise ValueError(f"cannot rebuild a {arch.get('class')} model by itself: pass model= (the original dense "
                     "architecture) to load_acm")


def load_acm(path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Load a model written by :func:`save_acm`.

    ``model``: the original dense architecture to rebuild the ACMs on (e.g. ``AutoModel.from_pretrained(...)``);
    by default it is created from the saved ``config.json`` (HF) or timm architecture name. The ACM layout is
    re-created with :func:`~kd_plugins.acm.acmize`'s block builder and every tensor is loaded (``verify``: sha256
    checked). A model with another layout raises an error naming the mismatching blocks / tensors.
    """
    d = Path(path)
    cpath, wpath = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cpath.is_file() or not wpath.is_file():
        raise FileNotFoundError(f"{d} is not an ACM checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME}; write one "
                                "with kd_plugins.acm.save_acm)")
    cfg = json.loads(cpath.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cpath} is not an ACM checkpoint config (format {cfg.get('format')!r})")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"ACM checkpoint format {cfg['format_version']} is newer than this library "
                         f"({FORMAT_VERSION}); upgrade kd_plugins")
    if model is None:
        model = _build_base(d, cfg["architecture"])
    if acm_blocks(model):
        layout = getattr(model, "kd_acm", {}).get("blocks", {})
        if layout != cfg["acm"]["blocks"]:
            raise ValueError("model is already ACMized with another layout than the checkpoint; pass the original "
                             "dense model to load_acm")
    else:
        rebuild_layout(model, cfg["acm"])
    from safetensors.torch import load_file

    flat = load_file(str(wpath))
    if verify:
        bad = [n for n, meta in cfg["tensors"].items() if n not in flat or _sha256(flat[n]) != meta["sha256"]]
        if bad:
            raise ValueError(f"{wpath}: {len(bad)} tensors fail their checksum or are missing (e.g. {bad[:3]}); the "
                             "checkpoint is corrupt")
    for a, src in cfg.get("aliases", {}).items():
        flat[a] = flat[src]
    own = model.state_dict()
    missing = sorted(set(own) - set(flat))
    unexpected = sorted(set(flat) - set(own))
    shape = sorted(n for n in set(own) & set(flat) if tuple(own[n].shape) != tuple(flat[n].shape))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing in checkpoint: {missing[:5]}")
        if unexpected:
            parts.append(f"not in model: {unexpected[:5]}")
        if shape:
            parts.append("shape mismatch: " + ", ".join(f"{n} {tuple(flat[n].shape)} vs {tuple(own[n].shape)}"
                                                          for n in shape[:5]))
        raise ValueError("the ACM checkpoint does not fit this model (" + "; ".join(parts) + "): load it into the "
                         "architecture and ACM layout it was saved from")
    model.load_state_dict(flat, strict=True)
    model.eval()
    return model
