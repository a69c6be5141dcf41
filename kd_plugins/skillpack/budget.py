"""Storage budgets: the bytes a SkillPack may use, given as bytes, a fraction of the dense delta, or text.

"Dense delta bytes", the reference for fractional budgets, is every changed tensor at 2 bytes per element (bf16).
"""

from __future__ import annotations

import re

from .errors import SkillPackError

DENSE_BYTES_PER_ELEMENT = 2  # the reference "dense delta" is bf16
_UNIT_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_budget_text(text: str, dense_bytes: int) -> int:
    s = text.strip().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(%|[kKmMgG]i?[bB]|[bB])?", s)
    if not m:
        raise SkillPackError(f"cannot parse budget {text!r}; use e.g. '5%', '0.05', '20MB', '512KiB', 1000000")
    num, unit = float(m.group(1)), (m.group(2) or "")
    if unit == "%":
        return parse_budget(num / 100.0, dense_bytes)
    if unit == "" and "." in m.group(1):  # "0.05": a fraction, like the float 0.05
        return parse_budget(num, dense_bytes)
    return int(num * _UNIT_BYTES[unit.lower()])


def parse_budget(budget, dense_bytes: int) -> int:
    """Bytes from ``budget``: int bytes; float in (0, 1] = fraction of the dense (bf16) delta; str "5%", "0.05",
    "20MB", "512KiB", "1000"."""
    if isinstance(budget, bool) or budget is None:
        raise SkillPackError(f"invalid budget {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise SkillPackError(
                f"a float budget is a fraction of the dense delta in (0, 1]; got {budget}. Pass an int for bytes."
            )
        value = int(budget * dense_bytes)
    elif isinstance(budget, str):
        value = _parse_budget_text(budget, dense_bytes)
    else:
        raise SkillPackError(f"invalid budget type {type(budget).__name__}")
    if value <= 0:
        raise SkillPackError(f"budget must be positive, got {budget!r}")
    return value
