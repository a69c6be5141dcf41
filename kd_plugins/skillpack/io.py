"""The SkillPack file format: a kd_plugins checkpoint (:mod:`kd_plugins._checkpoint`) of kind ``"skillpack"``.

``<dir>/skillpack.safetensors`` holds every entry's tensors under ``"<parameter name>::<role>"``;
``<dir>/manifest.json`` is the common checkpoint manifest (per-tensor dtype, shape and sha256, file size) whose
``metadata`` is the pack: ``id``, ``name``, ``base_fingerprint``, ``nbytes``, ``info``, one record per entry
(:meth:`Entry.meta`) and a per-module ``report``. Directories are written atomically and verified on read
(:class:`IntegrityError` on any mismatch). Packs written before the common manifest (``format:
"kd_plugins.skillpack"``, version 1, with the pack fields at the top level) still load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .._checkpoint import CheckpointSpec, read_checkpoint, write_checkpoint
from .entry import Entry
from .errors import IntegrityError

TENSORS_FILE = "skillpack.safetensors"
MANIFEST_FILE = "manifest.json"
#: ``format`` of the manifests written before the common checkpoint manifest (version 1).
LEGACY_FORMAT = "kd_plugins.skillpack"
SPEC = CheckpointSpec(
    kind="skillpack",
    manifest_name=MANIFEST_FILE,
    tensor_file=TENSORS_FILE,
    description="a SkillPack directory",
    writer="kd_plugins.skillpack.save_skillpack",
    legacy_format=LEGACY_FORMAT,
    error=IntegrityError,
    missing_error=IntegrityError,
)
_REQUIRED_METADATA = ("base_fingerprint", "entries")


def pack_metadata(
    entries: Iterable[Entry], *, pack_id: str, name: str | None, base_fingerprint: str, info: dict
) -> dict:
    """The pack record stored as the manifest's ``metadata`` (without the ``report`` :func:`write_pack_dir` adds)."""
    entries = list(entries)
    return {
        "id": pack_id,
        "name": name,
        "base_fingerprint": base_fingerprint,
        "nbytes": sum(e.nbytes for e in entries),
        "info": info,
        "entries": [e.meta() for e in entries],
    }


def write_pack_dir(
    directory, entries: Iterable[Entry], metadata: dict, report: list[dict], overwrite: bool = False
) -> Path:
    """Write the entries' tensors and the pack ``metadata`` (plus ``report``) to ``directory`` atomically; an
    existing non-empty ``directory`` is replaced only with ``overwrite`` (else ``FileExistsError``)."""
    flat = {f"{e.name}::{role}": t for e in entries for role, t in e.tensors.items()}
    write_checkpoint(
        SPEC, directory, flat, architecture=None, metadata=dict(metadata, report=report), overwrite=overwrite
    )
    return Path(directory)


def _check_entries(metadata: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise IntegrityError(f"{path / MANIFEST_FILE} has no {missing}: the pack is corrupt")
    expected = {f"{m['name']}::{r}" for m in metadata["entries"] for r in m["tensors"]}
    if set(tensors) != expected:
        raise IntegrityError(
            f"{path / TENSORS_FILE} holds {len(tensors)} tensors that do not match the manifest's "
            f"entries ({len(expected)}): missing {sorted(expected - set(tensors))[:3]}, extra "
            f"{sorted(set(tensors) - expected)[:3]}"
        )


def _entry_from_meta(m: dict, flat: dict[str, torch.Tensor]) -> Entry:
    tensors = {r: flat[f"{m['name']}::{r}"] for r in m["tensors"]}
    return Entry(
        m["name"],
        m["kind"],
        tuple(m["shape"]),
        m["dtype"],
        m["module_type"],
        m.get("module_class", ""),
        tensors,
        [tuple(g) for g in m["groups"]],
        m["group_size"],
        m.get("rel_error"),
    )


def read_pack_dir(directory, verify: bool = True) -> tuple[list[Entry], dict]:
    """Entries and pack metadata of a directory written by :func:`write_pack_dir` (or by a version-1 writer); with
    ``verify`` every tensor's sha256 is checked (:class:`IntegrityError` on any mismatch, a truncated file or a
    missing tensor)."""
    d = Path(directory)
    if not d.is_dir():
        raise IntegrityError(f"{d} is not a SkillPack directory (needs {MANIFEST_FILE} and {TENSORS_FILE})")
    ckpt = read_checkpoint(SPEC, d, verify=verify)
    _check_entries(ckpt.metadata, ckpt.tensors, d)
    return [_entry_from_meta(m, ckpt.tensors) for m in ckpt.metadata["entries"]], ckpt.metadata
