"""Per-parameter masks of trainable entries, and the update rule that keeps every other entry bitwise fixed.

Zeroing the gradients of frozen entries is not enough with a modern optimizer: AdamW's decoupled weight decay
(``p -= lr * wd * p``) moves every entry the optimizer holds, gradient or not, and any optimizer with state from
earlier steps (momentum) keeps moving entries whose gradient is now zero. So :class:`SparseUpdate` masks the
*update*:

1. a gradient hook on each partly trained parameter zeroes the frozen entries of every gradient as backward
   produces it, so gradient accumulation, all-reduce, gradient-norm clipping and the optimizer's moments only ever
   see the trainable entries (the clip norm is the norm of the sparse gradient);
2. after ``optimizer.step()``, :meth:`SparseUpdate.restore` writes the frozen entries back from a snapshot taken at
   :meth:`~SparseUpdate.attach` (``torch.where(frozen, snapshot, p, out=p)``: one in-place pass, bitwise exact);
3. parameters with no trainable entry are frozen outright (``requires_grad_(False)``, undone by
   :meth:`~SparseUpdate.detach`) when the optimizer is not built yet, so they cost no gradient and no optimizer state.

Memory: one snapshot copy and one boolean mask of each partly trained parameter, on its device.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["SparseMask", "SparseUpdate", "apply_sparse_update", "parameter_table"]

logger = logging.getLogger(__name__)


@dataclass
class SparseMask:
    """Which entries of which parameters train: ``masks[name]`` is a boolean tensor shaped like the parameter.

    Parameters absent from ``masks`` do not train. ``dense`` names the tensors trained in full (task heads); the
    :attr:`density` counts only the others, the entries that competed for the budget.
    """

    masks: dict[str, torch.Tensor]
    dense: tuple[str, ...] = field(default=())

    def __post_init__(self):
        for name, m in self.masks.items():
            if not torch.is_tensor(m) or m.dtype != torch.bool:
                raise TypeError(f"SparseMask.masks[{name!r}] must be a bool tensor, got {getattr(m, 'dtype', m)!r}")
        unknown = [n for n in self.dense if n not in self.masks]
        if unknown:
            raise ValueError(f"SparseMask.dense names tensors that have no mask: {unknown[:5]}")
        self.dense = tuple(self.dense)

    @classmethod
    def from_indices(
        cls,
        indices: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
        dense: Sequence[str] = (),
    ) -> SparseMask:
        """Masks with ``True`` at the flat ``indices`` of each tensor of the given ``shapes``."""
        masks = {}
        for name, shape in shapes.items():
            m = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
            idx = indices.get(name)
            if idx is not None and idx.numel():
                m[idx.to(device="cpu", dtype=torch.long)] = True
            masks[name] = m.reshape(tuple(shape))
        return cls(masks, tuple(dense))

    @classmethod
    def from_diff(cls, diff) -> SparseMask:
        """The entries a :class:`~kd_plugins.sparseft.SparseDiff` changes (its tensors, dense ones included)."""
        return cls.from_indices(diff.indices, diff.shapes, diff.dense)

    def indices(self) -> dict[str, torch.Tensor]:
        """Flat int64 indices of the trainable entries, per tensor (CPU)."""
        return {n: torch.flatten(m.cpu()).nonzero().reshape(-1) for n, m in self.masks.items()}

    @property
    def num_trainable(self) -> int:
        """Entries that train (dense tensors included)."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def num_entries(self) -> int:
        """Entries of every tensor the mask covers."""
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def density(self) -> float:
        """Trainable fraction of the sparse (non-dense) tensors' entries."""
        sparse = [m for n, m in self.masks.items() if n not in self.dense]
        total = sum(m.numel() for m in sparse)
        return float(sum(int(m.sum()) for m in sparse)) / total if total else 0.0

    def __repr__(self) -> str:
        return (
            f"SparseMask({len(self.masks)} tensors, {self.num_trainable:,} of {self.num_entries:,} entries train, "
            f"density {self.density:.4g}, dense={list(self.dense)})"
        )


def parameter_table(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter name of ``model``, tied aliases included (``named_parameters(remove_duplicate=False)``)."""
    return dict(model.named_parameters(remove_duplicate=False))


def _resolve(model: nn.Module, mask: SparseMask) -> dict[int, tuple[str, nn.Parameter, torch.Tensor | None]]:
    """``id(param) -> (name, param, mask or None)`` for every parameter of ``model``; mask names are checked."""
    table = parameter_table(model)
    unknown = [n for n in mask.masks if n not in table]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(table), n=3)
        raise ValueError(
            f"the sparse mask names {len(unknown)} tensor(s) the model has no parameter for: {unknown[:5]}"
            + (f" (close: {close})" if close else "")
            + "; build the mask from this architecture (buffers cannot be sparsely trained)"
        )
    out: dict[int, tuple[str, nn.Parameter, torch.Tensor | None]] = {}
    for name, p in model.named_parameters():
        out[id(p)] = (name, p, None)
    for name, m in mask.masks.items():
        p = table[name]
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)} but the parameter is {tuple(p.shape)}")
        if out[id(p)][2] is not None:
            raise ValueError(f"the mask covers the tied parameter {name!r} twice (under two names); keep one")
        out[id(p)] = (name, p, m)
    return out


@dataclass
class _Tracked:
    """One parameter under a sparse update; the device tensors are (re)built by :meth:`take`."""

    name: str
    param: nn.Parameter
    mask: torch.Tensor  # bool, True where the entry trains (CPU or any device)
    index: torch.Tensor | None = None  # flat indices of the trainable entries (device of the parameter)
    initial: torch.Tensor | None = None  # their values when taken
    frozen: torch.Tensor | None = None  # ~mask on the parameter's device; None when the tensor trains in full
    snapshot: torch.Tensor | None = None  # the parameter when taken, source of restore()
    hook: object = None

    @torch.no_grad()
    def take(self) -> None:
        p = self.param
        self.index = torch.flatten(self.mask).nonzero().reshape(-1).to(p.device)
        self.initial = p.detach().reshape(-1)[self.index].clone()
        if not bool(self.mask.all()):
            self.frozen = (~self.mask).to(p.device)
            self.snapshot = p.detach().clone()
            if self.hook is None:  # reads self.frozen at call time, so a re-take needs no new hook
                self.hook = p.register_hook(lambda g: g.masked_fill(self.frozen, 0))


class SparseUpdate:
    """Train only the entries of ``mask``; every other entry of ``model`` stays bitwise unchanged.

    Use in any training loop (the Hugging Face adapter is :class:`kd_plugins.integrations.hf.SparseFTCallback`)::

        update = apply_sparse_update(model, mask)      # = SparseUpdate(model, mask).attach()
        for batch in loader:
            model(**batch).loss.backward()             # frozen entries of the gradients are zeroed by hooks
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            update.step(optimizer)                     # optimizer.step(), then frozen entries written back
            optimizer.zero_grad()
        diff = SparseDiff.from_update(update)          # the trained entries' change
        update.detach()

    Args:
        model: the model being trained (its parameters, by name; wrappers such as DDP are fine if ``model`` is the
            unwrapped module whose parameters the optimizer holds).
        mask: the trainable entries; parameters it does not name do not train.
        freeze_untouched: set ``requires_grad=False`` on parameters without trainable entries (saves their gradients
            and optimizer state: only do this before the optimizer is built). Otherwise they are kept fixed like the
            frozen entries of the other tensors (hook + snapshot).
    """

    def __init__(self, model: nn.Module, mask: SparseMask, *, freeze_untouched: bool = True):
        if not isinstance(mask, SparseMask):
            raise TypeError(f"mask must be a SparseMask (SparseMask.from_diff(diff) for a diff), got {type(mask)}")
        self.model, self.mask, self.freeze_untouched = model, mask, freeze_untouched
        self._tracked: list[_Tracked] = []
        self._unfrozen: list[nn.Parameter] = []
        self.attached = False

    # ------------------------------------------------------------------------------------------------ lifecycle
    def attach(self) -> SparseUpdate:
        """Snapshot the frozen values, register the gradient hooks, freeze untouched parameters."""
        if self.attached:
            return self
        with torch.no_grad():
            for name, p, m in _resolve(self.model, self.mask).values():
                self._track(name, p, m)
        self.attached = True
        logger.info(
            "sparse fine-tuning: %s of %s parameter entries train (density %.4g of the sparse tensors; %d tensors "
            "in part, %d in full)",
            f"{self.num_trainable:,}",
            f"{sum(p.numel() for p in self.model.parameters()):,}",
            self.mask.density,
            sum(t.frozen is not None for t in self._tracked),
            sum(t.frozen is None for t in self._tracked),
        )
        return self

    def _track(self, name: str, p: nn.Parameter, m: torch.Tensor | None) -> None:
        trains = m is not None and bool(m.any())
        if not trains and self.freeze_untouched:
            if p.requires_grad:
                p.requires_grad_(False)
                self._unfrozen.append(p)
            return
        if not p.requires_grad:
            if trains:
                logger.warning("sparse fine-tuning: %s has trainable entries but requires_grad=False", name)
            return
        t = _Tracked(name, p, torch.zeros(p.shape, dtype=torch.bool) if m is None else m)
        t.take()
        self._tracked.append(t)

    def snapshot(self) -> None:
        """Take the current weights as the values to keep (frozen entries) and to diff against (trained entries),
        on each parameter's current device: call it when the weights were loaded or moved after :meth:`attach`."""
        for t in self._tracked:
            t.take()

    def detach(self) -> None:
        """Remove the hooks, give back ``requires_grad`` and free the snapshots (the weights keep their values)."""
        for t in self._tracked:
            if t.hook is not None:
                t.hook.remove()
        for p in self._unfrozen:
            p.requires_grad_(True)
        self._tracked, self._unfrozen, self.attached = [], [], False

    def __enter__(self) -> SparseUpdate:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # --------------------------------------------------------------------------------------------- per step
    @torch.no_grad()
    def zero_frozen_grads(self) -> None:
        """Zero the gradients of frozen entries in place (the hooks already do; this also catches gradients written
        by other means, e.g. ``p.grad = ...``)."""
        for t in self._tracked:
            if t.frozen is not None and t.param.grad is not None:
                t.param.grad.masked_fill_(t.frozen, 0)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every frozen entry back to its value at :meth:`attach` (call after each ``optimizer.step()``)."""
        for t in self._tracked:
            if t.frozen is not None:
                torch.where(t.frozen, t.snapshot, t.param.data, out=t.param.data)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``zero_frozen_grads()``, ``optimizer.step()``, ``restore()``."""
        self.zero_frozen_grads()
        optimizer.step()
        self.restore()

    # ---------------------------------------------------------------------------------------------- results
    @property
    def num_trainable(self) -> int:
        """Entries that train."""
        return int(sum(t.index.numel() for t in self._tracked))

    @torch.no_grad()
    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (flat indices, current - initial values)}`` of the trained entries (CPU; float32, or float64
        for float64 parameters) since :meth:`attach`. Tensors in the mask with no trainable entry map to empty
        tensors; :meth:`kd_plugins.sparseft.SparseDiff.from_update` turns this into a diff."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in self._tracked:
            if t.name not in self.mask.masks:  # kept fixed, not part of the mask
                continue
            vdtype = torch.float64 if t.param.dtype == torch.float64 else torch.float32
            now = t.param.detach().reshape(-1)[t.index]
            out[t.name] = (t.index.cpu(), (now.to(vdtype) - t.initial.to(vdtype)).cpu())
        for name in self.mask.masks:
            if name not in out:
                out[name] = (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        return out


def apply_sparse_update(model: nn.Module, mask: SparseMask, *, freeze_untouched: bool = True) -> SparseUpdate:
    """Start training only ``mask``'s entries of ``model``: ``SparseUpdate(model, mask, ...).attach()``.

    Call ``update.step(optimizer)`` instead of ``optimizer.step()`` (or ``update.restore()`` right after it), and
    ``update.detach()`` when done; usable as a context manager. See :class:`SparseUpdate`.
    """
    return SparseUpdate(model, mask, freeze_untouched=freeze_untouched).attach()
