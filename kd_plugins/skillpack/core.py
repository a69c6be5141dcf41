"""SkillPack: a fine-tune's weight delta, compressed module by module (GraftLLM, Du et al., arXiv 2505.18502).

A SkillPack stores ``finetuned - base`` per parameter tensor in one of three forms:

* ``lowrank``: truncated SVD ``U diag(S) V^T`` of the (2-D) delta; the columns of U and V are quantized with mixed
  precision by singular-value magnitude (leading components 8-bit, then 4-bit, then 2-bit column groups), S is fp32.
  Used for attention and MLP matrices (and any other large matrix).
* ``exact``: the delta itself in fp32. Used for small tensors: norms, biases, 1-D parameters, matrices with a tiny
  side (``exact_max_dim``), and for embeddings when ``embeddings="exact"``.
* ``sparse``: the largest-magnitude fraction of the entries (int32 flat index + fp16 value); the paper's option for
  embeddings (``embeddings="sparse"``).

Rank and bit widths come either from a storage **budget** (bytes, a fraction of the dense delta, or "5%" / "20MB"),
split across all modules by one global rate-distortion allocation (``policy="module-aware"``: every singular
component of every module competes for bytes on ``sigma^2 x quantization error`` per byte) or per module in proportion
to its size (``policy="uniform"``), or from an **energy** threshold per module (smallest k with
``sum_{i<=k} sigma_i^2 >= beta * sum sigma^2``, then GraftLLM's 2%/18%/80% 8/4/2-bit column split).

"Dense delta bytes", the reference for fractional budgets, is every changed tensor at 2 bytes per element (bf16).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .._atomic import atomic_dir
from . import quant as Q
from .errors import (ArchitectureMismatchError, BudgetTooSmallError, FingerprintMismatchError, IntegrityError,
                     SkillPackError)

FORMAT = "kd_plugins.skillpack"
FORMAT_VERSION = 1
TENSORS_FILE = "skillpack.safetensors"
MANIFEST_FILE = "manifest.json"
DENSE_BYTES_PER_ELEMENT = 2  # the reference "dense delta" is bf16
EMBEDDING_POLICIES = ("lowrank", "exact", "sparse", "skip")
POLICIES = ("module-aware", "uniform")
DEFAULT_BIT_SPLIT = ((8, 0.02), (4, 0.18), (2, 0.80))  # GraftLLM run.sh: 20 / 180 / 800 of 1000 columns
_STATE_ATTR = "_kd_skillpack_state"
TABLE_COLUMNS = 128  # leading components per module whose quantization error is measured exactly


# ------------------------------------------------------------------------------------------------------- helpers
def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and floating buffers of ``model`` by name: what a SkillPack can change."""
    out = {n: p for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        if b is not None and b.is_floating_point() and n not in out:
            out[n] = b
    return out


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the sorted names, dtypes, shapes and bytes of :func:`model_tensors`.

    A model with any changed weight, a different dtype or a different architecture gets another fingerprint. When
    SkillPacks are applied to ``model`` the fingerprint of its base weights (taken before the first pack) is kept.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        return state["base_fingerprint"]
    h = hashlib.sha256()
    for name, t in sorted(model_tensors(model).items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|{t.numel()}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def parse_budget(budget, dense_bytes: int) -> int:
    """Bytes from ``budget``: int bytes; float in (0, 1] = fraction of the dense (bf16) delta; str "5%", "0.05",
    "20MB", "512KiB", "1000"."""
    if isinstance(budget, bool) or budget is None:
        raise SkillPackError(f"invalid budget {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise SkillPackError(f"a float budget is a fraction of the dense delta in (0, 1]; got {budget}. Pass an "
                                 "int for bytes.")
        value = int(budget * dense_bytes)
    elif isinstance(budget, str):
        s = budget.strip().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(%|[kKmMgG]i?[bB]|[bB])?", s)
        if not m:
            raise SkillPackError(f"cannot parse budget {budget!r}; use e.g. '5%', '0.05', '20MB', '512KiB', 1000000")
        num, unit = float(m.group(1)), (m.group(2) or "")
        if unit == "%":
            return parse_budget(num / 100.0, dense_bytes)
        if unit == "" and "." in m.group(1):
            return parse_budget(num, dense_bytes)
        mult = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
        value = int(num * mult[unit.lower()])
    else:
        raise SkillPackError(f"invalid budget type {type(budget).__name__}")
    if value <= 0:
        raise SkillPackError(f"budget must be positive, got {budget!r}")
    return value


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


def _module_type(name: str, module: nn.Module | None, t: torch.Tensor, output_embedding: bool) -> str:
    cls = type(module).__name__ if module is not None else ""
    low = name.lower()
    if isinstance(module, nn.Embedding) or output_embedding:
        return "embedding"
    if t.dim() < 2:
        if "norm" in cls.lower() or re.search(r"(^|[._])(ln|norm|layernorm|layer_norm)", low):
            return "norm"
        return "bias" if low.endswith("bias") else "other"
    if re.search(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv", low):
        return "attention"
    if re.search(r"mlp|ffn|feed_forward|intermediate|gate_proj|up_proj|down_proj|fc\d|\.output\.dense", low):
        return "mlp"
    return "other"


# --------------------------------------------------------------------------------------------------------- entry
@dataclass
class Entry:
    """One compressed parameter delta. ``tensors`` maps roles to stored tensors:
    lowrank: ``S`` plus ``U{g}.q``/``U{g}.s``/``V{g}.q``/``V{g}.s`` per bit group ``g``; exact: ``D``; sparse:
    ``idx``/``val``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str
    module_class: str
    tensors: dict[str, torch.Tensor]
    groups: list[tuple[int, int]] = field(default_factory=list)  # lowrank: (bits, n_columns), leading first
    group_size: int = 64
    rel_error: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rank(self) -> int:
        return sum(c for _, c in self.groups) if self.kind == "lowrank" else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], self.numel // self.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """De-quantized ``(U [m, r], S [r], V [n, r])`` of a lowrank entry (float32)."""
        if self.kind != "lowrank":
            raise SkillPackError(f"{self.name} is a {self.kind} entry, not lowrank")
        m, n = self.matrix_shape()
        us, vs = [], []
        for g, (bits, _) in enumerate(self.groups):
            us.append(Q.dequantize({k[len(f"U{g}."):]: v for k, v in self.tensors.items() if k.startswith(f"U{g}.")},
                                   bits, m, self.group_size))
            vs.append(Q.dequantize({k[len(f"V{g}."):]: v for k, v in self.tensors.items() if k.startswith(f"V{g}.")},
                                   bits, n, self.group_size))
        return torch.cat(us, 1), self.tensors["S"].float(), torch.cat(vs, 1)

    def delta(self) -> torch.Tensor:
        """The dense float32 delta this entry encodes, in the parameter's shape."""
        if self.kind == "exact":
            return self.tensors["D"].float().reshape(self.shape)
        if self.kind == "sparse":
            flat = torch.zeros(self.numel, dtype=torch.float32)
            flat[self.tensors["idx"].long()] = self.tensors["val"].float()
            return flat.reshape(self.shape)
        if self.kind == "lowrank":
            u, s, v = self.factors()
            return ((u * s) @ v.T).reshape(self.shape)
        raise SkillPackError(f"unknown entry kind {self.kind!r}")

    def meta(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": self.dtype,
                "module_type": self.module_type, "module_class": self.module_class,
                "groups": [list(g) for g in self.groups], "group_size": self.group_size, "rel_error": self.rel_error,
                "tensors": sorted(self.tensors)}

    def bits_str(self) -> str:
        if self.kind == "lowrank":
            return ",".join(f"{c}@{b}b" for b, c in self.groups)
        if self.kind == "sparse":
            return f"{self.tensors['idx'].numel()} entries"
        return "fp32"


def _lowrank_entry(item: dict, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bits: torch.Tensor,
                   group_size: int) -> Entry | None:
    """Build a lowrank entry from SVD factors and a per-component bit width (0 = dropped)."""
    tensors: dict[str, torch.Tensor] = {}
    groups, order = [], []
    for b in sorted({int(x) for x in bits.tolist() if x > 0}, reverse=True):
        idx = torch.nonzero(bits == b).flatten()
        g = len(groups)
        for role, fac in (("U", u), ("V", v)):
            for k, t in Q.quantize(fac[:, idx], b, group_size).items():
                tensors[f"{role}{g}.{k}"] = t
        groups.append((b, int(idx.numel())))
        order.append(idx)
    if not groups:
        return None
    tensors["S"] = s[torch.cat(order)].float().contiguous()
    return Entry(item["name"], "lowrank", tuple(item["shape"]), item["dtype"], item["module_type"],
                 item["module_class"], tensors, groups, group_size)


# -------------------------------------------------------------------------------------------------- compression
def _collect_deltas(base: nn.Module, finetuned: nn.Module) -> list[dict]:
    if base is finetuned:
        raise SkillPackError("base and finetuned are the same model object; pass the base and the fine-tuned model")
    tb, tf = model_tensors(base), model_tensors(finetuned)
    missing, extra = sorted(set(tb) - set(tf)), sorted(set(tf) - set(tb))
    if missing or extra:
        raise ArchitectureMismatchError(
            f"base ({type(base).__name__}) and fine-tuned ({type(finetuned).__name__}) models have different "
            f"parameters: {len(missing)} only in base (e.g. {missing[:3]}), {len(extra)} only in fine-tuned "
            f"(e.g. {extra[:3]}). A SkillPack needs the same architecture on both sides.")
    bad = [(n, tuple(tb[n].shape), tuple(tf[n].shape)) for n in sorted(tb) if tb[n].shape != tf[n].shape]
    if bad:
        raise ArchitectureMismatchError(f"{len(bad)} parameter shapes differ between base and fine-tuned, e.g. "
                                        + "; ".join(f"{n}: {a} vs {b}" for n, a, b in bad[:3]))
    modules = dict(base.named_modules())
    out_emb = None
    try:
        oe = base.get_output_embeddings()
        out_emb = oe.weight if oe is not None else None
    except (AttributeError, NotImplementedError):
        pass
    items = []
    for name in sorted(tb):
        a, b = tb[name].detach(), tf[name].detach()
        if not a.is_floating_point():
            continue
        d = b.to("cpu", torch.float32) - a.to("cpu", torch.float32)
        if not torch.isfinite(d).all():
            raise SkillPackError(f"non-finite values in the delta of {name}")
        if not torch.any(d != 0):
            continue
        mod_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = modules.get(mod_name)
        is_out_emb = out_emb is not None and tb[name] is out_emb
        items.append({"name": name, "delta": d, "shape": tuple(d.shape), "dtype": str(a.dtype).replace("torch.", ""),
                      "module_type": _module_type(name, module, d, is_out_emb),
                      "module_class": type(module).__name__ if module is not None else ""})
    if not items:
        raise SkillPackError("the fine-tuned model is identical to the base: no delta to pack")
    return items


def compress_deltas(items: list[dict], base_fingerprint: str, *, budget=None, energy: float | None = None,
                    policy: str = "module-aware", embeddings: str = "lowrank", bits=(8, 4, 2), bit_split=None,
                    group_size: int = 64, exact_max_dim: int = 16, sparse_density: float = 0.01,
                    name: str | None = None, progress: bool = True, cache: dict | None = None) -> "SkillPack":
    """Compress a list of deltas (``{"name", "delta", "shape", "dtype", "module_type", "module_class"}``) into a
    :class:`SkillPack`; see :meth:`SkillPack.extract` for the arguments. ``cache``: a dict kept by the caller to
    reuse SVDs and quantization-error tables when the same deltas are compressed at several budgets."""
    from tqdm.auto import tqdm

    if policy not in POLICIES:
        raise SkillPackError(f"policy must be one of {POLICIES}, got {policy!r}")
    if embeddings not in EMBEDDING_POLICIES:
        raise SkillPackError(f"embeddings must be one of {EMBEDDING_POLICIES}, got {embeddings!r}")
    if (budget is None) == (energy is None):
        raise SkillPackError("pass exactly one of budget=... (bytes, fraction or '5%') or energy=... (0 < beta <= 1)")
    widths = (bits,) if isinstance(bits, int) else tuple(int(b) for b in bits)
    if not widths or any(b not in Q.SUPPORTED_BITS for b in widths):
        raise SkillPackError(f"bits must be widths from {Q.SUPPORTED_BITS}, got {bits!r}")
    if not 0 < sparse_density <= 1:
        raise SkillPackError(f"sparse_density must be in (0, 1], got {sparse_density}")
    Q._check(min(widths), group_size)
    t_start = time.time()

    dense_bytes = sum(math.prod(it["shape"]) * DENSE_BYTES_PER_ELEMENT for it in items)
    entries: list[Entry] = []
    lowrank: list[dict] = []
    skipped: list[str] = []
    for it in items:
        shape = it["shape"]
        small = len(shape) < 2 or min(shape[0], math.prod(shape) // shape[0]) <= exact_max_dim
        if it["module_type"] == "embedding" and not small:
            if embeddings == "skip":
                skipped.append(it["name"])
                continue
            if embeddings == "exact":
                small = True
            elif embeddings == "sparse":
                d = it["delta"].reshape(-1)
                k = max(1, int(round(sparse_density * d.numel())))
                idx = torch.topk(d.abs(), k).indices.sort().values
                e = Entry(it["name"], "sparse", shape, it["dtype"], it["module_type"], it["module_class"],
                          {"idx": idx.to(torch.int32), "val": d[idx].half()})
                entries.append(e)
                continue
        if small:
            entries.append(Entry(it["name"], "exact", shape, it["dtype"], it["module_type"], it["module_class"],
                                 {"D": it["delta"].float().contiguous()}))
        else:
            lowrank.append(it)
    fixed_bytes = sum(e.nbytes for e in entries)

    # SVD of every low-rank candidate.
    svds = []
    for it in tqdm(lowrank, desc="skillpack: SVD", disable=not progress, leave=False):
        key = ("svd", it["name"])
        if cache is not None and key in cache:
            svds.append(cache[key])
            continue
        m = it["shape"][0]
        svds.append(_svd(it["delta"].reshape(m, -1)))
        if cache is not None:
            cache[key] = svds[-1]

    budget_bytes = None
    if budget is not None:
        budget_bytes = parse_budget(budget, dense_bytes)
        avail = budget_bytes - fixed_bytes
        if not lowrank:
            chosen, ok = [], avail >= 0
        else:
            chosen = _allocate(lowrank, svds, widths, group_size, avail, policy, progress, cache) if avail > 0 else None
            ok = chosen is not None and any(bool((c > 0).any()) for c in chosen)
        if not ok:
            cheapest = min((Q.column_bytes(it["shape"][0], min(widths), group_size)
                            + Q.column_bytes(math.prod(it["shape"]) // it["shape"][0], min(widths), group_size) + 4
                            for it in lowrank), default=0)
            raise BudgetTooSmallError(
                f"budget of {budget_bytes:,} bytes is too small: the exact small deltas (norms, biases, small "
                f"tensors{', embeddings' if embeddings in ('exact', 'sparse') else ''}) take {fixed_bytes:,} bytes "
                f"and the cheapest rank-1 {min(widths)}-bit component of any module takes {cheapest:,} more "
                f"(dense bf16 delta: {dense_bytes:,} bytes). Raise the budget (e.g. budget='5%').")
    else:
        chosen = []
        split = _bit_split(widths, bit_split)
        for (u, s, v) in svds:
            k = energy_rank(s, energy)
            b = torch.zeros(s.numel(), dtype=torch.long)
            start = 0
            for j, (w, frac) in enumerate(split):
                cnt = k - start if j == len(split) - 1 else min(k - start, max(1 if j == 0 else 0, round(frac * k)))
                b[start:start + cnt] = w
                start += cnt
            chosen.append(b)

    errors = {}
    for it, (u, s, v), b in tqdm(list(zip(lowrank, svds, chosen)), desc="skillpack: quantize", disable=not progress,
                                 leave=False):
        e = _lowrank_entry(it, u, s, v, b, group_size)
        d = it["delta"]
        if e is None:
            errors[it["name"]] = 1.0
            skipped.append(it["name"])
            continue
        e.rel_error = float((e.delta() - d).norm() / d.norm())
        entries.append(e)
    for e in entries:
        if e.rel_error is None:
            it = next(i for i in items if i["name"] == e.name)
            e.rel_error = float((e.delta() - it["delta"]).norm() / it["delta"].norm())
    entries.sort(key=lambda e: e.name)
    info = {"dense_bytes": dense_bytes, "budget_bytes": budget_bytes, "energy": energy, "policy": policy,
            "embeddings": embeddings, "bits": list(widths), "group_size": group_size, "exact_max_dim": exact_max_dim,
            "sparse_density": sparse_density if embeddings == "sparse" else None, "dropped": sorted(skipped),
            "dropped_errors": errors, "extract_s": round(time.time() - t_start, 2),
            "dropped_dense_bytes": sum(math.prod(i["shape"]) * DENSE_BYTES_PER_ELEMENT for i in items
                                       if i["name"] in set(skipped))}
    pack = SkillPack(entries, base_fingerprint, name=name, info=info)
    if budget_bytes is not None and pack.nbytes > budget_bytes:  # the allocator guarantees this; keep it checked
        raise SkillPackError(f"internal error: pack of {pack.nbytes} bytes exceeds the budget {budget_bytes}")
    return pack


def _svd(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        v, s, u = _svd(d.T.contiguous())
        return u, s, v
    dd = d.double()
    evals, evecs = torch.linalg.eigh(dd.T @ dd)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    keep = s > s[0] * 1e-7 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    s, v = s[keep].float(), evecs[:, keep].float().contiguous()
    u = (d @ v) / s
    return u.contiguous(), s, v


def _bit_split(widths, bit_split):
    if bit_split is None:
        if len(widths) == 1:
            return [(widths[0], 1.0)]
        ratio = dict(DEFAULT_BIT_SPLIT)
        split = [(w, ratio.get(w, 1.0 / len(widths))) for w in sorted(widths, reverse=True)]
    else:
        split = [(int(w), float(f)) for w, f in (bit_split.items() if isinstance(bit_split, dict) else bit_split)]
    if any(w not in Q.SUPPORTED_BITS or f < 0 for w, f in split):
        raise SkillPackError(f"bad bit_split {bit_split!r}: (bits, fraction) pairs with bits in {Q.SUPPORTED_BITS}")
    return split


def _allocate(lowrank, svds, widths, group_size, avail, policy, progress, cache=None):
    """Per-component bit width (0 = dropped) for every module, within ``avail`` bytes.

    Rate-distortion: component i of a module with singular value s_i costs c(b) bytes at b bits and leaves error
    ``s_i^2 * e_i(b)`` (e_i(0) = 1; e_i(b) is the exact relative error of the quantized rank-1 term). For a price
    lambda every component picks the b minimising ``s_i^2 e_i(b) + lambda c(b)``; lambda is bisected so that the
    total cost fits ``avail``. ``module-aware`` uses one lambda for all modules, ``uniform`` one per module with the
    module's share of ``avail`` proportional to its size.
    """
    if avail <= 0 or not lowrank:
        return None
    widths = sorted(set(widths), reverse=True)
    from tqdm.auto import tqdm

    tables = []  # per module: gain-relevant arrays
    for it, (u, s, v) in tqdm(list(zip(lowrank, svds)), desc="skillpack: error tables", disable=not progress,
                              leave=False):
        key = ("table", it["name"], tuple(widths), group_size)
        if cache is not None and key in cache:
            tables.append(cache[key])
            continue
        m, n = u.shape[0], v.shape[0]
        err = [torch.ones_like(s, dtype=torch.float64)]
        cost = [0.0]
        k = min(s.numel(), TABLE_COLUMNS)
        for b in widths:
            uq, vq = Q.roundtrip(u[:, :k], b, group_size), Q.roundtrip(v[:, :k], b, group_size)
            # ||u v^T - uq vq^T||^2 for unit u, v (SVD columns are unit-norm), exact for the leading k columns;
            # later columns (rarely bought, all unit vectors alike) get the mean of the last computed ones.
            e = (1 + (uq.pow(2).sum(0) * vq.pow(2).sum(0)) - 2 * (u[:, :k] * uq).sum(0)
                 * (v[:, :k] * vq).sum(0)).double().clamp_min(0)
            if k < s.numel():
                e = torch.cat([e, e[-32:].mean().expand(s.numel() - k)])
            err.append(e)
            cost.append(float(Q.column_bytes(m, b, group_size) + Q.column_bytes(n, b, group_size) + 4))
        s2 = s.double().pow(2)
        tables.append((s2, torch.stack(err, 1), torch.tensor(cost, dtype=torch.float64)))
        if cache is not None:
            cache[key] = tables[-1]

    def choose(lam, mods):
        total, picks = 0.0, []
        for j in mods:
            s2, err, cost = tables[j]
            obj = s2[:, None] * err + lam * cost[None, :]
            k = obj.argmin(1)
            picks.append(k)
            total += float(cost[k].sum())
        return total, picks

    def solve(mods, cap):
        lo, hi = -60.0, 60.0  # log10 lambda
        tot, picks = choose(10 ** hi, mods)
        if tot > cap:
            return None
        best = picks
        for _ in range(80):
            mid = (lo + hi) / 2
            tot, picks = choose(10 ** mid, mods)
            if tot <= cap:
                hi, best = mid, picks
            else:
                lo = mid
        return best

    options = torch.tensor([0] + widths)
    if policy == "module-aware":
        picks = solve(range(len(tables)), avail)
        if picks is None:
            return None
        return [options[k] for k in picks]
    sizes = [math.prod(it["shape"]) for it in lowrank]
    out = []
    for j, size in enumerate(sizes):
        picks = solve([j], avail * size / sum(sizes))
        out.append(options[picks[0]] if picks is not None else torch.zeros(tables[j][0].numel(), dtype=torch.long))
    return out


# ---------------------------------------------------------------------------------------------------- SkillPack
class SkillPack:
    """A compressed fine-tuning delta for one base model. Build with :meth:`extract`, :meth:`load` or
    :meth:`from_lora`; use with :meth:`apply` / :meth:`remove`, :meth:`save`, :func:`kd_plugins.skillpack.fuse`."""

    def __init__(self, entries: Iterable[Entry], base_fingerprint: str, *, name: str | None = None,
                 info: dict | None = None, pack_id: str | None = None):
        self.entries: dict[str, Entry] = {e.name: e for e in entries}
        self.base_fingerprint = base_fingerprint
        self.name = name
        self.info = dict(info or {})
        self.id = pack_id or uuid.uuid4().hex

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def extract(cls, base: nn.Module, finetuned: nn.Module, budget=None, *, energy: float | None = None,
                policy: str = "module-aware", embeddings: str = "lowrank", bits=(8, 4, 2), bit_split=None,
                group_size: int = 64, exact_max_dim: int = 16, sparse_density: float = 0.01,
                name: str | None = None, progress: bool = True) -> "SkillPack":
        """Extract ``finetuned - base`` and compress it module by module.

        Args:
            budget: total stored bytes: an int (bytes), a float in (0, 1] (fraction of the dense bf16 delta), or a
                string ("5%", "0.05", "20MB", "512KiB"). Exclusive with ``energy``.
            energy: per-module energy threshold beta in (0, 1] (rank = smallest k keeping beta of sum sigma^2).
            policy: ``"module-aware"`` (one global rate-distortion allocation of ranks and bit widths over all
                modules) or ``"uniform"`` (each matrix gets the budget share of its size). Budget mode only.
            embeddings: ``"lowrank"`` (like any matrix), ``"exact"`` (fp32 delta), ``"sparse"`` (largest
                ``sparse_density`` fraction of entries, fp16 values), ``"skip"`` (not stored).
            bits: allowed widths of the factor columns in budget mode (default 8, 4, 2; 16/32 = fp16/fp32 floats);
                an int forces one width. In energy mode the columns are split by ``bit_split``.
            bit_split: energy mode: ``[(bits, fraction), ...]`` of the kept columns, leading first (default
                GraftLLM's 2% 8-bit, 18% 4-bit, 80% 2-bit, at least one leading column).
            group_size: quantization group length along a column (one fp16 scale per group).
            exact_max_dim: matrices whose smaller side is at most this are stored exactly (like norms and biases).

        Neither model is modified. Raises :class:`ArchitectureMismatchError` for different parameter names or
        shapes and :class:`BudgetTooSmallError` when the budget cannot hold the exact deltas plus one component.
        """
        items = _collect_deltas(base, finetuned)
        return compress_deltas(items, model_fingerprint(base), budget=budget, energy=energy, policy=policy,
                               embeddings=embeddings, bits=bits, bit_split=bit_split, group_size=group_size,
                               exact_max_dim=exact_max_dim, sparse_density=sparse_density, name=name,
                               progress=progress)

    @classmethod
    def from_lora(cls, adapter_dir, base: nn.Module, **kwargs) -> "SkillPack":
        """Import a peft LoRA adapter directory as a SkillPack (see :func:`kd_plugins.skillpack.peft_io.import_lora`)."""
        from .peft_io import import_lora

        return import_lora(adapter_dir, base, **kwargs)

    def to_lora(self, out_dir, **kwargs) -> dict:
        """Export the low-rank part as a peft LoRA adapter (see :func:`kd_plugins.skillpack.peft_io.export_lora`)."""
        from .peft_io import export_lora

        return export_lora(self, out_dir, **kwargs)

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        """Stored bytes of all tensors (the safetensors file adds a small JSON header)."""
        return sum(e.nbytes for e in self.entries.values())

    @property
    def dense_bytes(self) -> int | None:
        return self.info.get("dense_bytes")

    def delta(self, name: str) -> torch.Tensor:
        return self.entries[name].delta()

    def deltas(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, e in self.entries.items():
            yield name, e.delta()

    def subset(self, kinds: Iterable[str] | None = None, names: Iterable[str] | None = None) -> "SkillPack":
        """A pack with only some entries (same base); e.g. ``subset(kinds=["lowrank"])``."""
        kinds = set(kinds) if kinds is not None else None
        names = set(names) if names is not None else None
        keep = [e for e in self.entries.values()
                if (kinds is None or e.kind in kinds) and (names is None or e.name in names)]
        return SkillPack(keep, self.base_fingerprint, name=self.name, info=dict(self.info, subset=True))

    def report(self) -> list[dict]:
        """Per-module rows: name, type, kind, shape, rank, bits, bytes, dense (bf16) bytes, relative error."""
        rows = []
        for e in self.entries.values():
            rows.append({"name": e.name, "module_type": e.module_type, "kind": e.kind, "shape": list(e.shape),
                         "rank": e.rank, "bits": e.bits_str(), "bytes": e.nbytes,
                         "dense_bytes": e.numel * DENSE_BYTES_PER_ELEMENT, "rel_error": e.rel_error})
        for n in self.info.get("dropped", []):
            rows.append({"name": n, "module_type": "", "kind": "dropped", "shape": [], "rank": 0, "bits": "",
                         "bytes": 0, "dense_bytes": None, "rel_error": 1.0})
        return rows

    def summary(self, per_module: bool = False) -> str:
        """Text report: totals, per module-type aggregates, and optionally every module."""
        lines = [f"SkillPack {self.name or self.id[:8]}: {len(self.entries)} tensors, {self.nbytes:,} bytes"]
        if self.dense_bytes:
            lines[0] += f" = {100 * self.nbytes / self.dense_bytes:.2f}% of the dense bf16 delta ({self.dense_bytes:,} B)"
        if self.info.get("budget_bytes"):
            lines.append(f"budget {self.info['budget_bytes']:,} bytes, policy {self.info.get('policy')}, "
                         f"embeddings {self.info.get('embeddings')}")
        agg: dict[str, list] = {}
        for e in self.entries.values():
            a = agg.setdefault(f"{e.module_type}/{e.kind}", [0, 0, 0, 0.0, 0.0])
            a[0] += 1
            a[1] += e.nbytes
            a[2] += e.numel * DENSE_BYTES_PER_ELEMENT
            a[3] += (e.rel_error or 0.0) ** 2 * e.numel
            a[4] += e.numel
        lines.append(f"{'type/kind':<22} {'tensors':>7} {'bytes':>13} {'of dense':>9} {'rel err (rms)':>13}")
        for k in sorted(agg):
            n, b, d, se, w = agg[k]
            lines.append(f"{k:<22} {n:>7} {b:>13,} {100 * b / d:>8.2f}% {math.sqrt(se / w):>13.4f}")
        if self.info.get("dropped"):
            lines.append(f"dropped (not stored): {len(self.info['dropped'])} tensors")
        if per_module:
            lines.append(f"{'name':<48} {'kind':<8} {'rank':>5} {'bits':<22} {'bytes':>11} {'rel err':>8}")
            for r in self.report():
                lines.append(f"{r['name']:<48} {r['kind']:<8} {r['rank']:>5} {r['bits']:<22} {r['bytes']:>11,} "
                             f"{r['rel_error'] if r['rel_error'] is not None else float('nan'):>8.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"SkillPack(name={self.name!r}, tensors={len(self.entries)}, bytes={self.nbytes:,}, "
                f"base={self.base_fingerprint[:19]}...)")

    # --------------------------------------------------------------------------------------- apply / remove
    def _check_target(self, model: nn.Module, strict: bool) -> dict[str, torch.Tensor]:
        tensors = model_tensors(model)
        missing = [n for n in self.entries if n not in tensors]
        bad = [(n, self.entries[n].shape, tuple(tensors[n].shape)) for n in self.entries
               if n in tensors and tuple(tensors[n].shape) != tuple(self.entries[n].shape)]
        if missing or bad:
            raise ArchitectureMismatchError(
                f"this SkillPack does not fit {type(model).__name__}: {len(missing)} tensors missing (e.g. "
                f"{missing[:3]}), {len(bad)} with other shapes (e.g. {bad[:3]}). The model was not changed.")
        fp = model_fingerprint(model)
        if fp != self.base_fingerprint:
            msg = (f"model fingerprint {fp[:23]}... differs from the pack's base {self.base_fingerprint[:23]}...: "
                   f"this is not the base model the pack was extracted from (other weights, dtype or architecture)")
            if strict:
                raise FingerprintMismatchError(msg + ". The model was not changed; pass strict=False to apply anyway.")
            warnings.warn(msg + "; applying anyway (strict=False).", stacklevel=3)
        return tensors, fp

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0, *, strict: bool = True) -> nn.Module:
        """Add ``scale x delta`` to ``model`` in place and return it.

        The model must be the pack's base (fingerprint check; ``strict=False`` downgrades a mismatch to a warning)
        with every tensor the pack touches. Several packs can be applied; the base values of touched tensors are kept
        so that :meth:`remove` restores them bit for bit. Nothing is changed when a check fails.
        """
        tensors, fp = self._check_target(model, strict)
        state = getattr(model, _STATE_ATTR, None)
        if state is not None and any(p is self for p, _ in state["applied"]):
            raise SkillPackError("this SkillPack is already applied to the model; remove() it first")
        created = state is None
        if created:
            state = {"base_fingerprint": fp, "snapshot": {}, "applied": []}
        new_snap = []
        try:
            for name, e in self.entries.items():
                t = tensors[name]
                if name not in state["snapshot"]:
                    state["snapshot"][name] = t.detach().clone()
                    new_snap.append(name)
                t.copy_((t.float() + scale * e.delta().to(t.device)).to(t.dtype))
        except BaseException:
            for name in self.entries:
                if name in state["snapshot"]:
                    tensors[name].copy_(state["snapshot"][name])
            for name in new_snap:
                state["snapshot"].pop(name, None)
            for p, s in state["applied"]:
                p._add(tensors, s, only=set(self.entries))
            raise
        state["applied"].append((self, float(scale)))
        if created:
            object.__setattr__(model, _STATE_ATTR, state)
        return model

    def _add(self, tensors, scale, only=None):
        for name, e in self.entries.items():
            if only is None or name in only:
                t = tensors[name]
                t.copy_((t.float() + scale * e.delta().to(t.device)).to(t.dtype))

    @torch.no_grad()
    def remove(self, model: nn.Module) -> nn.Module:
        """Take this pack off ``model``: the touched tensors are restored to their saved base values bit for bit and
        the packs still applied are added again in order."""
        state = getattr(model, _STATE_ATTR, None)
        if state is None or not any(p is self for p, _ in state["applied"]):
            raise SkillPackError("this SkillPack is not applied to the model")
        tensors = model_tensors(model)
        for name, base_value in state["snapshot"].items():
            tensors[name].copy_(base_value)
        state["applied"] = [(p, s) for p, s in state["applied"] if p is not self]
        for p, s in state["applied"]:
            p._add(tensors, s)
        if not state["applied"]:
            object.__delattr__(model, _STATE_ATTR)
        return model

    # --------------------------------------------------------------------------------------------- save / load
    def manifest(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "id": self.id, "name": self.name,
                "base_fingerprint": self.base_fingerprint, "nbytes": self.nbytes, "info": self.info,
                "entries": [e.meta() for e in self.entries.values()]}

    def save(self, out_dir, overwrite: bool = False) -> Path:
        """Write ``<out_dir>/skillpack.safetensors`` + ``manifest.json`` (per-tensor sha256, base fingerprint,
        report) atomically: everything goes to a temporary sibling directory that is renamed into place."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{e.name}::{role}": t.contiguous() for e in self.entries.values() for role, t in e.tensors.items()}
        manifest = self.manifest()
        manifest["checksums"] = {k: _tensor_sha256(t) for k, t in flat.items()}
        manifest["report"] = self.report()
        with atomic_dir(out) as tmp:
            save_file(flat, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "id": self.id})
            manifest["file_bytes"] = (tmp / TENSORS_FILE).stat().st_size
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        return out

    @classmethod
    def load(cls, pack_dir, verify: bool = True) -> "SkillPack":
        """Read a pack written by :meth:`save`; with ``verify`` every tensor's sha256 is checked
        (:class:`IntegrityError` on any mismatch, a truncated file or a missing tensor)."""
        from safetensors.torch import load_file

        d = Path(pack_dir)
        mpath, tpath = d / MANIFEST_FILE, d / TENSORS_FILE
        if not mpath.is_file() or not tpath.is_file():
            raise IntegrityError(f"{d} is not a SkillPack directory (needs {MANIFEST_FILE} and {TENSORS_FILE})")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IntegrityError(f"{mpath} is not valid JSON ({e}); the pack is corrupt") from None
        if manifest.get("format") != FORMAT:
            raise IntegrityError(f"{mpath} is not a SkillPack manifest (format {manifest.get('format')!r})")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise SkillPackError(f"pack format version {manifest['version']} is newer than this library "
                                 f"({FORMAT_VERSION}); upgrade kd_plugins")
        size = tpath.stat().st_size
        if "file_bytes" in manifest and size != manifest["file_bytes"]:
            raise IntegrityError(f"{tpath} has {size:,} bytes, the manifest says {manifest['file_bytes']:,}: the file "
                                 "is truncated or corrupt")
        try:
            flat = load_file(str(tpath))
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise IntegrityError(f"cannot read {tpath} ({type(e).__name__}: {e}); the file is truncated or corrupt") \
                from None
        sums = manifest.get("checksums", {})
        expected = {f"{m['name']}::{r}" for m in manifest["entries"] for r in m["tensors"]}
        if set(flat) != expected or set(sums) != expected:
            raise IntegrityError(f"{tpath} holds tensors {len(flat)} that do not match the manifest ({len(expected)}): "
                                 f"missing {sorted(expected - set(flat))[:3]}, extra {sorted(set(flat) - expected)[:3]}")
        if verify:
            for k, t in flat.items():
                if _tensor_sha256(t) != sums[k]:
                    raise IntegrityError(f"checksum mismatch for tensor {k!r} in {tpath}: the pack is corrupt")
        entries = []
        for m in manifest["entries"]:
            tensors = {r: flat[f"{m['name']}::{r}"] for r in m["tensors"]}
            entries.append(Entry(m["name"], m["kind"], tuple(m["shape"]), m["dtype"], m["module_type"],
                                 m.get("module_class", ""), tensors, [tuple(g) for g in m["groups"]],
                                 m["group_size"], m.get("rel_error")))
        return cls(entries, manifest["base_fingerprint"], name=manifest.get("name"), info=manifest.get("info"),
                   pack_id=manifest.get("id"))


def applied_packs(model: nn.Module) -> list[tuple[SkillPack, float]]:
    """``[(pack, scale), ...]`` currently applied to ``model`` (in order)."""
    state = getattr(model, _STATE_ATTR, None)
    return list(state["applied"]) if state else []
