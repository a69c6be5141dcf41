"""Masking, reduction and sparse-teacher helpers shared by every loss."""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100

#: Per-row reductions understood by every loss.
REDUCTIONS = ("mean", "sum", "none")

#: Sparse-teacher tail forms of :func:`log_prob_pair` ("symmetric" is DistillKit's name for "bucket").
TOPK_TAILS = ("bucket", "renormalize", "zero", "symmetric")


def valid_mask(
    prefix_shape: torch.Size,
    *,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean mask over rows (all dims but the last): ``labels != ignore_index`` AND ``mask``.

    Raises a ``ValueError`` naming both shapes when ``labels``/``mask`` do not match the rows.
    """
    valid = torch.ones(prefix_shape, dtype=torch.bool, device=device)
    for name, m in (("labels", labels), ("mask", mask)):
        if m is None:
            continue
        if tuple(m.shape) != tuple(prefix_shape):
            raise ValueError(
                f"{name} has shape {tuple(m.shape)} but the inputs have rows of shape {tuple(prefix_shape)}; "
                f"pass one {name} entry per position (for causal LMs, shift labels by one first)."
            )
        m = m.to(device)
        valid &= (m != ignore_index) if name == "labels" else m.bool()
    return valid


def reduce_rows(
    per_row: torch.Tensor,
    valid: torch.Tensor,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-valid-row values.

    ``per_row`` holds one value per *valid* row (``valid.sum()`` entries). ``"mean"`` divides by
    ``num_items_in_batch`` when given (gradient-accumulation-correct: the count over the whole accumulated batch),
    otherwise by the number of valid rows here. ``"none"`` returns a tensor shaped like ``valid`` with zeros at
    ignored positions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        out = per_row.new_zeros(valid.numel())
        out[valid.reshape(-1)] = per_row
        return out.reshape(valid.shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device, total.dtype)
        return total / num_items_in_batch
    return total / max(per_row.numel(), 1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Losses compute in float32, or float64 when given float64 (for golden-value tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Flatten ``x`` to ``[rows, last_dim]`` and keep the valid rows."""
    return x.reshape(-1, x.shape[-1])[valid.reshape(-1).to(x.device)]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, numerically stable (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_topk(
    teacher_topk, vocab_size: int, n_rows_shape: torch.Size, name: str = "teacher_topk"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a sparse teacher signal ``(indices, log_probs)`` of shape ``[..., K]`` each (``name``: the argument
    the errors name)."""
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
        raise TypeError(f"{name} must be a pair (indices, log_probs), each of shape [..., K]")
    idx, lp = teacher_topk
    if idx.shape != lp.shape:
        raise ValueError(f"{name} indices {tuple(idx.shape)} and log_probs {tuple(lp.shape)} differ in shape")
    if tuple(idx.shape[:-1]) != tuple(n_rows_shape):
        raise ValueError(f"{name} has rows {tuple(idx.shape[:-1])} but student logits have rows {tuple(n_rows_shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise ValueError(
            f"{name} indices must lie in [0, {vocab_size}) (the student's vocabulary); got range "
            f"[{int(idx.min())}, {int(idx.max())}]. Align the vocabularies first "
            "(see DistillationConfig.vocab_alignment)."
        )
    if lp.numel() and float(torch.logsumexp(lp.float(), dim=-1).max()) > 1e-3:
        raise ValueError(
            f"{name} log_probs sum to more than 1 on some rows: they must be log-probabilities normalised over "
            "the teacher's full vocabulary (e.g. log_softmax(logits).topk(k)), not raw logits."
        )
    return idx, lp


def log_prob_pair(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_tail: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(log_p_teacher, log_q_student)`` over a common support, in float32 (or float64 if given).

    Dense teacher: both are ``log_softmax(logits / T)`` over the vocabulary.

    Sparse teacher ``teacher_topk = (indices, log_probs)`` (log-probs normalised over the full vocabulary, already at
    the loss temperature): the support is the K teacher tokens plus, with ``topk_tail="bucket"``, one extra bucket
    holding the remaining mass (teacher: ``1 - sum p_k``; student: ``1 - sum q_k``). The divergence of these
    coarsened distributions is a lower bound of the full one (data-processing inequality) and equals it when the
    top-k covers the whole vocabulary. ``topk_tail="renormalize"`` instead renormalises both over the K tokens.

    DistillKit's two sparse forms (``MissingProbabilityHandling``):

    * ``topk_tail="symmetric"`` (``SYMMETRIC_UNIFORM``: the missing mass of both sides spread uniformly over the
      ``V - K`` missing tokens) is ``"bucket"``: for a divergence ``sum_i q_i f(p_i / q_i)`` (KL, reverse KL, JSD,
      skew KL, TVD) spreading both tails uniformly over ``m`` tokens gives ``m (q_t / m) f(p_t / q_t)``, the bucket's
      own term. It is accepted as a name for ``"bucket"``. (Soft cross-entropy would differ by the constant
      ``p_t log(V - K)``, which has no gradient.)
    * ``topk_tail="zero"`` (``ZERO``): the teacher is renormalised over its K tokens and has no mass elsewhere; the
      student keeps its full-vocabulary log-probs on the K tokens plus one bucket with its remaining mass
      ``1 - sum q_k``. The divergence is then exactly ``D(p_renormalised || q)`` over the whole vocabulary (e.g. KL
      ``= sum_k p~_k (log p~_k - log q_k)``; JSD and TVD count the student's tail mass), and the student is pushed
      to put all its mass on the teacher's K tokens. Reverse KL (and skew reverse KL at ``lambda = 0``) are infinite
      under it whenever the student has any tail mass: use ``"bucket"`` with them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    if teacher_topk is None:
        if teacher_logits is None:
            raise ValueError("Pass teacher_logits or teacher_topk")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "differ in shape; align vocabularies (DistillationConfig.vocab_alignment) or check the inputs."
            )
        log_p = torch.log_softmax(teacher_logits.to(log_q.device, dtype) / temperature, dim=-1)
        return log_p, log_q
    idx, lp = teacher_topk
    idx = idx.to(log_q.device)
    lp = lp.to(log_q.device, dtype)
    log_q_k = log_q.gather(-1, idx)
    if topk_tail in ("bucket", "symmetric"):
        p_tail = log1mexp(torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=-1e-7))
        q_tail = log1mexp(torch.logsumexp(log_q_k, dim=-1, keepdim=True).clamp(max=-1e-7))
        return torch.cat([lp, p_tail], -1), torch.cat([log_q_k, q_tail], -1)
    if topk_tail == "renormalize":
        return lp - torch.logsumexp(lp, -1, keepdim=True), log_q_k - torch.logsumexp(log_q_k, -1, keepdim=True)
    if topk_tail == "zero":
        q_tail = log1mexp(torch.logsumexp(log_q_k, dim=-1, keepdim=True).clamp(max=-1e-7))
        p_tail = torch.full_like(q_tail, float("-inf"))  # no teacher mass outside the K tokens
        return torch.cat([lp - torch.logsumexp(lp, -1, keepdim=True), p_tail], -1), torch.cat([log_q_k, q_tail], -1)
    raise ValueError(f"topk_tail must be one of {TOPK_TAILS}, got {topk_tail!r}")


def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``KL(a || b) = sum a (log a - log b)`` with ``0 log 0 = 0`` and NaN-free gradients."""
    a = log_a.exp()
    pos = a != 0  # NaNs stay in (and are reported upstream) instead of being masked away
    safe_a = torch.where(pos, log_a, torch.zeros_like(log_a))
    safe_b = torch.where(pos, log_b, torch.zeros_like(log_b))
    return torch.where(pos, a * (safe_a - safe_b), torch.zeros_like(a)).sum(-1)


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` for probabilities given as logs, exact at ``w`` in {0, 1}."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logsumexp(torch.stack([log_a + math.log(w), log_b + math.log1p(-w)]), dim=0)


def _pair_rows(student_logits, teacher_logits, labels, mask, ignore_index):
    """Check that student and teacher logits match, and return their valid rows ``(s, t, valid)`` in compute dtype.

    Shared by the losses that need the dense rows of both sides (Sinkhorn, DAC-KL); raises on a shape mismatch or a
    non-finite teacher value at a valid row.
    """
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(getattr(teacher_logits, 'shape', ()))} must have the same shape (same rows and vocabulary)."
        )
    valid = valid_mask(
        student_logits.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index, device=student_logits.device
    )
    dtype = compute_dtype(student_logits)
    s = rows(student_logits, valid).to(dtype)
    t = rows(teacher_logits, valid).to(s.device, dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("teacher logits contain NaN/inf at valid rows; fix the teacher or mask those rows out.")
    return s, t, valid
