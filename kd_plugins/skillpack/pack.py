"""``SkillPack``: a compressed fine-tuning delta for one base model, and its entry points (extract, save / load,
apply / remove, LoRA import / export). The work is done by the modules below it: :mod:`.delta` (collect),
:mod:`.compress` (compress), :mod:`.io` (file format), :mod:`.apply` (apply / remove), :mod:`.lora` (peft format).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .._config import resolve_config
from . import report as R
from .apply import apply_pack, remove_pack
from .compress import compress_entries
from .config import SkillPackConfig
from .delta import collect_deltas
from .entry import Entry
from .fingerprint import model_fingerprint
from .io import pack_metadata, read_pack_dir, write_pack_dir
from .lora import factored_entry, read_lora_modules, write_lora_adapter


class SkillPack:
    """A compressed fine-tuning delta for one base model. Build with :meth:`extract`, :meth:`load` or
    :meth:`from_lora`; use with :meth:`apply` / :meth:`remove`, :meth:`save`, :func:`kd_plugins.skillpack.fuse`."""

    def __init__(
        self,
        entries: Iterable[Entry],
        base_fingerprint: str,
        *,
        name: str | None = None,
        info: dict | None = None,
        pack_id: str | None = None,
    ):
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        self.base_fingerprint = base_fingerprint
        self.name = name
        self.info = dict(info or {})
        self.id = pack_id or uuid.uuid4().hex

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def extract(
        cls, base: nn.Module, finetuned: nn.Module, config: SkillPackConfig | None = None, **overrides
    ) -> SkillPack:
        """Extract ``finetuned - base`` and compress it module by module.

        ``config`` (a :class:`SkillPackConfig`, default ``SkillPackConfig()``) says how; keyword ``overrides``
        replace its fields, e.g. ``SkillPack.extract(base, ft, budget="5%")`` or ``extract(base, ft, cfg,
        name="x")``. At most one of ``budget`` and ``energy`` may be set; with neither, ``budget="5%"``
        (``SkillPack.extract(base, ft)`` works). The fields:

            budget: total stored bytes: an int (bytes), a float in (0, 1] (fraction of the dense bf16 delta), or a
                string ("5%", "0.05", "20MB", "512KiB"). Exclusive with ``energy``. Default (neither set): "5%",
                which kept 98.5% of a SmolLM2-135M fine-tune's perplexity gain at 1/20 of the dense delta; on a
                tiny model where 5% cannot hold the exact small deltas plus one component, the smallest budget that
                can, with a warning (:data:`~kd_plugins.skillpack.config.DEFAULT_BUDGET`).
            energy: per-module energy threshold beta in (0, 1] (rank = smallest k keeping beta of sum sigma^2).
            policy: ``"module-aware"`` (one global rate-distortion allocation of ranks and bit widths over all
                modules) or ``"uniform"`` (each matrix gets the budget share of its size). Budget mode only.
            embeddings: ``"lowrank"`` (like any matrix), ``"exact"`` (fp32 delta), ``"sparse"`` (largest
                ``sparse_density`` fraction of entries, fp16 values), ``"skip"`` (not stored).
            bits: allowed widths of the factor columns in budget mode (default 8, 4, 2; 16/32 = fp16/fp32 floats);
                an int forces one width. In energy mode the columns are split by ``bit_split``.
            bit_split: energy mode: ``[(bits, fraction), ...]`` of the kept columns, leading first (default
                GraftLLM's 2% 8-bit, 18% 4-bit, 80% 2-bit, at least one leading column).
            group_size: quantization group length along a column (one fp16 scale per group).
            exact_max_dim: matrices whose smaller side is at most this are stored exactly (like norms and biases).
            sparse_density, name, progress: see :class:`SkillPackConfig`.

        Neither model is modified. Raises :class:`ArchitectureMismatchError` for different parameter names or
        shapes and :class:`BudgetTooSmallError` when the budget cannot hold the exact deltas plus one component (the
        error gives the smallest budget that can).
        """
        config = resolve_config(SkillPackConfig, config, overrides)
        items = collect_deltas(base, finetuned)
        return compress_deltas(items, model_fingerprint(base), config)

    @classmethod
    def from_lora(
        cls,
        adapter_dir,
        base: nn.Module,
        *,
        bits: int = 32,
        budget=None,
        energy: float | None = None,
        name: str | None = None,
        group_size: int = 64,
        **compress_overrides,
    ) -> SkillPack:
        """A SkillPack holding the peft LoRA adapter in ``adapter_dir`` as deltas of ``base`` (which must be the
        adapter's base model: names and shapes are checked; the pack's fingerprint is ``base``'s).

        By default the factors are stored in fp32 (``bits=32``, lossless; ``bits=8/4/2/16`` quantizes every column
        at that width); ``budget=`` / ``energy=`` instead re-compress the dense deltas with :meth:`extract` rules
        (further :class:`SkillPackConfig` fields as keyword arguments).
        """
        modules, lora_info = read_lora_modules(adapter_dir, base)
        fp = model_fingerprint(base)
        info = {"imported_from": str(Path(adapter_dir)), **lora_info}
        name = name or Path(adapter_dir).name
        if budget is not None or energy is not None:
            items = [dict(lm.meta, delta=lm.delta()) for lm in modules]
            if items:
                pack = compress_deltas(
                    items, fp, budget=budget, energy=energy, name=name, group_size=group_size, **compress_overrides
                )
                pack.info.update(info)
                return pack
        entries = [e for e in (factored_entry(lm, bits, group_size) for lm in modules) if e is not None]
        info["dense_bytes"] = sum(e.numel * 2 for e in entries)
        return cls(entries, fp, name=name, info=info)

    def to_lora(self, out_dir, base_model_name_or_path: str | None = None, overwrite: bool = False) -> dict:
        """Export the low-rank entries on Linear layers as a peft LoRA adapter in ``out_dir``
        (see :mod:`kd_plugins.skillpack.lora`). ``PeftModel.from_pretrained(base, out_dir)`` then computes the same
        function as ``pack.subset(kinds=["lowrank"])`` applied to the base. Returns ``{"modules", "skipped",
        "max_rank"}``."""
        return write_lora_adapter(self.entries.values(), out_dir, base_model_name_or_path, overwrite)

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        """Stored bytes of all tensors (the safetensors file adds a small JSON header)."""
        return sum(e.nbytes for e in self.entries.values())

    @property
    def dense_bytes(self) -> int | None:
        return self.info.get("dense_bytes")

    def delta(self, name: str) -> torch.Tensor:
        return self.entries[name].delta()

    def deltas(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, e in self.entries.items():
            yield name, e.delta()

    def subset(self, kinds: Iterable[str] | None = None, names: Iterable[str] | None = None) -> SkillPack:
        """A pack with only some entries (same base); e.g. ``subset(kinds=["lowrank"])``."""
        kinds = set(kinds) if kinds is not None else None
        names = set(names) if names is not None else None
        keep = [
            e
            for e in self.entries.values()
            if (kinds is None or e.kind in kinds) and (names is None or e.name in names)
        ]
        return SkillPack(keep, self.base_fingerprint, name=self.name, info=dict(self.info, subset=True))

    def report(self) -> list[dict]:
        """Per-module rows: name, type, kind, shape, rank, bits, bytes, dense (bf16) bytes, relative error."""
        return R.report_rows(self.entries.values(), self.info.get("dropped", []))

    def summary(self, per_module: bool = False) -> str:
        """Text report: totals, per module-type aggregates, and optionally every module."""
        return R.summary_text(self.name or self.id[:8], list(self.entries.values()), self.info, per_module)

    def __repr__(self) -> str:
        return (
            f"SkillPack(name={self.name!r}, tensors={len(self.entries)}, bytes={self.nbytes:,}, "
            f"base={self.base_fingerprint[:19]}...)"
        )

    # --------------------------------------------------------------------------------------- apply / remove
    def apply(self, model: nn.Module, scale: float = 1.0, *, strict: bool = True) -> nn.Module:
        """Add ``scale x delta`` to ``model`` in place and return it.

        The model must be the pack's base (fingerprint check; ``strict=False`` downgrades a mismatch to a warning)
        with every tensor the pack touches. Several packs can be applied; the base values of touched tensors are kept
        so that :meth:`remove` restores them bit for bit. Nothing is changed when a check fails.
        """
        return apply_pack(self, model, scale, strict=strict)

    def remove(self, model: nn.Module) -> nn.Module:
        """Take this pack off ``model``: the touched tensors are restored to their saved base values bit for bit and
        the packs still applied are added again in order."""
        return remove_pack(self, model)

    # --------------------------------------------------------------------------------------------- save / load
    def manifest(self) -> dict:
        """The pack record saved as the checkpoint manifest's ``metadata`` (see :mod:`kd_plugins.skillpack.io`)."""
        return pack_metadata(
            self.entries.values(),
            pack_id=self.id,
            name=self.name,
            base_fingerprint=self.base_fingerprint,
            info=self.info,
        )

    def save(self, out_dir, overwrite: bool = False) -> Path:
        """Same as :func:`save_skillpack` ``(self, out_dir, overwrite)``."""
        return save_skillpack(self, out_dir, overwrite=overwrite)

    @classmethod
    def load(cls, pack_dir, verify: bool = True) -> SkillPack:
        """Same as :func:`load_skillpack` ``(pack_dir, verify)``."""
        return load_skillpack(pack_dir, verify=verify)


def compress_deltas(
    items: list[dict],
    base_fingerprint: str,
    config: SkillPackConfig | None = None,
    *,
    cache: dict | None = None,
    **overrides,
) -> SkillPack:
    """Compress a list of deltas (``{"name", "delta", "shape", "dtype", "module_type", "module_class"}``, see
    :func:`kd_plugins.skillpack.delta.collect_deltas`) into a :class:`SkillPack` of base ``base_fingerprint``;
    ``config`` and keyword ``overrides`` as in :meth:`SkillPack.extract`. ``cache``: a dict kept by the caller to
    reuse SVDs and quantization-error tables when the same deltas are compressed at several budgets."""
    config = resolve_config(SkillPackConfig, config, overrides)
    entries, info = compress_entries(items, config, cache)
    return SkillPack(entries, base_fingerprint, name=config.name, info=info)


def save_skillpack(pack: SkillPack, directory, overwrite: bool = False) -> Path:
    """Write ``<directory>/skillpack.safetensors`` + ``manifest.json`` (per-tensor sha256, base fingerprint,
    report) atomically: everything goes to a temporary sibling directory that is renamed into place. An existing
    non-empty ``directory`` raises ``FileExistsError`` unless ``overwrite``."""
    return write_pack_dir(directory, pack.entries.values(), pack.manifest(), pack.report(), overwrite=overwrite)


def load_skillpack(directory, verify: bool = True) -> SkillPack:
    """Read a pack written by :func:`save_skillpack`; with ``verify`` every tensor's sha256 is checked
    (:class:`IntegrityError` on any mismatch, a truncated file or a missing tensor)."""
    entries, meta = read_pack_dir(directory, verify=verify)
    return SkillPack(
        entries, meta["base_fingerprint"], name=meta.get("name"), info=meta.get("info"), pack_id=meta.get("id")
    )
