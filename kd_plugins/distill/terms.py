"""The loss sum: weighted distillation terms with a finiteness check, written once for every integration."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["check_finite", "weighted_sum"]


def check_finite(
    name: str, value: torch.Tensor, step: int | None = None, hint: str | None = None, path: str = ""
) -> None:
    """Raise ``FloatingPointError`` naming the term (and step, and ``path`` such as "fused") when ``value`` has a
    NaN or inf."""
    v = value.detach()
    if torch.isfinite(v).all():
        return
    where = f" at step {step}" if step is not None else ""
    shown = float(v) if v.numel() == 1 else "a tensor with non-finite entries"
    raise FloatingPointError(
        f"Non-finite distillation loss{where}: term {name!r}{f' ({path})' if path else ''} = {shown}. "
        + (
            hint
            or "Check for -inf teacher logits (vocab_alignment='pad' gives the teacher's extra tokens no student "
            "mass), fp16 overflow (use bf16), or a too-low temperature."
        )
    )


def weighted_sum(
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    step: int | None = None,
    hint: str | None = None,
) -> torch.Tensor | None:
    """``sum_i weights[i] * values[i]`` over ``values`` (every value checked finite first). ``None`` when empty."""
    total = None
    for name, value in values.items():
        check_finite(name, value, step, hint)
        term = value * weights[name]
        total = term if total is None else total + term
    return total
