"""Which tensors take part in a sparse fine-tuning, and an exact, memory-light top-K over many tensors."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping

import torch

from .config import SparseFTConfig

__all__ = ["count_for", "split_targets", "top_k_masks", "unique_floating"]

#: Name components that mark embedding matrices when include_embeddings=False (besides any component with "embed").
_EMBEDDING_COMPONENTS = ("wte", "wpe", "shared", "lm_head")


def _entry_match(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.search(entry[3:], name) is not None
    if any(ch in entry for ch in "*?["):
        return fnmatch.fnmatchcase(name, entry)
    return f".{entry}." in f".{name}."


def _entries(spec: str) -> list[str]:
    spec = spec.strip()
    if spec.startswith("re:"):
        return [spec]
    return [e.strip() for e in spec.split(",") if e.strip()]


def _matches(name: str, spec: str) -> bool:
    return spec.strip() == "all" or any(_entry_match(name, e) for e in _entries(spec))


def _kind_excluded(name: str, config: SparseFTConfig) -> bool:
    parts = name.lower().split(".")
    if not config.include_bias and "bias" in parts[-1]:
        return True
    if not config.include_norm and any("norm" in p or p == "ln" or p.startswith("ln_") for p in parts):
        return True
    return not config.include_embeddings and any("embed" in p or p in _EMBEDDING_COMPONENTS for p in parts)


def _check_spec_matches(spec: str, field_name: str, names: list[str]) -> None:
    for entry in _entries(spec):
        if entry != "all" and not any(_entry_match(n, entry) for n in names):
            close = difflib.get_close_matches(entry, names, n=3, cutoff=0.4)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"{field_name} entry {entry!r} matches no floating-point parameter{hint}; check the name")


def split_targets(names: list[str], config: SparseFTConfig) -> tuple[list[str], list[str]]:
    """``(sparse, dense)``: the tensors whose entries compete for the density budget, and those trained in full.

    ``names`` are floating-point tensor names in model order. Entries of ``targets`` / ``dense_targets`` that match
    no name raise a ``ValueError``, as does a selection that leaves no participating tensor.
    """
    if config.targets.strip() != "all":
        _check_spec_matches(config.targets, "targets", names)
    if config.dense_targets.strip():
        _check_spec_matches(config.dense_targets, "dense_targets", names)
    dense = [n for n in names if config.dense_targets.strip() and _matches(n, config.dense_targets)]
    sparse = [
        n
        for n in names
        if n not in dense
        and _matches(n, config.targets)
        and not (config.exclude.strip() and _matches(n, config.exclude))
        and not _kind_excluded(n, config)
    ]
    if not sparse:
        raise ValueError(
            f"no parameter takes part in the sparse fine-tuning (targets={config.targets!r}, "
            f"exclude={config.exclude!r}, include_bias/norm/embeddings={config.include_bias}/{config.include_norm}/"
            f"{config.include_embeddings}); widen targets"
        )
    return sparse, dense


def unique_floating(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point tensors of ``state`` in order, each storage once (tied weights keep their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in state.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, t.device)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _count_at_least(bits: list[torch.Tensor], threshold: int) -> int:
    return int(sum(int((b >= threshold).sum()) for b in bits))


def top_k_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks selecting exactly the ``k`` largest entries over all ``scores`` (non-negative, finite).

    Exact and without concatenating the tensors: non-negative float32 values order like their int32 bit patterns, so
    a bisection over bit patterns (31 counting passes) finds the k-th largest value ``t``; every entry above ``t`` is
    kept, and ties at ``t`` are taken in the order of ``scores`` (then flat index) until ``k`` are chosen.
    """
    total = sum(s.numel() for s in scores.values())
    if not 0 < k <= total:
        raise ValueError(f"cannot select {k} of {total} entries: k must be in [1, {total}]")
    bits = {}
    for name, s in scores.items():
        s = s.detach().to(torch.float32).contiguous()
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"scores of {name!r} hold negative or non-finite values (NaN / inf in the weights?)")
        bits[name] = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    lo, hi = 0, 0x7F800000  # +0.0 and +inf as int32; count(>= lo) >= k always holds
    values = list(bits.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_at_least(values, mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    masks = {name: b > lo for name, b in bits.items()}
    need = k - sum(int(m.sum()) for m in masks.values())
    for name, b in bits.items():
        if need <= 0:
            break
        ties = b == lo
        take = ties & (torch.cumsum(ties.reshape(-1), 0).reshape(ties.shape) <= need)
        masks[name] |= take
        need -= int(take.sum())
    return masks


def count_for(density: float, numel: int) -> int:
    """Entries a density keeps of ``numel``: ``round(density * numel)``, at least 1."""
    return max(1, min(numel, round(density * numel)))
