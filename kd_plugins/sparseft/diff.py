"""``SparseDiff``: a sparse parameter difference ``phi = theta_tuned - theta_base`` (the artifact of a sparse
fine-tuning), applied and composed by addition, saved as a kd_plugins checkpoint of kind ``"sparse_diff"``.

Per tensor it holds the flat (row-major) int64 indices of the changed entries and their differences (float32;
float64 for float64 parameters), plus the tensor's shape and dtype::

    diff = SparseDiff.from_models(base, finetuned, density=0.05)   # keep the 5% of entries that moved most
    diff.apply(model)                # model[idx] += values  (theta_base + phi)
    diff.revert(model)               # bitwise back to what it was before apply
    both = language_diff + task_diff # composition by addition: union of indices, values summed
    save_sparse_diff(diff, "sft/lang_sw")  # = diff.save(...);  load_sparse_diff("sft/lang_sw") = SparseDiff.load

On disk: ``sparse_diff.safetensors`` holds ``"<name>::indices"`` (int32 when the tensor has fewer than 2**31
entries, else int64) and ``"<name>::values"``; ``manifest.json`` is the common checkpoint manifest (sha256 per tensor)
whose ``metadata`` records every tensor's shape and dtype, the dense tensors and the selection info.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._checkpoint import CheckpointError, CheckpointSpec, read_checkpoint, write_checkpoint
from .._config import resolve_config
from .config import SparseFTConfig
from .lt_sft import as_state, check_same_tensors, select_mask
from .mask import SparseMask, SparseUpdate, parameter_table

__all__ = ["SparseDiff", "save_sparse_diff", "load_sparse_diff", "SPEC"]

logger = logging.getLogger(__name__)

SPEC = CheckpointSpec(
    kind="sparse_diff",
    manifest_name="manifest.json",
    tensor_file="sparse_diff.safetensors",
    description="a SparseDiff directory",
    writer="kd_plugins.sparseft.save_sparse_diff",
)
_INT32_LIMIT = 2**31


def _value_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _numel(shape: Sequence[int]) -> int:
    return int(torch.Size(shape).numel())


@dataclass
class SparseDiff:
    """A sparse difference between two sets of weights: ``indices[name]`` (flat int64, unique, sorted) and
    ``values[name]`` (same length) per tensor, with its ``shapes[name]`` and ``dtypes[name]`` (the parameter's dtype
    name, e.g. ``"bfloat16"``). ``dense`` names the tensors stored whole (trained in full); ``info`` records how the
    diff was made (density, selection, participating entries...)."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    dense: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    _applied: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        # own copies: the checks below sort the entries in place
        self.indices, self.values, self.dtypes = dict(self.indices), dict(self.values), dict(self.dtypes)
        self.info = dict(self.info)
        names = set(self.indices)
        for what in ("values", "shapes", "dtypes"):
            if set(getattr(self, what)) != names:
                raise ValueError(f"SparseDiff: {what} and indices name different tensors")
        self.shapes = {n: tuple(int(d) for d in s) for n, s in self.shapes.items()}
        self.dense = tuple(self.dense)
        for n in names:
            self._check_entry(n)
        self._applied = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        # the record of models this diff was applied to holds weak references: not picklable, not worth sending
        return {k: v for k, v in self.__dict__.items() if k != "_applied"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._applied = weakref.WeakKeyDictionary()

    def _check_entry(self, name: str) -> None:
        idx, val = self.indices[name], self.values[name]
        if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
            raise ValueError(f"SparseDiff[{name!r}]: indices and values must be 1-D and of equal length")
        if idx.dtype not in (torch.int32, torch.int64) or not val.is_floating_point():
            raise ValueError(f"SparseDiff[{name!r}]: indices must be integers and values floating point")
        _dtype_from_name(self.dtypes[name])
        idx = idx.to(device="cpu", dtype=torch.long)
        n = _numel(self.shapes[name])
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"SparseDiff[{name!r}]: an index lies outside the tensor's {n} entries")
        order = torch.argsort(idx)
        idx, val = idx[order], val.detach().cpu()[order]
        if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
            raise ValueError(f"SparseDiff[{name!r}]: repeated indices (compose diffs with +)")
        self.indices[name], self.values[name] = idx, val

    # ---------------------------------------------------------------------------------------------- building
    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, torch.Tensor] | nn.Module,
        tuned: Mapping[str, torch.Tensor] | nn.Module,
        config: SparseFTConfig | None = None,
        *,
        mask: SparseMask | None = None,
        **overrides,
    ) -> SparseDiff:
        """``tuned - base`` on the entries of ``mask``, or (no mask) on the top-K entries by ``|tuned - base|``
        (:func:`~kd_plugins.sparseft.select_mask` with ``config`` / ``overrides``: K = density x participating
        entries, one global top-K by default).

        State dicts contribute their floating-point tensors (buffers included, tied tensors once); models their
        parameters. Errors: a tensor missing in ``tuned`` or with another shape, a density outside (0, 1].
        """
        cfg = resolve_config(SparseFTConfig, config, overrides)
        base_s, tuned_s = as_state(base, "base"), as_state(tuned, "tuned")
        made = {"selection": "given mask"} if mask is not None else {"config": dataclasses.asdict(cfg)}
        if mask is None:
            mask = select_mask(base_s, tuned_s, cfg)
        unknown = [n for n in mask.masks if n not in base_s]
        if unknown:
            raise ValueError(f"the mask names tensors the base does not have: {unknown[:5]}")
        check_same_tensors(base_s, tuned_s, list(mask.masks))
        indices, values, shapes, dtypes = {}, {}, {}, {}
        with torch.no_grad():
            for name, m in mask.masks.items():
                b, t = base_s[name].detach(), tuned_s[name].detach()
                idx = torch.flatten(m.cpu()).nonzero().reshape(-1)
                vdtype = _value_dtype(b.dtype)
                tv = t.reshape(-1)[idx.to(t.device)].to(device="cpu", dtype=vdtype)
                bv = b.reshape(-1)[idx.to(b.device)].to(device="cpu", dtype=vdtype)
                indices[name], values[name] = idx, tv - bv
                shapes[name], dtypes[name] = tuple(b.shape), _dtype_name(b.dtype)
        info = {**made, **_mask_info(mask)}
        return cls(indices, values, shapes, dtypes, mask.dense, info)

    @classmethod
    def from_models(
        cls,
        base: nn.Module,
        tuned: nn.Module,
        config: SparseFTConfig | None = None,
        *,
        mask: SparseMask | None = None,
        **overrides,
    ) -> SparseDiff:
        """:meth:`from_state_dicts` over the two models' parameters (``named_parameters()``)."""
        for what, m in (("base", base), ("tuned", tuned)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{what} must be an nn.Module (use SparseDiff.from_state_dicts for state dicts)")
        return cls.from_state_dicts(base, tuned, config, mask=mask, **overrides)

    @classmethod
    def from_update(cls, update: SparseUpdate, info: Mapping[str, Any] | None = None) -> SparseDiff:
        """The change of the trained entries since ``update.attach()`` (phase B of LT-SFT)."""
        table = parameter_table(update.model)
        indices, values, shapes, dtypes = {}, {}, {}, {}
        for name, (idx, delta) in update.deltas().items():
            p = table[name]
            indices[name], shapes[name], dtypes[name] = idx, tuple(p.shape), _dtype_name(p.dtype)
            values[name] = delta.to(_value_dtype(p.dtype))
        return cls(indices, values, shapes, dtypes, update.mask.dense, {**_mask_info(update.mask), **(info or {})})

    def mask(self) -> SparseMask:
        """The entries this diff changes, as a :class:`SparseMask`."""
        return SparseMask.from_diff(self)

    # ------------------------------------------------------------------------------------------ apply / revert
    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        table = {**dict(model.named_buffers(remove_duplicate=False)), **parameter_table(model)}
        unknown = [n for n in self.indices if n not in table]
        if unknown:
            raise ValueError(
                f"the SparseDiff changes {len(unknown)} tensor(s) the model does not have: {unknown[:5]}; apply it to "
                "the architecture it was made from"
            )
        bad = [
            f"{n}: diff {self.shapes[n]}, model {tuple(table[n].shape)}"
            for n in self.indices
            if tuple(table[n].shape) != self.shapes[n]
        ]
        if bad:
            raise ValueError("shape mismatch between the SparseDiff and the model: " + "; ".join(bad[:5]))
        return {n: table[n] for n in self.indices}

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """Add ``scale * values`` to ``model``'s entries (computed in float32, written in the parameter's dtype).

        The values overwritten are remembered, so :meth:`revert` restores them bit for bit. Applying to the base
        of :meth:`from_models` gives the tuned entries (exactly when each difference is exact in float32, e.g.
        bf16 / fp16 weights or fp32 entries that moved by less than a factor of 2). Returns ``model``.
        """
        targets, record = self._targets(model), {}
        for name, t in targets.items():
            flat = _flat_view(t, name)
            idx = self.indices[name].to(t.device)
            before = flat[idx]
            vals = self.values[name].to(t.device)
            after = (before.to(vals.dtype) + vals * scale).to(t.dtype)
            flat[idx] = after
            record[name] = (before, after)
        self._applied.setdefault(model, []).append((scale, record))
        return model

    @torch.no_grad()
    def revert(self, model: nn.Module) -> nn.Module:
        """Undo the last :meth:`apply` on ``model``: the saved entries are written back (bitwise exact) when the model
        still holds what apply wrote; entries changed since then (training) and models this diff was never applied
        to get ``values * scale`` subtracted instead (a warning says so). Returns ``model``."""
        targets = self._targets(model)
        stack = self._applied.get(model) or []
        scale, record = stack.pop() if stack else (1.0, {})
        subtracted = []
        for name, t in targets.items():
            flat = _flat_view(t, name)
            idx = self.indices[name].to(t.device)
            now = flat[idx]
            saved = record.get(name)
            if saved is not None and torch.equal(now, saved[1]):
                flat[idx] = saved[0]
                continue
            vals = self.values[name].to(t.device)
            flat[idx] = (now.to(vals.dtype) - vals * scale).to(t.dtype)
            subtracted.append(name)
        if subtracted:
            logger.warning(
                "SparseDiff.revert: %d tensor(s) changed since apply (or were never applied); reverted by "
                "subtraction, exact only up to rounding: %s",
                len(subtracted),
                subtracted[:3],
            )
        return model

    # -------------------------------------------------------------------------------------------- composition
    def __add__(self, other: SparseDiff) -> SparseDiff:
        """Composition by addition (LT-SFT's ``theta_0 + phi_language + phi_task``): the union of the indices,
        values summed where both diffs change the same entry."""
        if not isinstance(other, SparseDiff):
            return NotImplemented
        indices, values = dict(self.indices), dict(self.values)
        shapes, dtypes = dict(self.shapes), dict(self.dtypes)
        for name in other.indices:
            if name not in indices:
                indices[name], values[name] = other.indices[name], other.values[name]
                shapes[name], dtypes[name] = other.shapes[name], other.dtypes[name]
                continue
            if shapes[name] != other.shapes[name]:
                raise ValueError(f"cannot add diffs: {name!r} has shape {shapes[name]} in one, {other.shapes[name]}")
            idx = torch.cat([indices[name], other.indices[name]])
            vdtype = torch.promote_types(values[name].dtype, other.values[name].dtype)
            val = torch.cat([values[name].to(vdtype), other.values[name].to(vdtype)])
            uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            indices[name] = uniq
            values[name] = torch.zeros(uniq.numel(), dtype=vdtype).index_add_(0, inverse, val)
        dense = tuple(dict.fromkeys(self.dense + other.dense))
        return SparseDiff(indices, values, shapes, dtypes, dense, {"composed_of": [self.info, other.info]})

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:  # sum([d1, d2, ...])
            return self
        return NotImplemented

    # ------------------------------------------------------------------------------------------------- sizes
    @property
    def num_entries(self) -> int:
        """Entries the diff changes."""
        return int(sum(i.numel() for i in self.indices.values()))

    def _index_itemsize(self, name: str) -> int:
        return 4 if _numel(self.shapes[name]) < _INT32_LIMIT else 8

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (values plus indices as saved: int32 where they fit)."""
        return int(
            sum(v.numel() * v.element_size() + v.numel() * self._index_itemsize(n) for n, v in self.values.items())
        )

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the covered tensors stored whole in their own dtypes (what a dense diff would take)."""
        return int(sum(_numel(s) * _dtype_from_name(self.dtypes[n]).itemsize for n, s in self.shapes.items()))

    def size_report(self) -> dict[str, Any]:
        """``tensors``, ``entries``, ``nbytes``, ``dense_nbytes``, ``ratio`` (nbytes / dense_nbytes) and
        ``density`` (selected / participating entries, when known)."""
        dense_nbytes = self.dense_nbytes
        return {
            "tensors": len(self.indices),
            "entries": self.num_entries,
            "nbytes": self.nbytes,
            "dense_nbytes": dense_nbytes,
            "ratio": self.nbytes / dense_nbytes if dense_nbytes else 0.0,
            "density": self.info.get("density"),
        }

    def summary(self) -> str:
        """One line: entries, density, bytes against the dense size."""
        r = self.size_report()
        density = "" if r["density"] is None else f", density {r['density']:.4g}"
        return (
            f"SparseDiff: {r['entries']:,} entries in {r['tensors']} tensors{density}; {r['nbytes']:,} bytes "
            f"({100 * r['ratio']:.2f}% of the {r['dense_nbytes']:,} dense bytes)"
        )

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    # -------------------------------------------------------------------------------------------------- files
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """:func:`save_sparse_diff`."""
        return save_sparse_diff(self, directory, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> SparseDiff:
        """:func:`load_sparse_diff`."""
        return load_sparse_diff(directory, verify=verify)


def _flat_view(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name!r} is not contiguous; call .contiguous() on it before applying a SparseDiff")
    return t.data.view(-1)


def _mask_info(mask: SparseMask) -> dict[str, Any]:
    participating = sum(m.numel() for n, m in mask.masks.items() if n not in mask.dense)
    return {"density": mask.density, "num_selected": mask.num_trainable, "num_participating": participating}


def save_sparse_diff(diff: SparseDiff, directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``diff`` to ``directory`` atomically (safetensors + manifest with sha256 per tensor, kind
    ``"sparse_diff"``); a non-empty ``directory`` is replaced only with ``overwrite=True``. Returns the path."""
    if not isinstance(diff, SparseDiff):
        raise TypeError(f"save_sparse_diff expects a SparseDiff, got {type(diff).__name__}")
    tensors = {}
    for name, idx in diff.indices.items():
        idx_dtype = torch.int32 if diff._index_itemsize(name) == 4 else torch.int64
        tensors[f"{name}::indices"] = idx.to(idx_dtype)
        tensors[f"{name}::values"] = diff.values[name]
    metadata = {
        "tensors": {n: {"shape": list(diff.shapes[n]), "dtype": diff.dtypes[n]} for n in diff.indices},
        "dense": list(diff.dense),
        "info": diff.info,
        "num_entries": diff.num_entries,
        "nbytes": diff.nbytes,
    }
    return write_checkpoint(SPEC, directory, tensors, architecture=None, metadata=metadata, overwrite=overwrite)


def load_sparse_diff(directory: str | Path, *, verify: bool = True) -> SparseDiff:
    """Read a :func:`save_sparse_diff` directory, verifying file size, tensor table and (``verify``) every tensor's
    sha256; a corrupt, truncated or foreign directory raises :class:`~kd_plugins._checkpoint.CheckpointError`."""
    ckpt = read_checkpoint(SPEC, directory, verify=verify)
    meta = ckpt.metadata.get("tensors")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: manifest metadata has no 'tensors' table; the SparseDiff is corrupt")
    expected = {f"{n}::{role}" for n in meta for role in ("indices", "values")}
    if set(ckpt.tensors) != expected:
        raise CheckpointError(
            f"{directory}: stored tensors do not match the manifest's table (missing "
            f"{sorted(expected - set(ckpt.tensors))[:3]}, extra {sorted(set(ckpt.tensors) - expected)[:3]})"
        )
    try:
        return SparseDiff(
            {n: ckpt.tensors[f"{n}::indices"].to(torch.long) for n in meta},
            {n: ckpt.tensors[f"{n}::values"] for n in meta},
            {n: tuple(m["shape"]) for n, m in meta.items()},
            {n: m["dtype"] for n, m in meta.items()},
            tuple(ckpt.metadata.get("dense", ())),
            dict(ckpt.metadata.get("info") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: invalid SparseDiff ({e})") from None
