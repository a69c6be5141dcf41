"""The loss sum: weighted distillation terms with a finiteness check, written once for every integration."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["check_finite", "weighted_sum", "gradmag_weights"]


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


def gradmag_weights(
    values: Mapping[str, torch.Tensor], weights: Mapping[str, float], reference: torch.Tensor
) -> dict[str, float]:
    """Per-step weights that give each term a gradient at ``reference`` (the student's logits) of norm
    ``weights[i] * mean``, where ``mean`` is the ``weights``-weighted mean of the terms' own gradient norms there.

    This is tokenkit's ``approx_gradmag_preserve_mag`` multitask aggregation (each loss scaled by the inverse norm of
    its last-layer gradient, renormalised to keep the magnitude), measured at the logits: one backward through the
    loss functions per term, none through the model. The weights are plain floats (no gradient flows through them).
    Terms with weight 0, or whose gradient at ``reference`` is zero or absent (they do not read the logits), keep
    their configured weight.
    """
    norms: dict[str, float] = {}
    for name, value in values.items():
        if weights[name] <= 0 or not value.requires_grad:
            continue
        (grad,) = torch.autograd.grad(value, reference, retain_graph=True, allow_unused=True)
        norm = float(grad.float().norm()) if grad is not None else 0.0
        if norm > 0 and math.isfinite(norm):
            norms[name] = norm
    out = {name: float(weights[name]) for name in values}
    total_weight = sum(weights[n] for n in norms)
    if not norms or total_weight <= 0:
        return out
    mean = sum(weights[n] * norms[n] for n in norms) / total_weight
    for name, norm in norms.items():
        out[name] = weights[name] * mean / norm
    return out
