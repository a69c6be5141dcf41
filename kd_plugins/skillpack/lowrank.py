"""Rank and bit widths of the low-rank entries: a thin SVD per matrix, then a bit width per singular component.

Two ways to choose the widths (0 = component dropped):

* budget mode (:func:`allocate_bits`): rate-distortion over all components. Component i of a module with singular
  value s_i costs c(b) bytes at b bits and leaves error ``s_i^2 * e_i(b)`` (e_i(0) = 1; e_i(b) is the exact relative
  error of the quantized rank-1 term). For a price lambda every component picks the b minimising
  ``s_i^2 e_i(b) + lambda c(b)``; lambda is bisected so that the total cost fits the bytes available.
  ``module-aware`` uses one lambda for all modules, ``uniform`` one per module with the module's share of the bytes
  proportional to its size.
* energy mode (:func:`energy_bits`): rank = smallest k keeping ``beta`` of ``sum sigma^2`` (:func:`energy_rank`),
  the kept columns split across widths, leading first (GraftLLM: 2% 8-bit, 18% 4-bit, 80% 2-bit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import quant as Q
from .errors import SkillPackError

DEFAULT_BIT_SPLIT = ((8, 0.02), (4, 0.18), (2, 0.80))  # GraftLLM run.sh: 20 / 180 / 800 of 1000 columns
TABLE_COLUMNS = 128  # leading components per module whose quantization error is measured exactly
SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U [m, r], S [r], V [n, r])
# Per module: (s^2 [r], relative error [r, 1 + len(widths)], bytes per component [1 + len(widths)]).
ErrorTable = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def thin_svd(d: torch.Tensor) -> SVD:
    """Thin SVD ``(U [m, r], S [r], V [n, r])`` of a float32 matrix.

    Very tall (or wide) large matrices, i.e. embeddings, go through the float64 Gram matrix of the short side
    (``D^T D = V S^2 V^T``, then ``U = D V / S``): several times faster than a full SVD there and accurate to
    ~1e-8 of the largest singular value, far below what the quantized factors resolve. Components with a
    negligible singular value are dropped on that path.
    """
    m, n = d.shape
    if max(m, n) < 4 * min(m, n) or m * n < 1_000_000:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u, s, vh.T.contiguous()
    if m < n:
        v, s, u = thin_svd(d.T.contiguous())
        return u, s, v
    dd = d.double()
    evals, evecs = torch.linalg.eigh(dd.T @ dd)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    keep = s > s[0] * 1e-7 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    s, v = s[keep].float(), evecs[:, keep].float().contiguous()
    u = (d @ v) / s
    return u.contiguous(), s, v


# ---------------------------------------------------------------------------------------------------- energy mode
def energy_rank(s: torch.Tensor, beta: float) -> int:
    """Smallest k with ``sum_{i<k} s_i^2 >= beta * sum s_i^2`` (s sorted descending); 0 for an all-zero s."""
    if not 0 < beta <= 1:
        raise SkillPackError(f"energy threshold must be in (0, 1], got {beta}")
    e = s.double().pow(2)
    total = e.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0)
    k = int(torch.searchsorted(cum, beta * total * (1 - 1e-12)).item()) + 1
    return min(k, s.numel())


def default_bit_split(widths: Sequence[int]) -> list[tuple[int, float]]:
    """GraftLLM's 2% / 18% / 80% split over ``widths`` (widest first); a width it does not name gets 1/len."""
    if len(widths) == 1:
        return [(widths[0], 1.0)]
    ratio = dict(DEFAULT_BIT_SPLIT)
    return [(w, ratio.get(w, 1.0 / len(widths))) for w in sorted(widths, reverse=True)]


def energy_bits(s: torch.Tensor, energy: float, split: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Per-component widths: the leading :func:`energy_rank` components split by ``split`` (the first group gets at
    least one column, the last group the rest), the others 0."""
    k = energy_rank(s, energy)
    bits = torch.zeros(s.numel(), dtype=torch.long)
    start = 0
    for j, (width, frac) in enumerate(split):
        cnt = k - start if j == len(split) - 1 else min(k - start, max(1 if j == 0 else 0, round(frac * k)))
        bits[start : start + cnt] = width
        start += cnt
    return bits


# ---------------------------------------------------------------------------------------------------- budget mode
def _error_table(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, widths: list[int], group_size: int) -> ErrorTable:
    m, n = u.shape[0], v.shape[0]
    err = [torch.ones_like(s, dtype=torch.float64)]
    cost = [0.0]
    k = min(s.numel(), TABLE_COLUMNS)
    for b in widths:
        uq, vq = Q.roundtrip(u[:, :k], b, group_size), Q.roundtrip(v[:, :k], b, group_size)
        # ||u v^T - uq vq^T||^2 for unit u, v (SVD columns are unit-norm), exact for the leading k columns;
        # later columns (rarely bought, all unit vectors alike) get the mean of the last computed ones.
        e = (
            (1 + (uq.pow(2).sum(0) * vq.pow(2).sum(0)) - 2 * (u[:, :k] * uq).sum(0) * (v[:, :k] * vq).sum(0))
            .double()
            .clamp_min(0)
        )
        if k < s.numel():
            e = torch.cat([e, e[-32:].mean().expand(s.numel() - k)])
        err.append(e)
        cost.append(float(Q.column_bytes(m, b, group_size) + Q.column_bytes(n, b, group_size) + 4))
    return s.double().pow(2), torch.stack(err, 1), torch.tensor(cost, dtype=torch.float64)


def error_tables(
    lowrank: list[dict], svds: list[SVD], widths: list[int], group_size: int, progress: bool, cache: dict | None = None
) -> list[ErrorTable]:
    """One :data:`ErrorTable` per low-rank module (reused from ``cache`` when the same module was seen before)."""
    from tqdm.auto import tqdm

    tables = []
    for it, (u, s, v) in tqdm(
        list(zip(lowrank, svds)), desc="skillpack: error tables", disable=not progress, leave=False
    ):
        key = ("table", it["name"], tuple(widths), group_size)
        if cache is not None and key in cache:
            tables.append(cache[key])
            continue
        tables.append(_error_table(u, s, v, widths, group_size))
        if cache is not None:
            cache[key] = tables[-1]
    return tables


def _choose(tables: list[ErrorTable], lam: float, mods) -> tuple[float, list[torch.Tensor]]:
    """Option index per component minimising ``error + lam * bytes``, and the total bytes of those choices."""
    total, picks = 0.0, []
    for j in mods:
        s2, err, cost = tables[j]
        k = (s2[:, None] * err + lam * cost[None, :]).argmin(1)
        picks.append(k)
        total += float(cost[k].sum())
    return total, picks


def _solve(tables: list[ErrorTable], mods, cap: float) -> list[torch.Tensor] | None:
    """Bisect log10(lambda) for the cheapest price whose choices fit ``cap`` bytes; None if nothing fits."""
    lo, hi = -60.0, 60.0
    tot, picks = _choose(tables, 10**hi, mods)
    if tot > cap:
        return None
    best = picks
    for _ in range(80):
        mid = (lo + hi) / 2
        tot, picks = _choose(tables, 10**mid, mods)
        if tot <= cap:
            hi, best = mid, picks
        else:
            lo = mid
    return best


def allocate_bits(
    lowrank: list[dict],
    svds: list[SVD],
    widths: Sequence[int],
    group_size: int,
    avail: int,
    policy: str,
    progress: bool,
    cache: dict | None = None,
) -> list[torch.Tensor] | None:
    """Per-component bit width (0 = dropped) for every module within ``avail`` bytes; None if nothing fits."""
    if avail <= 0 or not lowrank:
        return None
    widths = sorted(set(widths), reverse=True)
    tables = error_tables(lowrank, svds, widths, group_size, progress, cache)
    options = torch.tensor([0] + widths)
    if policy == "module-aware":
        picks = _solve(tables, range(len(tables)), avail)
        return None if picks is None else [options[k] for k in picks]
    sizes = [math.prod(it["shape"]) for it in lowrank]
    out = []
    for j, size in enumerate(sizes):
        picks = _solve(tables, [j], avail * size / sum(sizes))
        out.append(options[picks[0]] if picks is not None else torch.zeros(tables[j][0].numel(), dtype=torch.long))
    return out


def smallest_allocation(
    lowrank: list[dict],
    svds: list[SVD],
    widths: Sequence[int],
    group_size: int,
    policy: str,
    progress: bool,
    cache: dict | None = None,
) -> int | None:
    """The fewest bytes for which :func:`allocate_bits` keeps at least one component (``None``: no component is
    worth any bytes). The first component bought as the price lambda falls is the one with the largest error drop
    per byte; ``uniform`` gives each module its share, so the module needing the smallest total decides."""
    widths = sorted(set(widths), reverse=True)
    tables = error_tables(lowrank, svds, widths, group_size, progress, cache)
    first_price = [float((s2[:, None] * (1 - err[:, 1:]) / cost[None, 1:]).max()) for s2, err, cost in tables]
    if not first_price or max(first_price) <= 0:
        return None
    if policy == "module-aware":  # just below the highest price: what the bisection settles on for a tight budget
        return round(_choose(tables, max(first_price) * (1 - 1e-9), range(len(tables)))[0])
    sizes = [math.prod(it["shape"]) for it in lowrank]
    costs = [(round(_choose(tables, price * (1 - 1e-9), [j])[0]), sizes[j]) for j, price in enumerate(first_price)]
    # integer ceil: the module's share avail * size / sum(sizes) must reach its first component's (integer) cost
    return min(-(-cost * sum(sizes) // size) for (cost, size), price in zip(costs, first_price) if price > 0)
