"""Which layers :func:`~kd_plugins.quant.quantize` replaces: target selection, skip lists and default skips."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

import torch.nn as nn

from .layers import QuantizedLinear, is_quantizable

__all__ = [
    "DEFAULT_SKIP_COMPONENTS",
    "DEFAULT_SKIP_SUBSTRINGS",
    "find_quantizable",
    "quantized_layers",
    "replace_submodule",
]

#: A module is skipped by default when a dotted component of its name equals one of these ...
DEFAULT_SKIP_COMPONENTS = ("lm_head", "embed_out", "classifier", "pre_classifier", "score", "qa_outputs", "cls", "head")
#: ... or contains one of these substrings (embeddings, norms).
DEFAULT_SKIP_SUBSTRINGS = ("embed", "norm")


# ---------------------------------------------------------------------------------------------------------- targets
def _component_match(name: str, entry: str) -> bool:
    if any(ch in entry for ch in "*?["):
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


def _skip_entries(skip: Iterable[str] | str | None) -> list[str]:
    entries = [skip] if isinstance(skip, str) else list(skip or [])
    for e in entries:
        if not isinstance(e, str) or not e.strip():
            raise ValueError(f"skip entries must be non-empty module names or globs, got {e!r}")
    return entries


def _check_skip_entry(model: nn.Module, named: list[tuple[str, nn.Module]], entry: str) -> None:
    """An entry must name at least one module, and one that contains something quantizable."""
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
    skip = _skip_entries(skip)
    named = [(n, m) for n, m in model.named_modules() if n]
    for entry in skip:
        _check_skip_entry(model, named, entry)
    special = _special_heads(model) if default_skip else {}
    mha = _parent_is_mha(model)
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, m in named:
        if isinstance(m, QuantizedLinear):
            raise ValueError(f"{name} is already a QuantizedLinear: the model has been quantized before")
        if not is_quantizable(m):
            continue
        user = next((e for e in skip if _component_match(name, e)), None)
        if id(m) in mha:
            skipped[name] = "inside nn.MultiheadAttention (reads .weight directly)"
        elif user is not None:
            skipped[name] = f"skip={user!r}"
        elif default_skip and (reason := _default_skip_reason(name, m, special)):
            skipped[name] = reason
        else:
            targets[name] = m
    return targets, skipped


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`~kd_plugins.quant.QuantizedLinear` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted path) of ``model``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
