"""Ranking / retrieval distillation losses (reference PyTorch implementations).

Calling convention shared by every loss here::

    loss(student_scores, teacher_scores, *, mask=None, reduction="mean", num_items_in_batch=None, **hyper_parameters)

* ``student_scores`` / ``teacher_scores``: ``[queries, candidates]`` relevance scores (a 1-D tensor is one query).
  A Python list of per-query 1-D score lists is accepted too; lists of unequal length need ``mask`` (or use
  :func:`pad_candidates`, which returns the padded tensor and its mask).
* ``mask`` (``[queries, candidates]``, bool): real candidates. Padded candidates never enter a pair, a softmax or a
  suffix sum.
* Per-query losses are averaged over the queries that have at least two real candidates (``reduction="mean"``;
  ``num_items_in_batch`` overrides the divisor for gradient accumulation), summed (``"sum"``) or returned per query
  (``"none"``; 0 for skipped queries).
* Teacher scores must be finite on real candidates (a NaN/inf raises a ``ValueError`` naming the query).
* Inputs in float64 are computed in float64 (golden-value tests), everything else in float32.

Definitions, golden values and repo-vs-paper notes: ``docs/losses.md`` (Ranking losses: FIRST, PLD, CPRD,
Margin-MSE, DeAR).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import IGNORE_INDEX, compute_dtype, reduce_rows
from .registry import register_loss

__all__ = [
    "pad_candidates",
    "ranks_from_scores",
    "ranks_from_order",
    "first_ranknet_loss",
    "first_joint_loss",
    "margin_mse_loss",
    "ranknet_loss",
    "lambdarank_loss",
    "listnet_loss",
    "plackett_luce_loss",
    "cprd_loss",
    "dear_loss",
]

_NEG = -1e4  # added (relative to the row minimum) to padded scores so they vanish from every exp-sum


# --------------------------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------------------------


def pad_candidates(
    lists: Sequence, pad_value: float = 0.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-query candidate score lists of unequal length to ``([Q, n_max], mask [Q, n_max])``."""
    items = [torch.as_tensor(v, dtype=dtype).reshape(-1) for v in lists]
    if not items:
        raise ValueError("pad_candidates() needs at least one candidate list")
    n = max(v.numel() for v in items)
    out = torch.full((len(items), n), pad_value, dtype=items[0].dtype if dtype is None else dtype)
    mask = torch.zeros((len(items), n), dtype=torch.bool)
    for i, v in enumerate(items):
        out[i, : v.numel()] = v
        mask[i, : v.numel()] = True
    return out, mask


def _as_matrix(x, name: str, mask) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        items = [torch.as_tensor(v).reshape(-1) for v in x]
        lengths = sorted({v.numel() for v in items})
        if len(lengths) > 1:
            if mask is None:
                raise ValueError(
                    f"{name}: candidate lists have unequal lengths {lengths}; pad them to one "
                    "[queries, max_candidates] tensor and pass mask= marking the real candidates "
                    "(kd_plugins.losses.ranking.pad_candidates returns both)."
                )
            x, _ = pad_candidates(items)
        else:
            x = torch.stack(items) if items else torch.zeros(0, 0)
    if not torch.is_tensor(x):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [queries, candidates] (or one 1-D list), got shape {tuple(x.shape)}")
    return x


def _check_finite(t: torch.Tensor, m: torch.Tensor, name: str = "teacher_scores") -> None:
    bad = ~torch.isfinite(t) & m
    if bool(bad.any()):
        q = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} contain NaN/inf at real candidates (first at query {q}); fix the teacher scores or mask those "
            "candidates out with mask=."
        )


def _prepare(student, teacher, mask, *, need_teacher: bool = True):
    """-> (s, t, m) as [Q, n] tensors in the compute dtype, mask bool; validates shapes and teacher finiteness."""
    s = _as_matrix(student, "student_scores", mask)
    dtype = compute_dtype(s)
    s = s.to(dtype)
    t = None
    if teacher is not None:
        t = _as_matrix(teacher, "teacher_scores", mask).to(s.device, dtype)
        if t.shape != s.shape:
            raise ValueError(
                f"student_scores {tuple(s.shape)} and teacher_scores {tuple(t.shape)} differ in shape: both models "
                "must score the same candidates of the same queries."
            )
    elif need_teacher:
        raise ValueError("this loss needs teacher_scores")
    if mask is None:
        m = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    else:
        m = _as_matrix(mask, "mask", None).to(s.device).bool()
        if m.shape != s.shape:
            raise ValueError(f"mask has shape {tuple(m.shape)} but the scores are {tuple(s.shape)}")
    if t is not None:
        _check_finite(t, m)
    return s, t, m


def _reduce(per_query: torch.Tensor, keep: torch.Tensor, reduction: str, num_items_in_batch) -> torch.Tensor:
    return reduce_rows(per_query[keep], keep, reduction=reduction, num_items_in_batch=num_items_in_batch)


def _fill(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Replace padded entries by a finite value far below the row's real scores (exp -> 0, no NaN gradients)."""
    if bool(m.all()):
        return x
    lo = torch.where(m, x.detach(), torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    return torch.where(m, x, lo + _NEG)


def _masked_log_softmax(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_fill(x, m), dim=-1)


def _pair_mask(m: torch.Tensor) -> torch.Tensor:
    return m.unsqueeze(-1) & m.unsqueeze(-2)


def ranks_from_scores(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1-based descending ranks among the real candidates of each row (ties: lower index first; padding: 0)."""
    s = _as_matrix(scores, "scores", mask)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else _as_matrix(mask, "mask", None).bool()
    key = torch.where(m, s.double(), torch.full_like(s, float("-inf"), dtype=torch.float64))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, s.shape[-1] + 1).expand_as(order).contiguous())
    return torch.where(m, ranks, torch.zeros_like(ranks))


def ranks_from_order(
    order: Sequence[Sequence[int]] | torch.Tensor, num_candidates: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target permutations (best candidate index first) -> ``(ranks [Q, n] 1-based, mask)``.

    Candidates absent from a (partial) order get rank 0 and mask False.
    """
    rows = [list(map(int, o)) for o in (order.tolist() if torch.is_tensor(order) else order)]
    if rows and not isinstance(rows[0], list):
        rows = [rows]  # type: ignore[list-item]
    n = num_candidates if num_candidates is not None else max((max(r) + 1 for r in rows if r), default=0)
    ranks = torch.zeros((len(rows), n), dtype=torch.long)
    for q, r in enumerate(rows):
        if len(set(r)) != len(r) or any(not 0 <= i < n for i in r):
            raise ValueError(f"order {r} of query {q} must list distinct candidate indices in [0, {n})")
        for pos, i in enumerate(r):
            ranks[q, i] = pos + 1
    return ranks, ranks > 0


# --------------------------------------------------------------------------------------------------------------------
# FIRST
# --------------------------------------------------------------------------------------------------------------------


def first_ranknet_loss(
    scores, target_ranks, *, mask=None, weighted: bool = True, reduction: str = "mean", num_items_in_batch=None
) -> torch.Tensor:
    """FIRST's weighted RankNet (Reddy et al. 2024): ``mean_{r_i < r_j} log(1 + exp(-(z_i - z_j))) / (r_i + r_j)``.

    ``scores`` are the identifier logits ``z`` of the first generated token (see
    :func:`kd_plugins.ranking.first_scores`), ``target_ranks`` the 1-based ranks of the target permutation (from
    :func:`ranks_from_order` or :func:`ranks_from_scores` on teacher scores). Only the *order* of the target is used.
    Normalisation follows the repo (``BCEWithLogits(weight=w)``, mean reduction): the per-query sum is divided by the
    number of ordered pairs, not by the sum of the weights. ``weighted=False`` gives plain RankNet on the target order.
    """
    z, _, m = _prepare(scores, None, mask, need_teacher=False)
    r = _as_matrix(target_ranks, "target_ranks", mask).to(z.device)
    if r.shape != z.shape:
        raise ValueError(f"target_ranks {tuple(r.shape)} must match scores {tuple(z.shape)}")
    _check_finite(r.to(z.dtype), m, "target_ranks")
    r = r.to(z.dtype)
    if bool(((r < 1) & m).any()):
        raise ValueError("target_ranks must be 1-based (>= 1) at real candidates; use ranks_from_order()")
    pairs = _pair_mask(m) & (r.unsqueeze(-1) < r.unsqueeze(-2))
    diff = z.unsqueeze(-1) - z.unsqueeze(-2)
    w = 1.0 / (r.unsqueeze(-1) + r.unsqueeze(-2)).clamp_min(1.0) if weighted else torch.ones_like(diff)
    per_pair = torch.where(pairs, w * F.softplus(-diff), torch.zeros_like(diff))
    n_pairs = pairs.sum((-1, -2))
    keep = n_pairs > 0
    per_query = per_pair.sum((-1, -2)) / n_pairs.clamp_min(1)
    return _reduce(per_query, keep, reduction, num_items_in_batch)


def first_joint_loss(
    lm_logits,
    lm_labels,
    rank_scores,
    target_ranks,
    *,
    rank_weight: float = 10.0,
    mask=None,
    weighted: bool = True,
    ignore_index: int = IGNORE_INDEX,
    return_parts: bool = False,
):
    """FIRST's joint objective ``L_LM + rank_weight * L_Rank``.

    ``lm_logits [B, T, V]`` and ``lm_labels [B, T]`` must already be aligned (logits at position ``t`` predict
    label ``t``; prompt tokens carry ``ignore_index``); ``L_LM`` is their token cross-entropy averaged over
    supervised tokens (label smoothing 0). ``L_Rank`` is :func:`first_ranknet_loss` on ``rank_scores [B, m]``.
    ``rank_weight=10`` is the repo's value for weighted RankNet (``train_ranking.py``). With ``return_parts`` returns
    ``(total, lm, rank)``.
    """
    if lm_logits.shape[:-1] != lm_labels.shape:
        raise ValueError(
            f"lm_logits {tuple(lm_logits.shape)} and lm_labels {tuple(lm_labels.shape)} are not aligned; "
            "shift them first (logits[:, :-1] with labels[:, 1:])."
        )
    dtype = compute_dtype(lm_logits)
    lm = F.cross_entropy(
        lm_logits.reshape(-1, lm_logits.shape[-1]).to(dtype),
        lm_labels.reshape(-1).to(lm_logits.device),
        ignore_index=ignore_index,
    )
    rank = first_ranknet_loss(rank_scores, target_ranks, mask=mask, weighted=weighted)
    total = lm + rank_weight * rank.to(lm.device, lm.dtype)
    return (total, lm, rank) if return_parts else total


# --------------------------------------------------------------------------------------------------------------------
# Margin-MSE, RankNet, LambdaRank, ListNet
# --------------------------------------------------------------------------------------------------------------------


def _positive_index(positive_index, q: int, device) -> torch.Tensor:
    pos = torch.as_tensor(positive_index, device=device, dtype=torch.long)
    if pos.dim() == 0:
        pos = pos.expand(q)
    if pos.shape != (q,):
        raise ValueError(f"positive_index must be an int or a [queries] tensor, got shape {tuple(pos.shape)}")
    return pos


def margin_mse_loss(
    student_scores, teacher_scores, *, positive_index=0, mask=None, reduction: str = "mean", num_items_in_batch=None
) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al. 2020): ``[(s_pos - s_neg) - (t_pos - t_neg)]^2``.

    Scores are ``[queries, 1 + negatives]`` with the positive at ``positive_index`` (default 0, so a triplet is a
    2-column input ``[[s_pos, s_neg]]``). Several negatives per query: the squared margin errors are averaged over
    the query's real negatives, then over queries. Only margins are matched, so a per-query offset (or the
    different score scales of a cross-encoder teacher and a dot-product student) does not matter.
    """
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    pos = _positive_index(positive_index, s.shape[0], s.device)
    rows = torch.arange(s.shape[0], device=s.device)
    if not bool(m[rows, pos].all()):
        raise ValueError("the positive candidate of every query must be a real (unmasked) candidate")
    neg = m.clone()
    neg[rows, pos] = False
    err = ((s[rows, pos].unsqueeze(-1) - s) - (t[rows, pos].unsqueeze(-1) - t)).pow(2)
    n_neg = neg.sum(-1)
    per_query = torch.where(neg, err, torch.zeros_like(err)).sum(-1) / n_neg.clamp_min(1)
    return _reduce(per_query, n_neg > 0, reduction, num_items_in_batch)


def ranknet_loss(
    student_scores,
    teacher_scores,
    *,
    mask=None,
    target: str = "soft",
    sigma: float = 1.0,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """RankNet distillation over all candidate pairs of a query.

    ``target="soft"`` (default; DeAR's ``ranknet_teacher``): BCE-with-logits of ``sigma * (s_i - s_j)`` against
    ``sigmoid((t_i - t_j) / teacher_temperature)`` over the unordered pairs ``i < j``; minimised at
    ``sigma * (s_i - s_j) = (t_i - t_j) / teacher_temperature``. ``target="binary"``: classic RankNet on the teacher
    order, ``log(1 + exp(-sigma * (s_i - s_j)))`` for every pair with ``t_i > t_j`` (teacher ties give no pair).
    Mean over pairs per query.
    """
    if target not in ("soft", "binary"):
        raise ValueError(f"target must be 'soft' or 'binary', got {target!r}")
    if teacher_temperature <= 0 or sigma <= 0:
        raise ValueError("sigma and teacher_temperature must be > 0")
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    ds = sigma * (s.unsqueeze(-1) - s.unsqueeze(-2))
    dt = t.unsqueeze(-1) - t.unsqueeze(-2)
    pm = _pair_mask(m)
    if target == "soft":
        pairs = pm & torch.ones_like(pm).triu(1)
        per_pair = F.binary_cross_entropy_with_logits(ds, torch.sigmoid(dt / teacher_temperature), reduction="none")
    else:
        pairs = pm & (dt > 0)
        per_pair = F.softplus(-ds)
    n_pairs = pairs.sum((-1, -2))
    per_query = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((-1, -2)) / n_pairs.clamp_min(1)
    return _reduce(per_query, n_pairs > 0, reduction, num_items_in_batch)


def lambdarank_loss(
    student_scores,
    teacher_scores,
    *,
    mask=None,
    relevance=None,
    sigma: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """LambdaRank: RankNet pairs weighted by ``|delta nDCG|`` of swapping the two candidates in the student ranking.

    Pairs are ``(i, j)`` with ``gain_i > gain_j``; loss ``sum |dNDCG_ij| * log(1 + exp(-sigma (s_i - s_j)))`` per
    query (the weights are already nDCG-normalised, so the pair losses are summed, not averaged).
    Gains: with graded ``relevance`` (``>= 0``, same shape) ``2**rel - 1``; otherwise (distillation) the teacher's
    ranking defines them as ``1 / log2(1 + teacher_rank)`` (the top teacher candidate has gain 1). The swap deltas use
    the student's current ranks and are treated as constants (detached), as in LambdaRank.
    """
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    if relevance is not None:
        rel = _as_matrix(relevance, "relevance", mask).to(s.device, s.dtype)
        if rel.shape != s.shape:
            raise ValueError(f"relevance {tuple(rel.shape)} must match the scores {tuple(s.shape)}")
        _check_finite(rel, m, "relevance")
        gain = torch.where(m, torch.pow(2.0, rel) - 1.0, torch.zeros_like(rel))
    else:
        tr = ranks_from_scores(t, m).to(s.dtype)
        gain = torch.where(m, 1.0 / torch.log2(1.0 + tr.clamp_min(1)), torch.zeros_like(s))
    sr = ranks_from_scores(s.detach(), m).to(s.dtype)
    disc = torch.where(m, 1.0 / torch.log2(1.0 + sr.clamp_min(1)), torch.zeros_like(s))
    ideal_disc = 1.0 / torch.log2(torch.arange(2, s.shape[-1] + 2, device=s.device, dtype=s.dtype))
    idcg = (gain.sort(-1, descending=True).values * ideal_disc).sum(-1, keepdim=True)
    delta = ((gain.unsqueeze(-1) - gain.unsqueeze(-2)) * (disc.unsqueeze(-1) - disc.unsqueeze(-2))).abs()
    delta = delta / idcg.unsqueeze(-1).clamp_min(1e-12)
    pairs = _pair_mask(m) & (gain.unsqueeze(-1) > gain.unsqueeze(-2))
    per_pair = delta.detach() * F.softplus(-sigma * (s.unsqueeze(-1) - s.unsqueeze(-2)))
    per_query = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((-1, -2))
    return _reduce(per_query, pairs.sum((-1, -2)) > 0, reduction, num_items_in_batch)


def listnet_loss(
    student_scores,
    teacher_scores,
    *,
    temperature: float = 1.0,
    mask=None,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """ListNet (Cao et al. 2007, top-one probabilities): ``-sum softmax(t/T) * log_softmax(s/T)`` over real candidates.

    This is the original cross-entropy form (the FIRST repo's ``listNet``): not 0 at identity (it equals the teacher
    entropy there) but its gradient is. Subtract the teacher entropy for the KL form.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    log_q = _masked_log_softmax(s / temperature, m)
    p = _masked_log_softmax(t / temperature, m).exp()
    per_query = -torch.where(m, p * log_q, torch.zeros_like(log_q)).sum(-1)
    return _reduce(per_query, m.sum(-1) > 1, reduction, num_items_in_batch)


# --------------------------------------------------------------------------------------------------------------------
# Plackett-Luce (PLD), CPRD
# --------------------------------------------------------------------------------------------------------------------


def _suffix_logsumexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)


def plackett_luce_loss(
    student_logits,
    teacher_logits,
    *,
    labels=None,
    teacher_temperature: float = 1.0,
    mask=None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """Plackett-Luce distillation (PLD, Bassam et al. 2025): teacher-weighted ListMLE on the teacher-optimal order.

    ``pi*`` = the true class ``labels`` first (when given), then every other class/candidate by descending teacher
    logit (ties: lower index first). ``L = sum_k alpha_k [logsumexp_{l >= k} s_{pi*_l} - s_{pi*_k}]`` with
    ``alpha = softmax(t / teacher_temperature)`` of the permuted teacher logits; student logits are not
    temperature-scaled. Works for classification (``[B, C]`` logits + labels) and for candidate lists (``[Q, n]``
    scores, no labels: the teacher order alone; or ``labels`` = index of the relevant candidate). Rows whose label
    is ``ignore_index`` are skipped. Convex and shift-invariant in ``s``; one-hot alpha gives CE, uniform ListMLE.
    """
    if teacher_temperature <= 0:
        raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
    s, t, m = _prepare(student_logits, teacher_logits, mask)
    keep = m.sum(-1) > 0
    key = torch.where(m, t.double(), torch.full_like(t, float("-inf"), dtype=torch.float64))
    if labels is not None:
        y = torch.as_tensor(labels, device=s.device).reshape(-1).long()
        if y.shape[0] != s.shape[0]:
            raise ValueError(f"labels has {y.shape[0]} entries for {s.shape[0]} rows")
        keep = keep & (y != ignore_index)
        yc = torch.where(y == ignore_index, torch.zeros_like(y), y)
        if bool(((yc < 0) | (yc >= s.shape[-1])).any()):
            raise ValueError(f"labels must lie in [0, {s.shape[-1]}) or be ignore_index")
        rows = torch.arange(s.shape[0], device=s.device)
        if not bool(m[rows, yc][keep].all()):
            raise ValueError("the labelled candidate of a row is masked out")
        key = key.clone()
        key[rows, yc] = torch.where(keep, torch.full_like(key[rows, yc], float("inf")), key[rows, yc])
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sp = _fill(s, m).gather(-1, order)
    mp = m.gather(-1, order)
    alpha = _masked_log_softmax(t.gather(-1, order) / teacher_temperature, mp).exp()
    terms = _suffix_logsumexp(sp) - sp
    per_row = torch.where(mp, alpha * terms, torch.zeros_like(terms)).sum(-1)
    return _reduce(per_row, keep, reduction, num_items_in_batch)


def cprd_loss(
    student_scores,
    teacher_scores,
    *,
    mask=None,
    num_valid: int | None = None,
    teacher_threshold: float | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """Contrastive partial ranking distillation (CPRD, Chen et al. CVPR 2024) over a query's hard negatives.

    The ``K`` hard negatives (mined by the student / dual encoder) are ordered by the teacher (cross-encoder) score
    ``c_1 > c_2 > ... > c_K``. Each of the first ``J*`` ("valid") negatives is a positive against every lower-ranked
    one: ``sum_{j < J*} [logsumexp_{k >= j} s_{c_k}/tau - s_{c_j}/tau]`` (a truncated ListMLE), summed over ``j``,
    averaged over queries. Add it to the contrastive (ITC / in-batch) loss with a weight ``lambda`` and apply it in
    both retrieval directions yourself (call it once per direction).

    The paper's ``K``, ``lambda``, ``tau`` and its "valid" criterion are unverified (``docs/losses.md``, CPRD).
    Choice made here: ``J* = min(num_valid, K)`` (default ``num_valid=None``: every negative is an anchor, i.e.
    ListMLE on the teacher order), further cut at the first negative whose teacher score is
    ``<= teacher_threshold`` when a threshold is given (e.g. a cross-encoder logit of 0 = "teacher says no match").
    Negatives beyond ``J*`` still appear in the denominators. ``tau`` defaults to 1; pass the student's contrastive
    temperature.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_valid is not None and num_valid < 0:
        raise ValueError(f"num_valid must be >= 0, got {num_valid}")
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    key = torch.where(m, t.double(), torch.full_like(t, float("-inf"), dtype=torch.float64))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sp = _fill(s / temperature, m).gather(-1, order)
    mp = m.gather(-1, order)
    anchor = mp.clone()
    if num_valid is not None:
        anchor &= torch.arange(s.shape[-1], device=s.device) < num_valid
    if teacher_threshold is not None:
        tp = t.gather(-1, order)
        above = torch.where(mp, tp > teacher_threshold, torch.zeros_like(mp))
        anchor &= torch.cumprod(above.long(), dim=-1).bool()  # the prefix before the first invalid negative
    terms = _suffix_logsumexp(sp) - sp
    per_query = torch.where(anchor, terms, torch.zeros_like(terms)).sum(-1)
    return _reduce(per_query, m.sum(-1) > 1, reduction, num_items_in_batch)


# --------------------------------------------------------------------------------------------------------------------
# DeAR
# --------------------------------------------------------------------------------------------------------------------


def dear_loss(
    student_scores,
    teacher_scores,
    *,
    positive_index=0,
    alpha: float = 0.3,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    ranknet_weight: float = 0.5,
    mask=None,
    reduction: str = "mean",
    num_items_in_batch=None,
    return_parts: bool = False,
):
    """DeAR's hybrid pointwise-reranker loss (Abdallah et al. 2025, ``loss_type=ranknet_binary_softmax_ce``).

    ``(1 - alpha) * [ce_weight * CE(s, positive) + ranknet_weight * RankNet_binary(s)]
    + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` per query group. ``RankNet_binary`` is
    ``log(1 + exp(-(s_pos - s_neg)))`` averaged over the group's real negatives. Defaults: the repo's argument
    defaults ``alpha=0.3, T=2`` (its training script uses ``alpha=0.1``) and the 0.5/0.5 hybrid split.
    With ``return_parts`` returns ``(total, ce, ranknet, kl)`` (each already averaged over queries, unweighted).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s, t, m = _prepare(student_scores, teacher_scores, mask)
    pos = _positive_index(positive_index, s.shape[0], s.device)
    rows = torch.arange(s.shape[0], device=s.device)
    if not bool(m[rows, pos].all()):
        raise ValueError("the positive candidate of every query must be a real (unmasked) candidate")
    log_q1 = _masked_log_softmax(s, m)
    ce = -log_q1[rows, pos]
    neg = m.clone()
    neg[rows, pos] = False
    rn = F.softplus(-(s[rows, pos].unsqueeze(-1) - s))
    rn = torch.where(neg, rn, torch.zeros_like(rn)).sum(-1) / neg.sum(-1).clamp_min(1)
    log_qt = _masked_log_softmax(s / temperature, m)
    log_pt = _masked_log_softmax(t / temperature, m)
    kl = torch.where(m, log_pt.exp() * (log_pt - log_qt), torch.zeros_like(log_qt)).sum(-1) * temperature**2
    per_query = (1.0 - alpha) * (ce_weight * ce + ranknet_weight * rn) + alpha * kl
    keep = m.sum(-1) > 1
    total = _reduce(per_query, keep, reduction, num_items_in_batch)
    if return_parts:
        return (
            total,
            _reduce(ce, keep, "mean", None),
            _reduce(rn, keep, "mean", None),
            _reduce(kl, keep, "mean", None),
        )
    return total


# --------------------------------------------------------------------------------------------------------------------
# nn.Module forms
# --------------------------------------------------------------------------------------------------------------------


class _RankingLoss(nn.Module):
    """Hyper-parameters (the function's keyword-only arguments) in ``__init__``, tensors in ``forward``."""

    _fn: Callable = None  # type: ignore[assignment]
    _tensor_kwargs: tuple[str, ...] = ("mask", "num_items_in_batch", "positive_index", "labels", "relevance")

    def __init__(self, **hparams):
        super().__init__()
        fn = type(self)._fn
        allowed = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        allowed -= set(self._tensor_kwargs)
        unknown = set(hparams) - allowed
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameters {sorted(unknown)}; "
                f"accepted: {', '.join(sorted(allowed))}"
            )
        self.hparams = hparams

    def forward(self, student_scores, teacher_scores, **kwargs):
        return type(self)._fn(student_scores, teacher_scores, **self.hparams, **kwargs)


@register_loss("first_ranknet", kind="ranking", function=first_ranknet_loss, aliases=("first", "weighted_ranknet"))
class FirstRankNetLoss(_RankingLoss):
    """FIRST weighted RankNet on first-token identifier logits (pair weight 1/(r_i + r_j))."""

    _fn = staticmethod(first_ranknet_loss)

    def forward(self, scores, target_ranks, **kwargs):
        return first_ranknet_loss(scores, target_ranks, **self.hparams, **kwargs)


@register_loss("margin_mse", kind="ranking", function=margin_mse_loss, aliases=("marginmse",))
class MarginMSELoss(_RankingLoss):
    """Margin-MSE: match the student's positive-negative score margins to the teacher's."""

    _fn = staticmethod(margin_mse_loss)


@register_loss("ranknet", kind="ranking", function=ranknet_loss)
class RankNetLoss(_RankingLoss):
    """RankNet distillation over candidate pairs (soft teacher targets or binary teacher order)."""

    _fn = staticmethod(ranknet_loss)


@register_loss("lambdarank", kind="ranking", function=lambdarank_loss, aliases=("lambda_rank",))
class LambdaRankLoss(_RankingLoss):
    """LambdaRank: RankNet pairs weighted by the nDCG change of swapping them."""

    _fn = staticmethod(lambdarank_loss)


@register_loss("listnet", kind="ranking", function=listnet_loss)
class ListNetLoss(_RankingLoss):
    """ListNet: cross-entropy between teacher and student top-one candidate distributions."""

    _fn = staticmethod(listnet_loss)


@register_loss("pld", kind="ranking", function=plackett_luce_loss, aliases=("plackett_luce",))
class PlackettLuceLoss(_RankingLoss):
    """Plackett-Luce distillation: teacher-weighted ListMLE on the teacher-optimal permutation."""

    _fn = staticmethod(plackett_luce_loss)


@register_loss("cprd", kind="ranking", function=cprd_loss)
class CPRDLoss(_RankingLoss):
    """Contrastive partial ranking distillation over teacher-ordered hard negatives."""

    _fn = staticmethod(cprd_loss)


@register_loss("dear", kind="ranking", function=dear_loss, aliases=("dear_hybrid",))
class DeARLoss(_RankingLoss):
    """DeAR hybrid: (1-alpha)(CE + RankNet)/2 + alpha T^2 KL on candidate groups."""

    _fn = staticmethod(dear_loss)
