"""Feature-level losses: hidden states (with learned projectors), pooled embeddings, attention maps.

Hidden-state losses compare ``[..., D]`` tensors row by row (a row is a token, or a sample for pooled
embeddings) and reduce over valid rows exactly like the logit losses. When student and teacher widths differ,
the module forms own a learned linear projector ``student_dim -> teacher_dim`` (FitNets); the functional forms take
an optional ``projector`` callable and refuse mismatched widths without one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import IGNORE_INDEX, compute_dtype, kl_rows, reduce_rows, rows, valid_mask
from .registry import register_loss

__all__ = [
    "hidden_mse",
    "hidden_cosine",
    "mean_pool",
    "embedding_mse",
    "embedding_cosine",
    "affinity_kl",
    "affinity_mse",
    "attention_kl",
    "attention_mse",
    "FeatureProjector",
]


def _project(student: torch.Tensor, teacher: torch.Tensor, projector) -> torch.Tensor:
    if projector is not None:
        student = projector(student)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"Feature widths differ: student {student.shape[-1]} vs teacher {teacher.shape[-1]}. Use a projector "
            "(the module forms create one with projector=True; DistillationConfig.feature_projector) or pick "
            "layers of equal width."
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"Feature shapes differ outside the channel dim: student {tuple(student.shape)} vs teacher "
            f"{tuple(teacher.shape)}; both models must see the same tokens (same tokenizer and sequence length)."
        )
    return student


def hidden_mse(
    student_hidden,
    teacher_hidden,
    *,
    mask=None,
    labels=None,
    projector=None,
    num_items_in_batch=None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    normalize: bool = False,
) -> torch.Tensor:
    """Mean squared error between (projected) hidden states, averaged over channels and valid rows.

    ``normalize=True`` L2-normalises both sides first (scale-free; equals ``2 * cosine distance / D``).
    """
    s = _project(student_hidden, teacher_hidden, projector)
    valid = valid_mask(s.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index, device=s.device)
    sr = rows(s, valid).to(compute_dtype(s))
    tr = rows(teacher_hidden, valid).to(sr.device, sr.dtype)
    if normalize:
        sr, tr = F.normalize(sr, dim=-1), F.normalize(tr, dim=-1)
    return reduce_rows((sr - tr).pow(2).mean(-1), valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def hidden_cosine(
    student_hidden,
    teacher_hidden,
    *,
    mask=None,
    labels=None,
    projector=None,
    num_items_in_batch=None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cosine distance ``1 - cos(s, t)`` per row, averaged over valid rows."""
    s = _project(student_hidden, teacher_hidden, projector)
    valid = valid_mask(s.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index, device=s.device)
    sr = rows(s, valid).to(compute_dtype(s))
    tr = rows(teacher_hidden, valid).to(sr.device, sr.dtype)
    return reduce_rows(
        1.0 - F.cosine_similarity(sr, tr, dim=-1, eps=1e-8),
        valid,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention-mask mean pooling ``[B, T, D] -> [B, D]`` (sentence-transformers' default pooling)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embedding_mse(
    student_emb,
    teacher_emb,
    *,
    projector=None,
    normalize: bool = False,
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE between pooled sentence embeddings ``[B, D]`` (per-sample rows)."""
    return hidden_mse(
        student_emb,
        teacher_emb,
        projector=projector,
        normalize=normalize,
        num_items_in_batch=num_items_in_batch,
        reduction=reduction,
    )


def embedding_cosine(
    student_emb, teacher_emb, *, projector=None, num_items_in_batch=None, reduction: str = "mean"
) -> torch.Tensor:
    """Cosine distance between pooled sentence embeddings ``[B, D]``."""
    return hidden_cosine(
        student_emb, teacher_emb, projector=projector, num_items_in_batch=num_items_in_batch, reduction=reduction
    )


def _similarity(e: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    e = F.normalize(e.to(compute_dtype(e)), dim=-1)
    o = e if other is None else F.normalize(other.to(e.dtype), dim=-1)
    return e @ o.T


def affinity_kl(
    student_emb,
    teacher_emb,
    *,
    temperature: float = 0.05,
    student_keys=None,
    teacher_keys=None,
    num_items_in_batch=None,
    reduction: str = "mean",
    t2_scale: bool = False,
) -> torch.Tensor:
    """In-batch affinity distillation: row-wise ``KL(softmax(S_T / tau) || softmax(S_S / tau))``.

    ``S = normalize(queries) @ normalize(keys).T``; keys default to the queries themselves (a ``B x B`` similarity
    matrix, TinyCLIP-style affinity mimicking) or pass ``student_keys``/``teacher_keys`` (e.g. document embeddings
    for query -> document affinities). Widths may differ between models (similarities are width-free).
    Not scaled by ``tau**2`` by default: Hinton's factor compensates the ``1/T`` gradient shrinkage of *high*
    temperatures, but contrastive temperatures are far below 1 (0.05 would scale the term by 0.0025 and make it
    negligible next to other terms). ``t2_scale=True`` restores the logit-KD convention. Needs at least two keys.
    """
    s = _similarity(student_emb, student_keys) / temperature
    t = _similarity(teacher_emb, teacher_keys).to(s.device) / temperature
    if s.shape != t.shape:
        raise ValueError(f"affinity matrices differ in shape: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if s.shape[-1] < 2:
        raise ValueError("affinity losses need at least 2 items per batch (the affinity matrix is B x B)")
    per_row = kl_rows(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    if t2_scale:
        per_row = per_row * temperature**2
    valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def affinity_mse(
    student_emb, teacher_emb, *, student_keys=None, teacher_keys=None, num_items_in_batch=None, reduction: str = "mean"
) -> torch.Tensor:
    """MSE between in-batch cosine-similarity matrices (relation / similarity-preserving KD)."""
    s = _similarity(student_emb, student_keys)
    t = _similarity(teacher_emb, teacher_keys).to(s.device)
    if s.shape != t.shape:
        raise ValueError(f"affinity matrices differ in shape: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    return reduce_rows((s - t).pow(2).mean(-1), valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def attention_kl(
    student_attn,
    teacher_attn,
    *,
    attention_mask=None,
    head_reduction: str = "error",
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Attention-map transfer (MiniLM): ``KL(A_T || A_S)`` per (sample, head, query) row.

    Attentions are probabilities ``[B, H, T, T]`` (HF ``output_attentions=True``, eager attention). Query rows
    at padded positions are skipped via ``attention_mask [B, T]``. When head counts differ,
    ``head_reduction="mean"`` averages heads on both sides first; the default raises.
    """
    student_attn, teacher_attn = _head_matched(student_attn, teacher_attn, head_reduction)
    b, h, tq, _ = student_attn.shape
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, :].expand(b, h, tq)
    valid = valid_mask((b, h, tq), mask=mask, device=student_attn.device)
    eps = 1e-12
    sa = rows(student_attn, valid).float().clamp_min(eps).log()
    ta = rows(teacher_attn, valid).to(sa.device, torch.float32).clamp_min(0)
    log_t = torch.where(ta > 0, ta.clamp_min(eps).log(), torch.full_like(ta, float("-inf")))
    return reduce_rows(kl_rows(log_t, sa), valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def _head_matched(student_attn: torch.Tensor, teacher_attn: torch.Tensor, head_reduction: str):
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention maps must be [batch, heads, query, key]")
    if student_attn.shape[1] != teacher_attn.shape[1]:
        if head_reduction != "mean":
            raise ValueError(
                f"student has {student_attn.shape[1]} attention heads, teacher {teacher_attn.shape[1]}; pass "
                "head_reduction='mean' to compare head-averaged maps."
            )
        student_attn, teacher_attn = student_attn.mean(1, keepdim=True), teacher_attn.mean(1, keepdim=True)
    if student_attn.shape[2:] != teacher_attn.shape[2:]:
        raise ValueError(f"attention maps differ in length: {tuple(student_attn.shape)} vs {tuple(teacher_attn.shape)}")
    return student_attn, teacher_attn


def attention_mse(
    student_attn,
    teacher_attn,
    *,
    attention_mask=None,
    head_reduction: str = "error",
    reduction: str = "mean",
) -> torch.Tensor:
    """Attention-map MSE (TinyBERT, BiStil): mean of ``(A_S - A_T)^2`` over the entries whose query *and* key are
    real tokens.

    Attentions are probabilities ``[B, H, T, T]`` (HF ``output_attentions=True``). BiStil's reference code takes
    the MSE over non-padded entries; we read that as both the query row and the key column unpadded (padded keys
    hold zero probability on both sides anyway, so only the divisor changes). ``reduction="sum"`` returns the sum of
    squared differences over those entries; ``"none"`` the per-(sample, head, query) mean over valid keys, zero at
    padded queries.
    """
    student_attn, teacher_attn = _head_matched(student_attn, teacher_attn, head_reduction)
    b, h, tq, tk = student_attn.shape
    dt = compute_dtype(student_attn)
    sq = (student_attn.to(dt) - teacher_attn.to(student_attn.device, dt)).pow(2)
    if attention_mask is None:
        keep = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=sq.device)
    else:
        m = attention_mask.to(sq.device).bool()
        if m.shape != (b, tk) or tq != tk:
            raise ValueError(
                f"attention_mask has shape {tuple(m.shape)} but the maps are {tuple(sq.shape)}; pass the [batch, "
                "tokens] mask of the text both models saw."
            )
        keep = (m[:, :, None] & m[:, None, :])[:, None]
    sq = sq * keep
    if reduction == "none":
        return sq.sum(-1) / keep.sum(-1).clamp_min(1)
    if reduction == "sum":
        return sq.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return sq.sum() / (keep.sum() * h).clamp_min(1)


class FeatureProjector(nn.Module):
    """Learned linear map ``student_dim -> teacher_dim`` for feature distillation (FitNets regressor).

    Initialised orthogonally-ish (``nn.Linear`` default would also do); a plain ``Linear`` keeps it cheap and
    state-dict friendly (saved beside checkpoints, never inside the student).
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        nn.init.orthogonal_(self.proj.weight)
        if bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


class _ProjectedFeatureLoss(nn.Module):
    _fn = None

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        projector: bool = True,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        **kwargs,
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.kwargs = ignore_index, reduction, kwargs
        self.projector = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            if not projector:
                raise ValueError(
                    f"Feature widths differ (student {student_dim}, teacher {teacher_dim}) and projector=False; "
                    "enable the learned projector or choose layers of equal width."
                )
            self.projector = FeatureProjector(student_dim, teacher_dim)

    def forward(self, student_hidden, teacher_hidden, *, mask=None, labels=None, num_items_in_batch=None):
        return type(self)._fn(
            student_hidden,
            teacher_hidden,
            mask=mask,
            labels=labels,
            projector=self.projector,
            num_items_in_batch=num_items_in_batch,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            **self.kwargs,
        )


@register_loss("hidden_mse", kind="hidden", function=hidden_mse, aliases=("feature_mse", "fitnet"))
class HiddenStateMSELoss(_ProjectedFeatureLoss):
    """MSE between hidden states, with a learned projector when widths differ."""

    _fn = staticmethod(hidden_mse)


@register_loss("hidden_cosine", kind="hidden", function=hidden_cosine, aliases=("feature_cosine",))
class HiddenStateCosineLoss(_ProjectedFeatureLoss):
    """Cosine distance between hidden states, with a learned projector when widths differ."""

    _fn = staticmethod(hidden_cosine)


class _EmbeddingLoss(nn.Module):
    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        projector: bool = True,
        reduction: str = "mean",
        **kwargs,
    ):
        super().__init__()
        self.reduction, self.kwargs = reduction, kwargs
        self.projector = None
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim and self.needs_width:
            if not projector:
                raise ValueError(
                    f"Embedding widths differ (student {student_dim}, teacher {teacher_dim}) and "
                    "projector=False; enable the projector or use an affinity loss (width-free)."
                )
            self.projector = FeatureProjector(student_dim, teacher_dim)

    needs_width = True


@register_loss("embedding_mse", kind="embedding", function=embedding_mse)
class EmbeddingMSELoss(_EmbeddingLoss):
    """MSE between pooled sentence embeddings (optionally L2-normalised first)."""

    def forward(self, student_emb, teacher_emb, *, num_items_in_batch=None, **_):
        return embedding_mse(
            student_emb,
            teacher_emb,
            projector=self.projector,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )


@register_loss("embedding_cosine", kind="embedding", function=embedding_cosine)
class EmbeddingCosineLoss(_EmbeddingLoss):
    """Cosine distance between pooled sentence embeddings."""

    def forward(self, student_emb, teacher_emb, *, num_items_in_batch=None, **_):
        return embedding_cosine(
            student_emb,
            teacher_emb,
            projector=self.projector,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )


@register_loss("affinity_kl", kind="embedding", function=affinity_kl, aliases=("affinity", "similarity_kl"))
class AffinityKLLoss(_EmbeddingLoss):
    """KL between in-batch similarity distributions (width-free relational KD)."""

    needs_width = False

    def forward(self, student_emb, teacher_emb, *, num_items_in_batch=None, student_keys=None, teacher_keys=None, **_):
        return affinity_kl(
            student_emb,
            teacher_emb,
            student_keys=student_keys,
            teacher_keys=teacher_keys,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )


@register_loss("affinity_mse", kind="embedding", function=affinity_mse, aliases=("similarity_mse",))
class AffinityMSELoss(_EmbeddingLoss):
    """MSE between in-batch cosine-similarity matrices (width-free relational KD)."""

    needs_width = False

    def forward(self, student_emb, teacher_emb, *, num_items_in_batch=None, student_keys=None, teacher_keys=None, **_):
        return affinity_mse(
            student_emb,
            teacher_emb,
            student_keys=student_keys,
            teacher_keys=teacher_keys,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
            **self.kwargs,
        )


@register_loss("attention_kl", kind="attention", function=attention_kl, aliases=("attention", "attention_transfer"))
class AttentionKLLoss(nn.Module):
    """Attention-map transfer: KL between teacher and student attention distributions."""

    def __init__(self, head_reduction: str = "error", reduction: str = "mean"):
        super().__init__()
        self.head_reduction, self.reduction = head_reduction, reduction

    def forward(self, student_attn, teacher_attn, *, attention_mask=None, num_items_in_batch=None, **_):
        return attention_kl(
            student_attn,
            teacher_attn,
            attention_mask=attention_mask,
            head_reduction=self.head_reduction,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
        )


@register_loss("attention_mse", kind="attention", function=attention_mse, aliases=("tinybert_attention",))
class AttentionMSELoss(nn.Module):
    """Attention-map MSE over unpadded (query, key) entries (TinyBERT / BiStil)."""

    def __init__(self, head_reduction: str = "error", reduction: str = "mean"):
        super().__init__()
        self.head_reduction, self.reduction = head_reduction, reduction

    def forward(self, student_attn, teacher_attn, *, attention_mask=None, **_):
        return attention_mse(
            student_attn,
            teacher_attn,
            attention_mask=attention_mask,
            head_reduction=self.head_reduction,
            reduction=self.reduction,
        )
