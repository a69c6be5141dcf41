"""Atomic directory publication shared by the checkpoint writers (quantized models, ACM models)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def apply_umask(d: Path) -> None:
    """``mkdtemp`` creates a 0700 directory: give the checkpoint the permissions a plain ``mkdir`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for p in d.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the completed temporary directory ``tmp`` to ``out`` with ``os.replace``.

    An existing non-empty ``out`` is first renamed aside and removed only after the new directory is in place, so a
    crash at any point leaves either the old or the new checkpoint complete, never a mix.
    """
    apply_umask(tmp)
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def fsync_tree(d: Path) -> None:
    """Flush every file below ``d`` to disk before the directory is published."""
    for p in d.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a checkpoint directory atomically: yields a temporary sibling of ``out`` to fill; on normal exit its
    files are fsynced and it replaces ``out`` (:func:`publish_dir`); on any error it is removed and ``out`` is left
    as it was. Callers decide beforehand whether an existing ``out`` may be replaced."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
