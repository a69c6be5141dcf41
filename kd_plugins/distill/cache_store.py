"""On-disk format of the sharded top-k teacher cache: a writer and a lazy, verifying reader.

A cache directory (written atomically by ``kd-plugins cache-teacher`` / :func:`kd_plugins.cache_teacher`)::

    teacher_cache_shards.json   manifest: format, schema_version, metadata (fingerprints, temperature, ...),
                                encoding (top_k, vocab_size, index_bits, value_format, ...), num_rows,
                                index and shards (file, row_start, rows, bytes, sha256 of the whole file)
    index.safetensors           keys [N, 16] uint8 (hash of each example's unpadded input_ids), offsets [N + 1] int64
    shard-00000.safetensors     indices [R, ceil(k * bits / 8)] uint8 (bit-packed, distill/cache_codec.py) and the
    shard-00001.safetensors     value tensors of the value format (probs, log_probs, or head_probs + tail_coeffs),
    ...                         and per-row extras a kind needs (``lowrank``: coefficients [R, r] int8, scales [R])

A ``lowrank`` cache's index also holds the map that rebuilds logits from a code (``tail_bias`` [V], ``tail_weight``
[V, r]; distill/cache_lowrank.py), and its manifest's encoding lists the extras (``"extras"``).

Example ``j`` owns the global rows ``offsets[j]:offsets[j + 1]`` (one per unpadded token); an example never
straddles two shards. The reader loads the small index whole, checks every shard's size when it opens the cache (a
truncated shard is refused at once), and reads rows lazily: ``safe_open`` slices only the rows a batch needs, an LRU
keeps at most ``max_open_shards`` shards open, and a shard's sha256 is checked the first time it is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .._checkpoint import CheckpointError, MissingCheckpointFileError, atomic_dir, check_output_dir
from .cache_codec import check_value_format, decode_log_probs, encode_log_probs, pack_indices, unpack_indices

__all__ = ["MANIFEST", "FORMAT", "ShardWriter", "ShardedTopKStore", "is_sharded_cache", "file_sha256"]

MANIFEST = "teacher_cache_shards.json"
FORMAT = "kd_plugins.teacher_cache_shards"
SCHEMA_VERSION = 1
INDEX_FILE = "index.safetensors"
_REBUILD = "rebuild it with `kd-plugins cache-teacher` (or copy the directory again)"


def is_sharded_cache(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a sharded teacher cache (its manifest)."""
    return (Path(directory) / MANIFEST).is_file()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata={"producer": FORMAT})
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------------------------------ writer
class ShardWriter:
    """Buffers the top-k rows of whole examples and writes a shard each time ``shard_tokens`` rows are reached.

    Writes into ``directory`` (the caller's temporary directory: publishing it atomically is the caller's job).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        vocab_size: int,
        top_k: int,
        value_format: str = "bf16",
        head_k: int = 8,
        tail_degree: int = 2,
        shard_tokens: int = 1 << 20,
    ):
        check_value_format(value_format, top_k, head_k, tail_degree)
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.encoding = {
            "top_k": int(top_k),
            "vocab_size": int(vocab_size),
            "value_format": value_format,
            "head_k": int(head_k) if value_format == "head_tail" else None,
            "tail_degree": int(tail_degree) if value_format == "head_tail" else None,
        }
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._buffered = 0
        self.num_rows = 0

    def add(
        self, indices: torch.Tensor, log_probs: torch.Tensor, extras: dict[str, torch.Tensor] | None = None
    ) -> None:
        """The ``[r, k]`` rows of one example (log-probs sorted descending per row), and optional per-row
        ``extras`` (tensors with ``r`` rows, stored as given; the same names for every example)."""
        k = self.encoding["top_k"]
        if indices.shape != log_probs.shape or indices.dim() != 2 or indices.shape[1] != k:
            raise ValueError(f"expected [rows, {k}] indices and log_probs, got {tuple(indices.shape)}")
        extras = {n: t.detach().cpu() for n, t in (extras or {}).items()}
        if any(len(t) != len(indices) for t in extras.values()):
            raise ValueError(f"extras must have one row per cached row ({len(indices)})")
        if extras and not self._buffer and not self.num_rows:  # the first example names them
            self.encoding["extras"] = sorted(extras)
        if sorted(extras) != self.encoding.get("extras", []):
            raise ValueError(f"every example needs the extras {self.encoding['extras']}, got {sorted(extras)}")
        self._buffer.append((indices.detach().cpu(), log_probs.detach().float().cpu(), extras))
        self._buffered += indices.shape[0]
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard (no-op when empty)."""
        if not self._buffer:
            return
        idx = torch.cat([b[0] for b in self._buffer])
        lp = torch.cat([b[1] for b in self._buffer])
        enc = self.encoding
        tensors = {"indices": pack_indices(idx, enc["vocab_size"])}
        tensors.update(
            encode_log_probs(lp, enc["value_format"], head_k=enc["head_k"] or 0, tail_degree=enc["tail_degree"] or 0)
        )
        tensors.update({n: torch.cat([b[2][n] for b in self._buffer]) for n in enc.get("extras", [])})
        record = _save(tensors, self.directory / f"shard-{len(self.shards):05d}.safetensors")
        self.shards.append({**record, "row_start": self.num_rows, "rows": int(idx.shape[0])})
        self.num_rows += int(idx.shape[0])
        self._buffer, self._buffered = [], 0

    def finish(
        self,
        keys: torch.Tensor,
        offsets: torch.Tensor,
        metadata: dict[str, Any],
        once: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Flush, write the index (with the ``once`` tensors a kind needs) and the manifest; returns the manifest."""
        self.flush()
        if int(offsets[-1]) != self.num_rows:
            raise AssertionError(f"offsets end at {int(offsets[-1])} but {self.num_rows} rows were written")
        index = _save({"keys": keys, "offsets": offsets, **(once or {})}, self.directory / INDEX_FILE)
        total = sum(s["bytes"] for s in self.shards) + index["bytes"]
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "metadata": metadata,
            "encoding": self.encoding,
            "num_rows": self.num_rows,
            "total_bytes": total,
            "bytes_per_token": total / max(self.num_rows, 1),
            "index": index,
            "shards": self.shards,
        }
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return manifest


# ------------------------------------------------------------------------------------------------------ reader
def _read_manifest(d: Path) -> dict[str, Any]:
    path = d / MANIFEST
    if not path.is_file():
        raise MissingCheckpointFileError(f"{d} has no {MANIFEST}: it is not a sharded teacher cache ({_REBUILD})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the cache is corrupt: {_REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sharded teacher cache manifest (format {FORMAT!r} expected)")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {manifest.get('schema_version')} is newer than this kd_plugins "
            f"({SCHEMA_VERSION}); upgrade kd_plugins"
        )
    for key in ("metadata", "encoding", "index", "shards"):
        if key not in manifest:
            raise CheckpointError(f"{path}: missing {key!r}; the cache is corrupt: {_REBUILD}")
    return manifest


class ShardedTopKStore:
    """Lazy reader of a sharded cache directory (see the module doc).

    Args:
        directory: the cache directory.
        max_open_shards: shards kept open at once (least recently used closed first).
        verify: check each shard's sha256 the first time it is opened (sizes are always checked at open).
    """

    def __init__(self, directory: str | os.PathLike, *, max_open_shards: int = 4, verify: bool = True):
        from safetensors.torch import load_file

        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        self.encoding = self.manifest["encoding"]
        self.max_open_shards, self.verify = max_open_shards, verify
        for record in [self.manifest["index"], *self.manifest["shards"]]:
            self._check_size(record)
        self._check_sum(self.manifest["index"])
        self.index = load_file(str(self.directory / self.manifest["index"]["file"]))
        self.shards = self.manifest["shards"]
        self._starts = torch.tensor([s["row_start"] for s in self.shards] + [self.manifest["num_rows"]])
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._verified: set[int] = set()
        self.opens = 0  # shard files opened so far (tests and logs: how lazy the reads are)

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.manifest["metadata"])

    @property
    def bytes_per_token(self) -> float:
        """Bytes on disk (shards + index) per cached row."""
        return float(self.manifest["bytes_per_token"])

    def __getstate__(self) -> dict[str, Any]:  # open file handles do not pickle; they reopen on demand
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    # -------------------------------------------------------------------------------------------- checks
    def _check_size(self, record: dict[str, Any]) -> None:
        path = self.directory / record["file"]
        if not path.is_file():
            raise MissingCheckpointFileError(f"{path} is missing: the teacher cache is incomplete; {_REBUILD}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CheckpointError(
                f"{path} has {size:,} bytes, the manifest says {record['bytes']:,}: the shard is truncated or "
                f"corrupt; {_REBUILD}"
            )

    def _check_sum(self, record: dict[str, Any]) -> None:
        path = self.directory / record["file"]
        if self.verify and file_sha256(path) != record["sha256"]:
            raise CheckpointError(f"checksum mismatch in {path}: the file is corrupt or was edited; {_REBUILD}")

    # -------------------------------------------------------------------------------------------- reading
    def _handle(self, s: int) -> Any:
        from safetensors import SafetensorError, safe_open

        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        record = self.shards[s]
        if s not in self._verified:
            self._check_size(record)
            self._check_sum(record)
            self._verified.add(s)
        try:
            handle = safe_open(str(self.directory / record["file"]), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{record['file']} cannot be read ({e}): the shard is corrupt; {_REBUILD}") from None
        self.opens += 1
        self._open[s] = handle
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle

    def _slice(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The stored tensors of global rows ``start:stop`` (one example: they sit in one shard)."""
        s = int(torch.searchsorted(self._starts, torch.tensor(start), right=True)) - 1
        base = self.shards[s]["row_start"]
        if stop - base > self.shards[s]["rows"]:
            raise CheckpointError(f"rows {start}:{stop} straddle shards in {self.directory}; the index is corrupt")
        handle = self._handle(s)
        return {name: handle.get_slice(name)[start - base : stop - base] for name in handle.keys()}

    def read(self, example_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(indices int64, log_probs float32)`` rows of the given examples, concatenated in that order."""
        indices, log_probs, _ = self.read_with_extras(example_ids)
        return indices, log_probs

    def read_with_extras(self, example_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`read` plus the per-row extras of the cache's kind (``{}`` for a top-k cache)."""
        offsets, enc = self.index["offsets"], self.encoding
        parts = [self._slice(int(offsets[j]), int(offsets[j + 1])) for j in example_ids]
        joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else {}
        k, vocab = enc["top_k"], enc["vocab_size"]
        if not joined:
            return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), {}
        extras = {n: joined.pop(n) for n in enc.get("extras", [])}
        indices = unpack_indices(joined.pop("indices"), k, vocab)
        return indices, decode_log_probs(joined, enc["value_format"], k), extras

    def copy_to(self, directory: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Copy the cache directory to ``directory`` atomically (temporary sibling, then rename)."""
        out = check_output_dir(directory, overwrite)
        with atomic_dir(out) as tmp:
            for record in [self.manifest["index"], *self.shards]:
                shutil.copy2(self.directory / record["file"], tmp / record["file"])
            shutil.copy2(self.directory / MANIFEST, tmp / MANIFEST)
        return str(out)
