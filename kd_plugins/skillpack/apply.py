"""Apply SkillPacks to a model in place and take them off again, restoring the base weights bit for bit.

The first pack applied stores a state on the model (attribute :data:`~kd_plugins.skillpack.fingerprint.STATE_ATTR`):
the base fingerprint, the base values of every tensor a pack touched, and the ``(pack, scale)`` list in order.
Removing a pack restores the touched tensors and adds the remaining packs again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from .entry import Entry
from .errors import ArchitectureMismatchError, FingerprintMismatchError, SkillPackError
from .fingerprint import STATE_ATTR, model_fingerprint, model_tensors


class AppliablePack(Protocol):
    """What applying needs of a pack (a :class:`~kd_plugins.skillpack.SkillPack` has it)."""

    entries: dict[str, Entry]
    base_fingerprint: str


def _check_target(pack: AppliablePack, model: nn.Module, strict: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The model's tensors and fingerprint, after checking that the pack fits it (nothing is changed on failure)."""
    tensors = model_tensors(model)
    missing = [n for n in pack.entries if n not in tensors]
    bad = [
        (n, pack.entries[n].shape, tuple(tensors[n].shape))
        for n in pack.entries
        if n in tensors and tuple(tensors[n].shape) != tuple(pack.entries[n].shape)
    ]
    if missing or bad:
        raise ArchitectureMismatchError(
            f"this SkillPack does not fit {type(model).__name__}: {len(missing)} tensors missing (e.g. "
            f"{missing[:3]}), {len(bad)} with other shapes (e.g. {bad[:3]}). The model was not changed."
        )
    fp = model_fingerprint(model)
    if fp != pack.base_fingerprint:
        msg = (
            f"model fingerprint {fp[:23]}... differs from the pack's base {pack.base_fingerprint[:23]}...: "
            f"this is not the base model the pack was extracted from (other weights, dtype or architecture)"
        )
        if strict:
            raise FingerprintMismatchError(msg + ". The model was not changed; pass strict=False to apply anyway.")
        # stacklevel: _check_target, apply_pack, its no_grad wrapper, SkillPack.apply, then the caller
        warnings.warn(msg + "; applying anyway (strict=False).", stacklevel=5)
    return tensors, fp


def _add_deltas(
    pack: AppliablePack, tensors: dict[str, torch.Tensor], scale: float, only: Iterable[str] | None = None
) -> None:
    for name, e in pack.entries.items():
        if only is None or name in only:
            t = tensors[name]
            t.copy_((t.float() + scale * e.delta().to(t.device)).to(t.dtype))


def _undo_partial_apply(
    pack: AppliablePack, state: dict, tensors: dict[str, torch.Tensor], new_snapshots: list[str]
) -> None:
    """After a failure half-way through applying ``pack``: put its tensors back as the other packs left them."""
    for name in pack.entries:
        if name in state["snapshot"]:
            tensors[name].copy_(state["snapshot"][name])
    for name in new_snapshots:
        state["snapshot"].pop(name, None)
    for p, s in state["applied"]:
        _add_deltas(p, tensors, s, only=set(pack.entries))


@torch.no_grad()
def apply_pack(pack: AppliablePack, model: nn.Module, scale: float = 1.0, *, strict: bool = True) -> nn.Module:
    """Add ``scale x delta`` of ``pack`` to ``model`` in place and return it (see :meth:`SkillPack.apply`)."""
    tensors, fp = _check_target(pack, model, strict)
    state = getattr(model, STATE_ATTR, None)
    if state is not None and any(p is pack for p, _ in state["applied"]):
        raise SkillPackError("this SkillPack is already applied to the model; remove() it first")
    created = state is None
    if created:
        state = {"base_fingerprint": fp, "snapshot": {}, "applied": []}
    new_snapshots = []
    try:
        for name, e in pack.entries.items():
            t = tensors[name]
            if name not in state["snapshot"]:
                state["snapshot"][name] = t.detach().clone()
                new_snapshots.append(name)
            t.copy_((t.float() + scale * e.delta().to(t.device)).to(t.dtype))
    except BaseException:
        _undo_partial_apply(pack, state, tensors, new_snapshots)
        raise
    state["applied"].append((pack, float(scale)))
    if created:
        object.__setattr__(model, STATE_ATTR, state)
    return model


@torch.no_grad()
def remove_pack(pack: AppliablePack, model: nn.Module) -> nn.Module:
    """Take ``pack`` off ``model`` (see :meth:`SkillPack.remove`)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None or not any(p is pack for p, _ in state["applied"]):
        raise SkillPackError("this SkillPack is not applied to the model")
    tensors = model_tensors(model)
    for name, base_value in state["snapshot"].items():
        tensors[name].copy_(base_value)
    state["applied"] = [(p, s) for p, s in state["applied"] if p is not pack]
    for p, s in state["applied"]:
        _add_deltas(p, tensors, s)
    if not state["applied"]:
        object.__delattr__(model, STATE_ATTR)
    return model


def applied_packs(model: nn.Module) -> list[tuple[AppliablePack, float]]:
    """``[(pack, scale), ...]`` currently applied to ``model`` (in order)."""
    state = getattr(model, STATE_ATTR, None)
    return list(state["applied"]) if state else []
