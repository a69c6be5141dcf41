"""Cross-tokenizer distillation losses: ALM chunk-likelihood matching and ULD sorted-probability L1.

Student and teacher read the same text through different tokenizers; ``kd_plugins.crosstok`` cuts it into chunks
(spans at whose ends both tokenizations end a token) and gives every token its chunk id. These losses consume that
alignment:

* :func:`target_token_logprobs` and :func:`chunk_logprobs`: the log-likelihood of each chunk under one model,
  ``log P(c_k) = sum_{i in c_k} log p(x_i | x_<i)`` (teacher-forced, the tokens actually in the text).
* :func:`alm_loss`: Approximate Likelihood Matching (Minixhofer, Vulić and Ponti, "Cross-Tokenizer Distillation via
  Approximate Likelihood Matching"). With ``a = log P_T(c_k) / tau - eps`` and ``b = log P_S(c_k) / tau - eps``
  (the chunk probabilities "binarised" into Bernoulli variables ``P ** (1 / tau)``):

  - ``form="binary_ce"`` (the paper's binarised objective, as its reference code computes it):
    ``l_k = -[e^a * b + (1 - e^a) * log(1 - e^b)]``. Not 0 when the likelihoods are equal (it is the teacher's
    binary entropy there: 0.0972687 for ``log P = -2``, ``tau = 100``), but its gradient is.
  - ``form="binary_kl"``: the same minus the teacher's binary entropy, ``l_k = KL(Bern(e^a) || Bern(e^b))``; 0 at
    equality, same gradient as ``binary_ce``.
  - ``form="abs"``: ``l_k = |log P_S(c_k) - log P_T(c_k)|`` (no ``tau``, no ``eps``).

* :func:`chunk_hidden_loss`: hidden-state matching at chunk ends (tokenkit's ``alm_latents``): where both
  tokenizations end a chunk, both models have read the same text, so their hidden states there are compared,
  ``l_k = mean_d (h_S[k, d] - h_T[k, d])^2 / m_d`` with ``m_d`` the teacher's mean square of channel ``d`` over the
  scored chunks (``normalize="channelwise"``; ``"none"``: ``m_d = 1``). For a student and teacher of the same width,
  e.g. a model moved to a new tokenizer and its original.
* :func:`uld_loss`: Universal Logit Distillation (Boizard et al.), the baseline of TRL's GOLD trainer: sort each
  next-token distribution in descending order, pad the smaller vocabulary with zeros, and take the L1 distance,
  ``l = sum_r |sort(p_S)_r - sort(p_T)_r|``, on rows whose contexts are the same text.

Reductions follow the rest of :mod:`kd_plugins.losses`: ``"mean"`` averages over valid chunks (rows) or divides by
``num_items_in_batch``; ``"sum"`` returns the sum, which the distillation engine divides by the number of label
tokens like the task loss; ``"none"`` returns the per-chunk values (0 where masked).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import compute_dtype, log1mexp, reduce_rows, rows, valid_mask
from .registry import register_loss

__all__ = [
    "ALM_FORMS",
    "HIDDEN_NORMALIZATIONS",
    "target_token_logprobs",
    "chunk_logprobs",
    "alm_loss",
    "chunk_hidden_loss",
    "uld_loss",
]

ALM_FORMS = ("binary_ce", "binary_kl", "abs")
HIDDEN_NORMALIZATIONS = ("channelwise", "none")


def target_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probability of each actual token under a causal LM: entry ``i`` is
    ``log softmax(logits[:, i - 1])[input_ids[:, i]]``; entry 0 (no context) is 0 and must be masked by the caller.
    Computed in float32 (float64 if given) without materialising the full log-softmax."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [B, T, V] over input_ids {tuple(input_ids.shape)} ([B, T])."
        )
    x = logits[:, :-1].to(compute_dtype(logits))
    target = input_ids[:, 1:].to(x.device).long().unsqueeze(-1)
    lp = x.gather(-1, target).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return F.pad(lp, (1, 0))


def chunk_logprobs(
    token_logprobs: torch.Tensor,
    chunk_ids: torch.Tensor,
    num_chunks: int | torch.Tensor,
    *,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk log-likelihoods ``log P(c_k) = sum_{i: chunk_ids[i] = k} token_logprobs[i]`` (a ``scatter_add``).

    Args:
        token_logprobs: ``[B, T]`` per-token log-probabilities (e.g. from :func:`target_token_logprobs`).
        chunk_ids: ``[B, T]`` chunk index of each token, ``-1`` for tokens outside every chunk.
        num_chunks: the chunk dimension ``C`` (an int), or ``[B]`` chunks per row (``C`` is their maximum).
        token_mask: ``[B, T]`` tokens whose log-probability is valid (a context exists, the label is not ignored).

    Returns:
        ``(chunk_logprobs [B, C], complete [B, C])``. A chunk is *complete* when it holds at least one token and every
        one of its tokens is valid; incomplete chunks hold the sum of their valid tokens and must be masked out.
    """
    if chunk_ids.shape != token_logprobs.shape:
        raise ValueError(f"chunk_ids {tuple(chunk_ids.shape)} and token_logprobs {tuple(token_logprobs.shape)} differ")
    per_row = torch.as_tensor(num_chunks, device=chunk_ids.device).long()
    if per_row.dim() == 0:
        width, per_row = int(per_row), None
    else:
        width = int(per_row.max()) if per_row.numel() else 0
    chunk_ids = chunk_ids.to(token_logprobs.device).long()
    if chunk_ids.numel() and int(chunk_ids.max()) >= width:
        raise ValueError(f"chunk_ids hold chunk {int(chunk_ids.max())} but num_chunks allows {width}")
    if width == 0:  # no chunk in any row (every row skipped): empty, still on the logits' graph
        return token_logprobs[:, :0], torch.zeros(
            token_logprobs.shape[0], 0, dtype=torch.bool, device=token_logprobs.device
        )
    inside = chunk_ids >= 0
    valid = inside if token_mask is None else inside & token_mask.to(inside.device).bool()
    index = chunk_ids.clamp(min=0)
    zeros = torch.zeros_like(token_logprobs)
    lp = torch.where(valid, token_logprobs, zeros)  # masked tokens neither add nor pass gradients
    out = token_logprobs.new_zeros(token_logprobs.shape[0], width).scatter_add(1, index, lp)
    n_all = inside.new_zeros(out.shape, dtype=torch.long).scatter_add(1, index, inside.long())
    n_valid = inside.new_zeros(out.shape, dtype=torch.long).scatter_add(1, index, valid.long())
    complete = (n_all > 0) & (n_valid == n_all)
    if per_row is not None:
        complete &= torch.arange(width, device=out.device) < per_row.to(out.device)[:, None]
    return out, complete


def _alm_terms(log_s: torch.Tensor, log_t: torch.Tensor, form: str, tau: float, epsilon: float) -> torch.Tensor:
    if form == "abs":
        return (log_s - log_t).abs()
    a = log_t / tau - epsilon
    b = log_s / tau - epsilon
    p_t = a.exp()
    ce = -(p_t * b + (1.0 - p_t) * log1mexp(b))
    if form == "binary_ce":
        return ce
    return ce + (p_t * a + (1.0 - p_t) * log1mexp(a))  # minus the teacher's binary entropy


def alm_loss(
    student_chunk_logprobs: torch.Tensor,
    teacher_chunk_logprobs: torch.Tensor,
    chunk_mask: torch.Tensor | None = None,
    *,
    form: str = "binary_ce",
    tau: float = 100.0,
    epsilon: float = 1e-6,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate Likelihood Matching between chunk log-likelihoods (see the module docstring for the forms).

    Args:
        student_chunk_logprobs, teacher_chunk_logprobs: ``[..., C]`` chunk log-likelihoods (clipped at 0, as sums
            of log-probabilities are). The teacher side is treated as a constant.
        chunk_mask: ``[..., C]`` chunks to score (complete on both sides).
        form: ``"binary_ce"`` (default, the paper's binarised form), ``"binary_kl"`` or ``"abs"``.
        tau: binarisation temperature (100 in the paper's experiments); ``epsilon`` keeps ``P ** (1/tau) < 1``.
        reduction, num_items_in_batch: see the module docstring.
    """
    if form not in ALM_FORMS:
        raise ValueError(f"alm_loss form must be one of {ALM_FORMS}, got {form!r}")
    if tau <= 0 or epsilon < 0:
        raise ValueError(f"alm_loss needs tau > 0 and epsilon >= 0, got tau={tau}, epsilon={epsilon}")
    if student_chunk_logprobs.shape != teacher_chunk_logprobs.shape:
        raise ValueError(
            f"student chunk log-probs {tuple(student_chunk_logprobs.shape)} and teacher chunk log-probs "
            f"{tuple(teacher_chunk_logprobs.shape)} must have the same shape (one entry per aligned chunk)."
        )
    dtype = compute_dtype(student_chunk_logprobs)
    valid = valid_mask(student_chunk_logprobs.shape, mask=chunk_mask, device=student_chunk_logprobs.device)
    log_s = student_chunk_logprobs.to(dtype)[valid].clamp(max=0.0)
    log_t = teacher_chunk_logprobs.detach().to(log_s.device, dtype)[valid].clamp(max=0.0)
    if not bool(torch.isfinite(log_t).all()):
        raise ValueError("teacher chunk log-probs are NaN/inf at unmasked chunks; mask incomplete chunks out.")
    return reduce_rows(
        _alm_terms(log_s, log_t, form, tau, epsilon), valid, reduction=reduction, num_items_in_batch=num_items_in_batch
    )


def chunk_hidden_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    chunk_mask: torch.Tensor | None = None,
    *,
    normalize: str = "channelwise",
    epsilon: float = 1e-6,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared distance between student and teacher hidden states at the last token of each aligned chunk.

    Args:
        student_hidden, teacher_hidden: ``[..., C, D]`` hidden states at each chunk's last token (same width ``D``;
            the teacher side is treated as a constant).
        chunk_mask: ``[..., C]`` chunks to score.
        normalize: ``"channelwise"`` (default, tokenkit's ``l2_channelwise``): each channel's squared error is
            divided by the teacher's mean square of that channel over the scored chunks (plus ``epsilon``), so
            every channel counts alike whatever its scale; ``"none"``: plain squared error.
        reduction, num_items_in_batch: as in :func:`alm_loss`; per chunk the mean over channels.

    0 when the hidden states are equal; with ``"channelwise"`` unchanged when one channel of both sides is scaled.
    """
    if normalize not in HIDDEN_NORMALIZATIONS:
        raise ValueError(f"chunk_hidden_loss normalize must be one of {HIDDEN_NORMALIZATIONS}, got {normalize!r}")
    if epsilon < 0:
        raise ValueError(f"chunk_hidden_loss needs epsilon >= 0, got {epsilon}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} must have the same shape ([..., chunks, width]); chunk hidden-state "
            "matching needs a student and teacher of the same hidden size."
        )
    valid = valid_mask(student_hidden.shape[:-1], mask=chunk_mask, device=student_hidden.device)
    dtype = compute_dtype(student_hidden)
    h_s = rows(student_hidden, valid).to(dtype)
    h_t = rows(teacher_hidden.detach(), valid).to(h_s.device, dtype)
    sq = (h_s - h_t).square()
    if normalize == "channelwise" and h_t.shape[0]:
        sq = sq / (h_t.square().mean(0) + epsilon)
    return reduce_rows(sq.mean(-1), valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """ULD: L1 distance between the descending-sorted next-token distributions of student and teacher.

    Args:
        student_logits: ``[..., V_S]`` rows; teacher_logits: ``[..., V_T]`` rows with the same leading shape (rows
            whose contexts are the same text; the vocabularies may differ, the smaller is zero-padded).
        mask: ``[...]`` rows to score.
        student_temperature, teacher_temperature: softmax temperatures of each side (TRL's GOLD defaults: 1).

    Invariant to permutations of either vocabulary and to adding a constant to a row's logits; 0 when both
    distributions are equal up to a permutation.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"uld_loss: student rows {tuple(student_logits.shape[:-1])} and teacher rows "
            f"{tuple(teacher_logits.shape[:-1])} differ; pass logits at aligned positions."
        )
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(f"uld_loss temperatures must be > 0, got {student_temperature}, {teacher_temperature}")
    valid = valid_mask(student_logits.shape[:-1], mask=mask, device=student_logits.device)
    dtype = compute_dtype(student_logits)
    p_s = torch.softmax(rows(student_logits, valid).to(dtype) / student_temperature, -1)
    p_t = torch.softmax(rows(teacher_logits.detach(), valid).to(p_s.device, dtype) / teacher_temperature, -1)
    p_s = p_s.sort(-1, descending=True).values
    p_t = p_t.sort(-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s, p_t = F.pad(p_s, (0, width - p_s.shape[-1])), F.pad(p_t, (0, width - p_t.shape[-1]))
    per_row = (p_s - p_t).abs().sum(-1)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


@register_loss("alm", kind="cross_tokenizer", function=alm_loss, aliases=("approximate_likelihood_matching",))
class ALMLoss(nn.Module):
    """ALM: chunk log-likelihood matching across tokenizers (binarised CE, binary KL or abs)."""

    def __init__(
        self, form: str = "binary_ce", tau: float = 100.0, epsilon: float = 1e-6, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if form not in ALM_FORMS:
            raise ValueError(f"ALMLoss form must be one of {ALM_FORMS}, got {form!r}")
        self.form, self.tau, self.epsilon, self.reduction = form, tau, epsilon, reduction

    def forward(self, student_chunk_logprobs, teacher_chunk_logprobs, *, mask=None, num_items_in_batch=None):
        return alm_loss(
            student_chunk_logprobs,
            teacher_chunk_logprobs,
            mask,
            form=self.form,
            tau=self.tau,
            epsilon=self.epsilon,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        return f"form={self.form!r}, tau={self.tau}, epsilon={self.epsilon}"


@register_loss("chunk_hidden", kind="cross_tokenizer", function=chunk_hidden_loss, aliases=("alm_latents",))
class ChunkHiddenLoss(nn.Module):
    """Hidden-state matching at the ends of aligned chunks (tokenkit's ``alm_latents``), channel-normalised."""

    def __init__(self, normalize: str = "channelwise", epsilon: float = 1e-6, reduction: str = "mean") -> None:
        super().__init__()
        if normalize not in HIDDEN_NORMALIZATIONS:
            raise ValueError(f"ChunkHiddenLoss normalize must be one of {HIDDEN_NORMALIZATIONS}, got {normalize!r}")
        self.normalize, self.epsilon, self.reduction = normalize, epsilon, reduction

    def forward(self, student_hidden, teacher_hidden, *, mask=None, num_items_in_batch=None):
        return chunk_hidden_loss(
            student_hidden,
            teacher_hidden,
            mask,
            normalize=self.normalize,
            epsilon=self.epsilon,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}, epsilon={self.epsilon}"


@register_loss("uld", kind="cross_tokenizer", function=uld_loss, aliases=("universal_logit_distillation",))
class ULDLoss(nn.Module):
    """ULD: L1 between sorted next-token distributions of different vocabularies."""

    def __init__(
        self, student_temperature: float = 1.0, teacher_temperature: float = 1.0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, *, mask=None, num_items_in_batch=None):
        return uld_loss(
            student_logits,
            teacher_logits,
            mask=mask,
            student_temperature=self.student_temperature,
            teacher_temperature=self.teacher_temperature,
            reduction=self.reduction,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        return f"student_temperature={self.student_temperature}, teacher_temperature={self.teacher_temperature}"
