"""The one precedence rule shared by every ``verb(model, config=None, **overrides)`` entry point."""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def resolve_config(
    cls: type[ConfigT], config: ConfigT | None = None, overrides: Mapping[str, Any] | None = None
) -> ConfigT:
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
        raise TypeError(
            f"unknown {cls.__name__} option(s): {', '.join(hints)}; valid options: {', '.join(field_names)}"
        )
    if config is None:
        return cls(**overrides)
    # Configs that normalise their inputs in __post_init__ (e.g. DistillationConfig adds an implicit feature term)
    # keep the arguments they were built from, so an override is applied to what the user wrote, not to the result.
    raw = getattr(config, "_init_args", None)
    if raw is not None:
        return cls(**{**raw, **overrides})
    return dataclasses.replace(config, **overrides)


def parse_mapping(value, name: str, value_type=float) -> dict:
    """Accept a dict, a JSON object string, or ``"a:1,b:2"`` / ``"a=b,c=d"`` shorthand."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a dict or a string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("{"):
        try:
            out = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: invalid JSON {text!r}: {e}") from None
        if not isinstance(out, dict):
            raise ValueError(f"{name}: expected a JSON object, got {text!r}")
        return out
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        sep = "=" if "=" in part else (":" if ":" in part else None)
        if sep is None:
            if value_type is float:
                out[part] = 1.0
                continue
            raise ValueError(f"{name}: entry {part!r} must look like 'key{'=' if value_type is str else ':'}value'")
        k, v = (x.strip() for x in part.split(sep, 1))
        try:
            out[k] = value_type(v)
        except ValueError:
            raise ValueError(f"{name}: cannot parse {v!r} in {part!r} as {value_type.__name__}") from None
    return out
