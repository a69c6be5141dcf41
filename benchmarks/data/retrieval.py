"""Dense-retrieval evaluation: encode texts with a bare encoder, score queries against documents; and
inverse-cloze training pairs built from documents alone."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kd_plugins.losses import mean_pool


@torch.no_grad()
def encode(
    model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256, pooling: str = "mean"
) -> torch.Tensor:
    """L2-normalised sentence embeddings ``[N, D]`` (float32, CPU) of ``texts``.

    ``pooling="mean"``: attention-mask mean of ``last_hidden_state`` (sentence-transformers' default);
    ``"cls"``: the first token. Texts are sorted by length internally so batches pad little; the output follows the
    input order. The model's train/eval mode is restored afterwards.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("encode() needs at least one text")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    try:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            emb = mean_pool(hidden, batch["attention_mask"]) if pooling == "mean" else hidden[:, 0]
            emb = F.normalize(emb.float(), dim=-1).cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j]
    finally:
        model.train(was_training)
    return torch.stack(out)


def retrieval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> dict[str, float]:
    """MRR and recall@1 when query ``i``'s single relevant document is document ``i``.

    Scores are dot products (pass L2-normalised embeddings for cosine). Ties are broken pessimistically: a document
    scoring exactly as high as the relevant one counts as ranked above it.
    """
    if query_emb.dim() != 2 or doc_emb.dim() != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(
            f"expected [N, D] queries and [M, D] documents, got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}"
        )
    n = query_emb.shape[0]
    if n > doc_emb.shape[0]:
        raise ValueError(f"{n} queries but only {doc_emb.shape[0]} documents: query i's relevant doc is doc i")
    scores = query_emb.float() @ doc_emb.float().T
    pos = scores[torch.arange(n), torch.arange(n)]
    others = scores >= pos[:, None]
    others[torch.arange(n), torch.arange(n)] = False
    rank = 1 + others.sum(1)
    return {"mrr": (1.0 / rank.double()).mean().item(), "recall@1": (rank == 1).double().mean().item()}


def embedding_drift(
    model, reference, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 256, pooling: str = "mean"
) -> dict[str, float]:
    """How far ``model``'s sentence embeddings of ``texts`` moved from ``reference``'s (e.g. the original model).

    Returns the mean, median and maximum cosine distance (``1 - cos``) between the two models' L2-normalised
    embeddings (same pooling and truncation as :func:`encode`). Retrieval metrics on one split can hide such
    movement (the multi-exit notes show a full model at distance 0.05 with unchanged validation MRR but a 0.015 MRR
    loss on the test split), so check it on held-out text whenever shared layers were trained.
    """
    a = encode(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, pooling=pooling)
    b = encode(reference, tokenizer, texts, batch_size=batch_size, max_length=max_length, pooling=pooling)
    if a.shape != b.shape:
        raise ValueError(
            f"the two models give embeddings of different shapes {tuple(a.shape)} and {tuple(b.shape)}: "
            "drift needs the same embedding space"
        )
    dist = 1.0 - (a * b).sum(-1)
    return {"mean": dist.mean().item(), "median": dist.median().item(), "max": dist.max().item()}


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Sentences of ``text`` (split after ``.``, ``?``, ``!`` followed by whitespace, and at line breaks), keeping those
    with at least ``min_words`` words."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [x.strip() for x in parts if len(x.split()) >= min_words]


def inverse_cloze_pairs(
    docs: Sequence[str], picks: Sequence[int], rng: random.Random, min_words: int = 4
) -> tuple[list[str], list[str]]:
    """Inverse-cloze retrieval pairs (Lee et al., 2019): for each document index in ``picks``, one of its sentences
    (chosen with ``rng``) as the query and the document with that sentence removed as its positive.

    Documents with fewer than two sentences of ``min_words``+ words are skipped, so the lists can be shorter than
    ``picks``. Indices must be distinct: the pairs feed in-batch-negatives losses, where a repeated document would
    turn a positive into a negative. Returns ``(queries, positives)``.

    Raises:
        ValueError: a document index appears twice in ``picks``.
    """
    if len(set(picks)) != len(picks):
        raise ValueError(
            "inverse_cloze_pairs needs distinct document indices in `picks` (a repeated document makes a "
            "positive look like an in-batch negative); sample them without replacement, e.g. "
            "rng.sample(range(len(docs)), n)"
        )
    queries, positives = [], []
    for i in picks:
        sents = split_sentences(docs[i], min_words)
        if len(sents) < 2:
            continue
        j = rng.randrange(len(sents))
        queries.append(sents[j])
        positives.append(" ".join(sents[:j] + sents[j + 1 :]))
    return queries, positives
