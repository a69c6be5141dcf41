"""Retrieval distillation recipe: cross-encoder teacher -> bi-encoder student with a ranking-distillation loss.

Building blocks used by ``benchmarks/ranking/ranking_bbc.py`` (BBC News title -> body) and usable on any query/document
collection:

1. :func:`mine_candidates`: per query, the top-``k`` documents of a first-stage bi-encoder (optionally restricted
   to the query's topic = same-topic hard negatives, and optionally forcing the relevant document in at position 0).
2. :class:`CrossEncoder` + :func:`train_cross_encoder`: a cross-encoder teacher (``[CLS] query [SEP] doc``
   -> one logit) fine-tuned with listwise softmax cross-entropy over (positive + hard negatives) groups.
3. :func:`train_bi_encoder`: a bi-encoder student trained on the same groups with labels only (softmax CE of the
   positive over its group, in-group negatives) or labels + ``distill_weight`` * a registered ranking loss
   (``margin_mse``, ``ranknet``, ``pld``, ``cprd``, ``listnet``, ``lambdarank``, ``dear``...) against the teacher's
   scores of the group.
4. :func:`rerank_metrics`: MRR and nDCG@10 of a re-ranked candidate list with one relevant document per query.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import get_loss_function
from ..losses.feature import mean_pool

__all__ = [
    "RerankGroups",
    "mine_candidates",
    "CrossEncoder",
    "train_cross_encoder",
    "train_bi_encoder",
    "encode_texts",
    "rerank_metrics",
    "distill_loss_fn",
]


@dataclass
class RerankGroups:
    """``queries[i]`` with candidate document ids ``candidates[i]`` (``[Q, k]``); ``positive[i]`` is the column of the
    relevant document in that row, or -1 when it was not retrieved."""

    queries: list[str]
    candidates: torch.Tensor
    positive: torch.Tensor

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, idx: Sequence[int]) -> RerankGroups:
        idx = list(idx)
        return RerankGroups([self.queries[i] for i in idx], self.candidates[idx], self.positive[idx])


def mine_candidates(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    k: int,
    *,
    relevant: Sequence[int],
    queries: Sequence[str],
    query_topics: Sequence | None = None,
    doc_topics: Sequence | None = None,
    force_positive: bool = False,
) -> RerankGroups:
    """Top-``k`` documents per query by dot product (pass L2-normalised embeddings for cosine).

    ``relevant[i]`` is query ``i``'s relevant document id. With topics, only documents of the query's topic are
    candidates (same-topic hard negatives). ``force_positive=True`` (training groups) puts the relevant document at
    column 0 followed by the ``k-1`` highest-scoring other documents; otherwise the retrieved order is kept and
    ``positive`` records where (if at all) the relevant document landed.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    scores = query_emb.float() @ doc_emb.float().T
    if (query_topics is None) != (doc_topics is None):
        raise ValueError("pass both query_topics and doc_topics, or neither")
    if query_topics is not None:
        qt = {t: i for i, t in enumerate(sorted(set(query_topics) | set(doc_topics)))}
        qa = torch.tensor([qt[t] for t in query_topics])
        da = torch.tensor([qt[t] for t in doc_topics])
        scores = scores.masked_fill(qa[:, None] != da[None, :], float("-inf"))
    rel = torch.as_tensor(list(relevant), dtype=torch.long)
    rows = torch.arange(scores.shape[0])
    if force_positive:
        s = scores.clone()
        s[rows, rel] = float("-inf")
        neg = s.topk(k - 1, dim=-1).indices
        if bool(torch.isinf(s.gather(-1, neg)).any()):
            raise ValueError(f"some query has fewer than {k - 1} candidate negatives (topic too small?)")
        cand = torch.cat([rel[:, None], neg], -1)
        pos = torch.zeros(len(rel), dtype=torch.long)
    else:
        cand = scores.topk(k, dim=-1).indices
        hit = cand == rel[:, None]
        pos = torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(rel, -1))
    return RerankGroups(list(queries), cand, pos)


@torch.no_grad()
def encode_texts(
    model, tokenizer, texts: Sequence[str], *, max_length: int = 64, batch_size: int = 64, grad: bool = False
) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (``grad=True`` keeps the graph; use for small training batches)."""

    def run(chunk):
        b = tokenizer(list(chunk), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        b = {k: v.to(next(model.parameters()).device) for k, v in b.items() if k in ("input_ids", "attention_mask")}
        h = model(**b).last_hidden_state
        return F.normalize(mean_pool(h, b["attention_mask"]).float(), dim=-1)

    if grad:
        with torch.enable_grad():
            return run(texts)
    was = model.training
    model.eval()
    try:
        out = [run(texts[i : i + batch_size]).cpu() for i in range(0, len(texts), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out)


class CrossEncoder(nn.Module):
    """``AutoModelForSequenceClassification`` with one output: relevance logit of ``(query, document)`` pairs.

    ``freeze_layers`` keeps the embeddings and the lowest encoder layers fixed (cheaper CPU fine-tuning).
    """

    def __init__(self, model, tokenizer, *, max_length: int = 96, freeze_layers: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        if freeze_layers:
            from ..distill.inherit import find_layer_container

            _, layers = find_layer_container(model)
            base = getattr(model, model.base_model_prefix, model)
            for p in base.embeddings.parameters():
                p.requires_grad_(False)
            for layer in list(layers)[:freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        self.freeze_layers = freeze_layers

    @property
    def supports_cache(self) -> bool:
        """BERT-style models whose frozen lower layers can be run once and cached (:meth:`lower`/:meth:`upper`)."""
        base = getattr(self.model, "bert", None)
        return bool(self.freeze_layers) and base is not None and hasattr(self.model, "classifier")

    def _tokenize(self, queries, docs):
        b = self.tokenizer(
            list(queries),
            list(docs),
            padding=True,
            truncation="only_second",
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(next(self.model.parameters()).device) for k, v in b.items()}

    @staticmethod
    def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    @torch.no_grad()
    def lower(self, queries: Sequence[str], docs: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states after the frozen layers and the attention mask (cache them; they never change)."""
        b = self._tokenize(queries, docs)
        bert = self.model.bert
        h = bert.embeddings(input_ids=b["input_ids"], token_type_ids=b.get("token_type_ids"))
        ext = self._additive(b["attention_mask"], h.dtype)
        for layer in bert.encoder.layer[: self.freeze_layers]:
            h = layer(h, ext)
            h = h[0] if isinstance(h, tuple) else h
        return h, b["attention_mask"]

    def upper(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Relevance logits from cached :meth:`lower` states (trainable layers, pooler, classifier)."""
        bert = self.model.bert
        ext = self._additive(mask, hidden.dtype)
        h = hidden
        for layer in bert.encoder.layer[self.freeze_layers :]:
            h = layer(h, ext)
            h = h[0] if isinstance(h, tuple) else h
        pooled = bert.pooler(h) if bert.pooler is not None else h[:, 0]
        return self.model.classifier(self.model.dropout(pooled)).squeeze(-1).float()

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> CrossEncoder:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    def forward(self, queries: Sequence[str], docs: Sequence[str]) -> torch.Tensor:
        return self.model(**self._tokenize(queries, docs)).logits.squeeze(-1).float()

    @torch.no_grad()
    def score_groups(self, groups: RerankGroups, docs: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Teacher logits ``[Q, k]`` for every (query, candidate) of ``groups``."""
        was = self.training
        self.eval()
        q, d = [], []
        for i, query in enumerate(groups.queries):
            for j in groups.candidates[i].tolist():
                q.append(query)
                d.append(docs[j])
        try:
            out = torch.cat(
                [self(q[i : i + batch_size], d[i : i + batch_size]).cpu() for i in range(0, len(q), batch_size)]
            )
        finally:
            self.train(was)
        return out.reshape(groups.candidates.shape)


def _batches(n: int, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        yield order[:batch]
        order = order[batch:]


def _schedule(opt, steps: int, warmup: float = 0.1):
    w = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / w) * max(0.0, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )


def train_cross_encoder(
    cross: CrossEncoder,
    groups: RerankGroups,
    docs: Sequence[str],
    *,
    steps: int,
    batch_queries: int = 2,
    lr: float = 3e-5,
    seed: int = 0,
    log: Callable | None = None,
    return_scores: bool = False,
):
    """Listwise fine-tuning: softmax CE of the positive (column ``groups.positive``) over each candidate group.

    With frozen lower layers (``CrossEncoder(freeze_layers=n)``, BERT-style models) their outputs are computed once
    per pair and cached. Returns the per-step losses, or ``(losses, scores [Q, k])`` with ``return_scores`` (the
    trained teacher's logits on ``groups``, reusing the cache).
    """
    torch.manual_seed(seed)
    params = [p for p in cross.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _schedule(opt, steps)
    cross.train()
    losses = []
    k = groups.candidates.shape[1]
    cache = None
    if cross.supports_cache:  # frozen lower layers: run them once per (query, candidate) pair
        cache = []
        cross.eval()  # deterministic frozen features (no dropout noise baked into the cache)
        for i in range(len(groups)):
            h, m = cross.lower([groups.queries[i]] * k, [docs[j] for j in groups.candidates[i].tolist()])
            cache.append((h, m))
        cross.train()
    for step, idx in enumerate(_batches(len(groups), batch_queries, steps, seed)):
        if cache is not None:
            width = max(cache[i][0].shape[1] for i in idx)
            h = torch.cat([F.pad(cache[i][0], (0, 0, 0, width - cache[i][0].shape[1])) for i in idx])
            m = torch.cat([F.pad(cache[i][1], (0, width - cache[i][1].shape[1])) for i in idx])
            logits = cross.upper(h, m).reshape(len(idx), k)
        else:
            q = [groups.queries[i] for i in idx for _ in range(k)]
            d = [docs[j] for i in idx for j in groups.candidates[i].tolist()]
            logits = cross(q, d).reshape(len(idx), k)
        loss = F.cross_entropy(logits, groups.positive[idx].to(logits.device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
    cross.eval()
    if not return_scores:
        return losses
    if cache is None:
        return losses, cross.score_groups(groups, docs)
    with torch.no_grad():
        scores = torch.stack([cross.upper(h, m).cpu() for h, m in cache])
    return losses, scores


def distill_loss_fn(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(student_scores [B, k], teacher_scores [B, k], positive [B])`` for a registered ranking loss.

    ``cprd`` is applied to the hard negatives only (the positive's column removed), as in the paper;
    ``pld`` puts the positive first (``labels``); ``margin_mse``/``dear`` take it as ``positive_index``.
    """
    fn = get_loss_function(name)
    key = name.lower()

    def run(s, t, pos):
        if key in ("cprd",):
            keep = torch.ones_like(s, dtype=torch.bool)
            keep[torch.arange(s.shape[0]), pos] = False
            k = s.shape[1] - 1
            return fn(s[keep].reshape(-1, k), t[keep].reshape(-1, k), **kwargs)
        if key in ("pld", "plackett_luce"):
            return fn(s, t, labels=pos, **kwargs)
        if key in ("margin_mse", "marginmse", "dear", "dear_hybrid"):
            return fn(s, t, positive_index=pos, **kwargs)
        return fn(s, t, **kwargs)

    return run


def train_bi_encoder(
    student,
    tokenizer,
    groups: RerankGroups,
    docs: Sequence[str],
    *,
    steps: int,
    doc_emb: torch.Tensor | None = None,
    teacher_scores: torch.Tensor | None = None,
    distill: str | None = None,
    distill_weight: float = 1.0,
    distill_kwargs: dict | None = None,
    label_weight: float = 1.0,
    temperature: float = 0.05,
    batch_queries: int = 8,
    lr: float = 5e-5,
    max_length: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train a bi-encoder on candidate groups: ``label_weight * CE + distill_weight * distill(teacher)``.

    Student scores are ``cos(q, d) / temperature``. With ``doc_emb`` (precomputed, L2-normalised ``[N_docs, D]``)
    the document tower is frozen and only the query encoder is trained (asymmetric fine-tuning: the cheap CPU
    setting of the benchmark); without it documents are encoded by ``student`` with gradients (shared towers).
    """
    if distill is not None and teacher_scores is None:
        raise ValueError(f"distill={distill!r} needs teacher_scores for the groups")
    if teacher_scores is not None and teacher_scores.shape != groups.candidates.shape:
        raise ValueError(
            f"teacher_scores {tuple(teacher_scores.shape)} must match the groups {tuple(groups.candidates.shape)}"
        )
    loss_fn = distill_loss_fn(distill, **(distill_kwargs or {})) if distill else None
    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _schedule(opt, steps)
    student.train()
    k = groups.candidates.shape[1]
    losses = []
    for idx in _batches(len(groups), batch_queries, steps, seed):
        q = encode_texts(student, tokenizer, [groups.queries[i] for i in idx], max_length=max_length, grad=True)
        cand = groups.candidates[idx]
        if doc_emb is not None:
            d = doc_emb[cand.reshape(-1)].to(q.device)
        else:
            d = encode_texts(
                student, tokenizer, [docs[j] for j in cand.reshape(-1).tolist()], max_length=max_length, grad=True
            )
        s = (q.unsqueeze(1) * d.reshape(len(idx), k, -1)).sum(-1) / temperature
        pos = groups.positive[idx].to(s.device)
        loss = label_weight * F.cross_entropy(s, pos) if label_weight else s.new_zeros(())
        if loss_fn is not None:
            loss = loss + distill_weight * loss_fn(s, teacher_scores[idx].to(s.device, s.dtype), pos)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    student.eval()
    return losses


def rerank_metrics(scores: torch.Tensor, positive: torch.Tensor, k_ndcg: int = 10) -> dict[str, float]:
    """MRR (over the candidate list; 0 when the relevant document was not retrieved) and nDCG@``k_ndcg`` with one
    relevant document per query, after sorting each row of ``scores [Q, k]`` descending (ties pessimistic)."""
    if scores.dim() != 2 or positive.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [Q, k] and positive [Q]; got {tuple(scores.shape)}, {tuple(positive.shape)}")
    found = positive >= 0
    pos = positive.clamp_min(0)
    ps = scores.gather(-1, pos[:, None])
    above = (scores >= ps).sum(-1)  # includes the positive itself: rank = above (pessimistic ties)
    rank = above.double()
    mrr = torch.where(found, 1.0 / rank, torch.zeros_like(rank))
    ndcg = torch.where(found & (rank <= k_ndcg), 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))
    return {"mrr": mrr.mean().item(), f"ndcg@{k_ndcg}": ndcg.mean().item(), "n_queries": int(scores.shape[0])}
