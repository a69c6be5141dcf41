"""Trans-Encoder (Liu et al., ICLR 2022): unsupervised sentence-pair scoring by distilling back and forth.

One cycle (``docs/losses.md``, Trans-Encoder; after ``amzn/trans-encoder``):

1. **bi -> cross**: the bi-encoder(s) score every unlabeled pair with cosine similarity; the cross-encoder(s) are
   trained on these pseudo-labels with BCE-with-logits (pairs added in both orders).
2. **cross -> bi**: the cross-encoders' sigmoid scores relabel the pairs; the bi-encoder(s) are trained with
   ``MSE(cos(u, v), label)`` (sentence-transformers' CosineSimilarityLoss).

*Mutual* distillation: with several bi-encoders / cross-encoders, the pseudo-labels of one direction are the
**average** over the models before training each model of the other side.

Choice for the cosine targets (they can be negative, outside BCE's ``[0, 1]``): ``target_map="affine"`` (default)
maps them with ``(1 + cos) / 2``; ``"clamp"`` clips to ``[0, 1]``. The cross->bi labels are sigmoid scores in
``[0, 1]``, which the bi-encoder's cosine matches directly (as in the repo).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .retrieval import CrossEncoder, encode_texts

__all__ = [
    "BiEncoder",
    "bi_encoder_scores",
    "cross_encoder_scores",
    "train_cross_on_labels",
    "train_bi_on_labels",
    "TransEncoderHistory",
    "trans_encoder",
]


@dataclass
class BiEncoder:
    """A bare encoder (``AutoModel``) + tokenizer, mean pooling, cosine similarity."""

    model: torch.nn.Module
    tokenizer: object
    max_length: int = 64


Pair = tuple[str, str]


@torch.no_grad()
def bi_encoder_scores(bi: BiEncoder, pairs: Sequence[Pair], batch_size: int = 64) -> torch.Tensor:
    """Cosine similarity of every pair ``[P]``."""
    a = encode_texts(bi.model, bi.tokenizer, [p[0] for p in pairs], max_length=bi.max_length, batch_size=batch_size)
    b = encode_texts(bi.model, bi.tokenizer, [p[1] for p in pairs], max_length=bi.max_length, batch_size=batch_size)
    return (a * b).sum(-1)


@torch.no_grad()
def cross_encoder_scores(
    cross: CrossEncoder, pairs: Sequence[Pair], batch_size: int = 64, symmetric: bool = True
) -> torch.Tensor:
    """``sigmoid`` of the cross-encoder logit ``[P]`` (averaged over both pair orders with ``symmetric``)."""
    was = cross.training
    cross.eval()
    try:

        def run(a, b):
            return torch.cat(
                [
                    torch.sigmoid(cross(a[i : i + batch_size], b[i : i + batch_size])).cpu()
                    for i in range(0, len(a), batch_size)
                ]
            )

        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        out = run(a, b)
        if symmetric:
            out = 0.5 * (out + run(b, a))
    finally:
        cross.train(was)
    return out


def _minibatches(n: int, batch: int, epochs: int, seed: int):
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch):
            yield order[i : i + batch]


def train_cross_on_labels(
    cross: CrossEncoder,
    pairs: Sequence[Pair],
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 2e-5,
    both_orders: bool = True,
    seed: int = 0,
) -> list[float]:
    """BCE-with-logits of the cross-encoder logit against soft labels in ``[0, 1]`` (sentence-transformers'
    ``CrossEncoder.fit`` with ``num_labels=1``)."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape != (len(pairs),):
        raise ValueError(f"need one label per pair: {len(pairs)} pairs, labels {tuple(labels.shape)}")
    if not bool(torch.isfinite(labels).all()) or float(labels.min()) < 0 or float(labels.max()) > 1:
        raise ValueError(
            "cross-encoder pseudo-labels must be finite and lie in [0, 1]; map cosine scores with "
            "(1 + cos) / 2 or clamp them"
        )
    data = list(pairs) + ([(b, a) for a, b in pairs] if both_orders else [])
    y = torch.cat([labels, labels]) if both_orders else labels
    params = [p for p in cross.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cross.train()
    losses = []
    for idx in _minibatches(len(data), batch_size, epochs, seed):
        logits = cross([data[i][0] for i in idx], [data[i][1] for i in idx])
        loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(logits.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cross.eval()
    return losses


def train_bi_on_labels(
    bi: BiEncoder,
    pairs: Sequence[Pair],
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    seed: int = 0,
) -> list[float]:
    """``MSE(cos(u, v), label)`` (CosineSimilarityLoss) on the pairs."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape != (len(pairs),) or not bool(torch.isfinite(labels).all()):
        raise ValueError(f"need one finite label per pair: {len(pairs)} pairs, labels {tuple(labels.shape)}")
    params = [p for p in bi.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    bi.model.train()
    losses = []
    for idx in _minibatches(len(pairs), batch_size, epochs, seed):
        u = encode_texts(bi.model, bi.tokenizer, [pairs[i][0] for i in idx], max_length=bi.max_length, grad=True)
        v = encode_texts(bi.model, bi.tokenizer, [pairs[i][1] for i in idx], max_length=bi.max_length, grad=True)
        loss = F.mse_loss((u * v).sum(-1), labels[idx].to(u.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    bi.model.eval()
    return losses


@dataclass
class TransEncoderHistory:
    """Per cycle: the averaged pseudo-labels of each direction and, with ``evaluate``, the dev scores."""

    bi_labels: list[torch.Tensor] = field(default_factory=list)
    cross_labels: list[torch.Tensor] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)

    @property
    def best_cycle(self) -> int | None:
        """Index of the cycle with the highest ``evaluate()['score']`` (the repo picks the best dev cycle)."""
        if not self.scores:
            return None
        return max(range(len(self.scores)), key=lambda i: self.scores[i].get("score", float("-inf")))


def trans_encoder(
    bi_encoders: BiEncoder | Sequence[BiEncoder],
    cross_encoders: CrossEncoder | Sequence[CrossEncoder],
    pairs: Sequence[Pair],
    *,
    cycles: int = 3,
    target_map: str = "affine",
    cross_epochs: int = 1,
    bi_epochs: int = 1,
    cross_batch_size: int = 32,
    bi_batch_size: int = 32,
    cross_lr: float = 2e-5,
    bi_lr: float = 5e-5,
    seed: int = 0,
    evaluate: Callable[[int], dict] | None = None,
) -> TransEncoderHistory:
    """Run ``cycles`` of bi -> cross -> bi (mutual when several models are given). Models are trained in place.

    Repo defaults: 3 cycles, cross 1 epoch / batch 32, bi 10 epochs / batch 128 / lr 5e-5 (pass ``bi_epochs``).
    ``evaluate(cycle)`` (optional) returns a dict with a ``"score"`` (e.g. dev Spearman) recorded per cycle; restore
    the best cycle's weights yourself if you save checkpoints per cycle.
    """
    bis = [bi_encoders] if isinstance(bi_encoders, BiEncoder) else list(bi_encoders)
    crosses = [cross_encoders] if isinstance(cross_encoders, CrossEncoder) else list(cross_encoders)
    if not bis or not crosses:
        raise ValueError("trans_encoder needs at least one bi-encoder and one cross-encoder")
    if target_map not in ("affine", "clamp"):
        raise ValueError(f"target_map must be 'affine' or 'clamp', got {target_map!r}")
    if len(pairs) < 2:
        raise ValueError("trans_encoder needs at least 2 unlabeled pairs")
    hist = TransEncoderHistory()
    for cycle in range(cycles):
        cos = torch.stack([bi_encoder_scores(b, pairs) for b in bis]).mean(0)
        y_cross = (1.0 + cos) / 2.0 if target_map == "affine" else cos.clamp(0.0, 1.0)
        hist.bi_labels.append(y_cross)
        for i, c in enumerate(crosses):
            train_cross_on_labels(
                c,
                pairs,
                y_cross,
                epochs=cross_epochs,
                batch_size=cross_batch_size,
                lr=cross_lr,
                seed=seed + 1000 * cycle + i,
            )
        y_bi = torch.stack([cross_encoder_scores(c, pairs) for c in crosses]).mean(0)
        hist.cross_labels.append(y_bi)
        for i, b in enumerate(bis):
            train_bi_on_labels(
                b, pairs, y_bi, epochs=bi_epochs, batch_size=bi_batch_size, lr=bi_lr, seed=seed + 1000 * cycle + 100 + i
            )
        if evaluate is not None:
            hist.scores.append(dict(evaluate(cycle)))
    return hist
