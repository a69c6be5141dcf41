"""Human-readable reports of a pack: per-module rows and a text summary."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .budget import DENSE_BYTES_PER_ELEMENT
from .entry import Entry


def report_rows(entries: Iterable[Entry], dropped: Iterable[str] = ()) -> list[dict]:
    """Per-module rows: name, type, kind, shape, rank, bits, bytes, dense (bf16) bytes, relative error; the
    ``dropped`` tensors (not stored) last, with relative error 1."""
    rows = []
    for e in entries:
        rows.append(
            {
                "name": e.name,
                "module_type": e.module_type,
                "kind": e.kind,
                "shape": list(e.shape),
                "rank": e.rank,
                "bits": e.bits_str(),
                "bytes": e.nbytes,
                "dense_bytes": e.numel * DENSE_BYTES_PER_ELEMENT,
                "rel_error": e.rel_error,
            }
        )
    for n in dropped:
        rows.append(
            {
                "name": n,
                "module_type": "",
                "kind": "dropped",
                "shape": [],
                "rank": 0,
                "bits": "",
                "bytes": 0,
                "dense_bytes": None,
                "rel_error": 1.0,
            }
        )
    return rows


def _aggregate_lines(entries: Iterable[Entry]) -> list[str]:
    """One line per module type / entry kind: tensors, bytes, share of the dense delta, rms relative error."""
    agg: dict[str, list] = {}
    for e in entries:
        a = agg.setdefault(f"{e.module_type}/{e.kind}", [0, 0, 0, 0.0, 0.0])
        a[0] += 1
        a[1] += e.nbytes
        a[2] += e.numel * DENSE_BYTES_PER_ELEMENT
        a[3] += (e.rel_error or 0.0) ** 2 * e.numel
        a[4] += e.numel
    lines = [f"{'type/kind':<22} {'tensors':>7} {'bytes':>13} {'of dense':>9} {'rel err (rms)':>13}"]
    for k in sorted(agg):
        n, b, d, se, w = agg[k]
        lines.append(f"{k:<22} {n:>7} {b:>13,} {100 * b / d:>8.2f}% {math.sqrt(se / w):>13.4f}")
    return lines


def _module_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'name':<48} {'kind':<8} {'rank':>5} {'bits':<22} {'bytes':>11} {'rel err':>8}"]
    for r in rows:
        lines.append(
            f"{r['name']:<48} {r['kind']:<8} {r['rank']:>5} {r['bits']:<22} {r['bytes']:>11,} "
            f"{r['rel_error'] if r['rel_error'] is not None else float('nan'):>8.4f}"
        )
    return lines


def summary_text(label: str, entries: list[Entry], info: dict, per_module: bool = False) -> str:
    """Text report of a pack called ``label``: totals, per module-type aggregates, optionally every module."""
    nbytes = sum(e.nbytes for e in entries)
    lines = [f"SkillPack {label}: {len(entries)} tensors, {nbytes:,} bytes"]
    dense = info.get("dense_bytes")
    if dense:
        lines[0] += f" = {100 * nbytes / dense:.2f}% of the dense bf16 delta ({dense:,} B)"
    if info.get("budget_bytes"):
        lines.append(
            f"budget {info['budget_bytes']:,} bytes, policy {info.get('policy')}, embeddings {info.get('embeddings')}"
        )
    lines += _aggregate_lines(entries)
    if info.get("dropped"):
        lines.append(f"dropped (not stored): {len(info['dropped'])} tensors")
    if per_module:
        lines += _module_lines(report_rows(entries, info.get("dropped", [])))
    return "\n".join(lines)
