"""Name -> loss registry.

Every loss is registered as an ``nn.Module`` class (hyper-parameters in ``__init__``) together with its functional
form, so ``get_loss("kl", temperature=2.0)`` and ``kl_divergence(..., temperature=2.0)`` compute the same thing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

#: What a loss consumes. The distillation engine uses this to decide which tensors to hand it.
LOSS_KINDS = ("logits", "hidden", "embedding", "attention", "ranking", "cross_tokenizer", "pair")


@dataclass(frozen=True)
class LossSpec:
    name: str
    module_cls: type[nn.Module]
    function: Callable | None
    kind: str
    description: str


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, *, kind: str, function: Callable | None = None, aliases: tuple[str, ...] = ()):
    """Class decorator registering an ``nn.Module`` loss under ``name`` (and ``aliases``).

    Args:
        name: registry key, lower-case, e.g. ``"kl"``.
        kind: one of :data:`LOSS_KINDS`; tells integrations which tensors the loss needs.
        function: the functional form computing the same value.
        aliases: other accepted names.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"register_loss({name!r}): kind must be one of {LOSS_KINDS}, got {kind!r}")

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        doc = (cls.__doc__ or "").strip().splitlines()
        spec = LossSpec(name=name, module_cls=cls, function=function, kind=kind, description=doc[0] if doc else "")
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key].module_cls is not cls:
                raise ValueError(f"A loss named {key!r} is already registered ({_REGISTRY[key].module_cls.__name__})")
            _REGISTRY[key] = spec
        cls.registry_name = name
        cls.kind = kind
        return cls

    return deco


def _lookup(name: str) -> LossSpec:
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"Unknown loss {name!r}.{hint} Registered losses: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[key]


def get_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered loss ``name`` with hyper-parameters ``kwargs``.

    >>> get_loss("kl", temperature=2.0)
    """
    return _lookup(name).module_cls(**kwargs)


def get_loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` (class, function, kind) registered under ``name``."""
    return _lookup(name)


def get_loss_function(name: str) -> Callable:
    """The functional form of the registered loss ``name``."""
    spec = _lookup(name)
    if spec.function is None:
        raise KeyError(f"Loss {name!r} has no functional form registered; use get_loss({name!r}) instead.")
    return spec.function


def list_losses(kind: str | None = None) -> list[str]:
    """Registered canonical loss names, optionally only those of one ``kind``."""
    return sorted({s.name for s in _REGISTRY.values() if kind is None or s.kind == kind})
