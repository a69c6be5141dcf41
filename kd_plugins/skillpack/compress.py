"""Compress a list of deltas (:class:`~kd_plugins.skillpack.delta.DeltaItem`) module by module into entries.

* ``exact``: small tensors (norms, biases, 1-D parameters, matrices with a side <= ``exact_max_dim``) and, with
  ``embeddings="exact"``, embeddings: the delta itself in fp32.
* ``sparse``: embeddings with ``embeddings="sparse"``: the largest ``sparse_density`` fraction of the entries.
* ``lowrank``: every other matrix: truncated SVD with mixed-precision quantized factors; rank and widths come from
  the budget or the energy threshold (:mod:`kd_plugins.skillpack.lowrank`).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from .budget import DENSE_BYTES_PER_ELEMENT, parse_budget
from .config import DEFAULT_BUDGET, SkillPackConfig
from .entry import Entry, exact_entry, lowrank_entry
from .errors import BudgetTooSmallError, SkillPackError
from .lowrank import SVD, allocate_bits, default_bit_split, energy_bits, smallest_allocation, thin_svd

logger = logging.getLogger(__name__)


def _is_small(shape: tuple[int, ...], exact_max_dim: int) -> bool:
    return len(shape) < 2 or min(shape[0], math.prod(shape) // shape[0]) <= exact_max_dim


def _sparse_entry(item: dict, density: float) -> Entry:
    d = item["delta"].reshape(-1)
    k = max(1, int(round(density * d.numel())))
    idx = torch.topk(d.abs(), k).indices.sort().values
    return Entry(
        item["name"],
        "sparse",
        item["shape"],
        item["dtype"],
        item["module_type"],
        item["module_class"],
        {"idx": idx.to(torch.int32), "val": d[idx].half()},
    )


def _split_items(items: list[dict], config: SkillPackConfig) -> tuple[list[Entry], list[dict], list[str]]:
    """Stored-as-is entries (exact, sparse), the low-rank candidates, and the names skipped by the embedding
    policy."""
    fixed, lowrank, skipped = [], [], []
    for it in items:
        small = _is_small(it["shape"], config.exact_max_dim)
        if it["module_type"] == "embedding" and not small:
            if config.embeddings == "skip":
                skipped.append(it["name"])
                continue
            if config.embeddings == "sparse":
                fixed.append(_sparse_entry(it, config.sparse_density))
                continue
            small = config.embeddings == "exact"
        if small:
            fixed.append(exact_entry(it, it["delta"]))
        else:
            lowrank.append(it)
    return fixed, lowrank, skipped


def _svds(lowrank: list[dict], progress: bool, cache: dict | None) -> list[SVD]:
    from tqdm.auto import tqdm

    svds = []
    for it in tqdm(lowrank, desc="skillpack: SVD", disable=not progress, leave=False):
        key = ("svd", it["name"])
        if cache is not None and key in cache:
            svds.append(cache[key])
            continue
        svds.append(thin_svd(it["delta"].reshape(it["shape"][0], -1)))
        if cache is not None:
            cache[key] = svds[-1]
    return svds


def _budget_too_small(
    budget_bytes: int,
    fixed_bytes: int,
    dense_bytes: int,
    lowrank: list[dict],
    svds: list[SVD],
    config: SkillPackConfig,
    cache: dict | None,
) -> BudgetTooSmallError:
    """The error for a budget that holds no component, with the smallest budget that holds one."""
    first = (
        smallest_allocation(lowrank, svds, config.bits, config.group_size, config.policy, config.progress, cache)
        if lowrank
        else 0
    )
    held = f"the exact small deltas (norms, biases, small tensors{_exact_extra(config)}) take {fixed_bytes:,} bytes"
    if first is None:
        return BudgetTooSmallError(
            f"budget {config.extraction_budget!r} ({budget_bytes:,} bytes) is too small: {held} and no low-rank "
            f"component reduces the error (dense bf16 delta: {dense_bytes:,} bytes)"
        )
    need = fixed_bytes + first
    share = 100 * need / dense_bytes
    uniform = " (policy 'uniform': a module's share of the budget must hold it)" if config.policy == "uniform" else ""
    return BudgetTooSmallError(
        f"budget {config.extraction_budget!r} ({budget_bytes:,} bytes) is too small: {held}, and one low-rank "
        f"component needs {first:,} more{uniform}, so the smallest budget that works is {need:,} bytes ({share:.2f}% "
        f"of the dense bf16 delta of {dense_bytes:,} bytes). Pass {_budget_hint(need, dense_bytes)}.",
        smallest_budget=need,
    )


def _exact_extra(config: SkillPackConfig) -> str:
    return ", embeddings" if config.embeddings in ("exact", "sparse") else ""


def _budget_hint(need: int, dense_bytes: int) -> str:
    """``budget=<need>`` and, when it is at most the dense delta, the percentage (0.1 steps, rounded up) that
    covers it."""
    hint = f"budget={need}"
    pct = math.ceil(1000 * need / dense_bytes) / 10
    while pct <= 100 and parse_budget(f"{pct:g}%", dense_bytes) < need:
        pct = round(pct + 0.1, 1)
    return f"{hint} or budget='{pct:g}%'" if pct <= 100 else f"{hint} (more than the dense bf16 delta)"


def _raise_default_budget(default_bytes: int, smallest: int, dense_bytes: int) -> int:
    """The default budget, too small for this (tiny) model, becomes the smallest budget that works."""
    logger.warning(
        "kd_plugins.skillpack: the default budget %s (%s bytes) cannot hold this model's exact small deltas plus one "
        "low-rank component; using the smallest budget that can, %s bytes (%.2f%% of the dense bf16 delta). Pass "
        "budget=... to choose.",
        DEFAULT_BUDGET,
        f"{default_bytes:,}",
        f"{smallest:,}",
        100 * smallest / dense_bytes,
    )
    return smallest


def _budget_mode_bits(
    lowrank: list[dict],
    svds: list[SVD],
    budget_bytes: int,
    fixed_bytes: int,
    dense_bytes: int,
    config: SkillPackConfig,
    cache: dict | None,
) -> list[torch.Tensor]:
    """Per-module component widths within what the budget leaves after the fixed entries."""
    avail = budget_bytes - fixed_bytes
    if not lowrank:
        chosen, ok = [], avail >= 0
    else:
        chosen = (
            allocate_bits(lowrank, svds, config.bits, config.group_size, avail, config.policy, config.progress, cache)
            if avail > 0
            else None
        )
        ok = chosen is not None and any(bool((c > 0).any()) for c in chosen)
    if not ok:
        raise _budget_too_small(budget_bytes, fixed_bytes, dense_bytes, lowrank, svds, config, cache)
    return chosen


def _energy_mode_bits(svds: list[SVD], config: SkillPackConfig) -> list[torch.Tensor]:
    split = config.bit_split if config.bit_split is not None else default_bit_split(config.bits)
    return [energy_bits(s, config.energy, split) for _, s, _ in svds]


def _rel_error(entry: Entry, delta: torch.Tensor) -> float:
    return float((entry.delta() - delta).norm() / delta.norm())


def _lowrank_entries(
    lowrank: list[dict], svds: list[SVD], chosen: list[torch.Tensor], config: SkillPackConfig
) -> tuple[list[Entry], list[str]]:
    """Quantized low-rank entries (with their relative error) and the modules that got no component."""
    from tqdm.auto import tqdm

    entries, dropped = [], []
    for it, (u, s, v), b in tqdm(
        list(zip(lowrank, svds, chosen)), desc="skillpack: quantize", disable=not config.progress, leave=False
    ):
        e = lowrank_entry(it, u, s, v, b, config.group_size)
        if e is None:
            dropped.append(it["name"])
            continue
        e.rel_error = _rel_error(e, it["delta"])
        entries.append(e)
    return entries, dropped


def compress_entries(items: list[dict], config: SkillPackConfig, cache: dict | None = None) -> tuple[list[Entry], dict]:
    """Entries (sorted by name) and the pack's ``info`` record for ``items`` compressed as ``config`` says.

    ``cache``: a dict kept by the caller to reuse SVDs and quantization-error tables when the same deltas are
    compressed at several budgets. Raises :class:`BudgetTooSmallError` when the budget cannot hold the exact deltas
    plus one component."""
    config.check_mode()
    t_start = time.time()
    cache = {} if cache is None else cache  # the error tables are reused when a too-small budget is reported
    dense_bytes = sum(math.prod(it["shape"]) * DENSE_BYTES_PER_ELEMENT for it in items)
    entries, lowrank, skipped = _split_items(items, config)
    fixed_bytes = sum(e.nbytes for e in entries)
    svds = _svds(lowrank, config.progress, cache)
    budget_bytes = None
    if config.extraction_budget is not None:
        budget_bytes = parse_budget(config.extraction_budget, dense_bytes)
        try:
            chosen = _budget_mode_bits(lowrank, svds, budget_bytes, fixed_bytes, dense_bytes, config, cache)
        except BudgetTooSmallError as e:
            if config.budget is not None or e.smallest_budget is None:
                raise  # a budget the caller chose is never raised behind their back
            budget_bytes = _raise_default_budget(budget_bytes, e.smallest_budget, dense_bytes)
            chosen = _budget_mode_bits(lowrank, svds, budget_bytes, fixed_bytes, dense_bytes, config, cache)
    else:
        chosen = _energy_mode_bits(svds, config)
    deltas = {it["name"]: it["delta"] for it in items}
    for e in entries:
        e.rel_error = _rel_error(e, deltas[e.name])
    lowrank_entries, dropped = _lowrank_entries(lowrank, svds, chosen, config)
    entries = sorted(entries + lowrank_entries, key=lambda e: e.name)
    skipped += dropped
    info = {
        "dense_bytes": dense_bytes,
        "budget_bytes": budget_bytes,
        "energy": config.energy,
        "policy": config.policy,
        "embeddings": config.embeddings,
        "bits": list(config.bits),
        "group_size": config.group_size,
        "exact_max_dim": config.exact_max_dim,
        "sparse_density": config.sparse_density if config.embeddings == "sparse" else None,
        "dropped": sorted(skipped),
        "dropped_errors": {n: 1.0 for n in dropped},
        "extract_s": round(time.time() - t_start, 2),
        "dropped_dense_bytes": sum(
            math.prod(i["shape"]) * DENSE_BYTES_PER_ELEMENT for i in items if i["name"] in set(skipped)
        ),
    }
    nbytes = sum(e.nbytes for e in entries)
    if budget_bytes is not None and nbytes > budget_bytes:  # the allocator guarantees this; keep it checked
        raise SkillPackError(f"internal error: pack of {nbytes} bytes exceeds the budget {budget_bytes}")
    return entries, info
