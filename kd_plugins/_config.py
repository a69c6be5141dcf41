"""The one precedence rule shared by every ``verb(model, config=None, **overrides)`` entry point."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def resolve_config(cls: type[ConfigT], config: ConfigT | None = None,
                   overrides: Mapping[str, Any] | None = None) -> ConfigT:
    """Start from ``config`` (or ``cls()``), then let keyword ``overrides`` replace those fields.

    Raises ``TypeError`` when ``config`` is not a ``cls`` instance or when an override names no field of ``cls``
    (the error lists close matches, so a typo such as ``bit=8`` points at ``bits``).
    """
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    overrides = dict(overrides or {})
    field_names = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in overrides if name not in field_names]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, field_names, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(hints)}; valid options: "
                        f"{', '.join(field_names)}")
    if config is None:
        return cls(**overrides)
    # Configs that normalise their inputs in __post_init__ (e.g. DistillationConfig adds an implicit feature term)
    # keep the arguments they were built from, so an override is applied to what the user wrote, not to the result.
    raw = getattr(config, "_init_args", None)
    if raw is not None:
        return cls(**{**raw, **overrides})
    return dataclasses.replace(config, **overrides)
