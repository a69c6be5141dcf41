"""The peft LoRA adapter format, read into and written from SkillPack entries (no :class:`SkillPack` here; the public
functions are :func:`kd_plugins.skillpack.peft_io.export_lora` / :func:`~kd_plugins.skillpack.peft_io.import_lora`).

Export: every ``lowrank`` entry on an ``nn.Linear`` weight becomes ``lora_B = U diag(S)`` ``[out, r]`` and
``lora_A = V^T`` ``[r, in]`` (de-quantized, fp32), with per-module ranks in ``rank_pattern`` and
``alpha_pattern = rank`` so that peft's scaling ``alpha / r`` is 1. Exact / sparse entries (norms, biases,
embeddings) have no LoRA form and are listed as skipped.

Import: ``delta W = scaling * B A`` (``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; per-module rank
and alpha from ``rank_pattern`` / ``alpha_pattern``), re-factored exactly into ``U diag(S) V^T`` by two thin QR
decompositions and an r x r SVD, then stored at ``bits``, or handed back as dense deltas to re-compress.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._checkpoint import atomic_dir
from . import quant as Q
from .entry import Entry
from .errors import ArchitectureMismatchError, SkillPackError
from .fingerprint import model_tensors

PREFIX = "base_model.model."
_ATTENTION_NAME = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value")


# --------------------------------------------------------------------------------------------------------- export
def write_lora_adapter(
    entries: Iterable[Entry], out_dir, base_model_name_or_path: str | None = None, overwrite: bool = False
) -> dict:
    """Write a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the low-rank
    entries on Linear layers. Returns ``{"modules": [...], "skipped": [...], "max_rank": r}``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    tensors, ranks, skipped = {}, {}, []
    for e in sorted(entries, key=lambda e: e.name):
        if e.kind != "lowrank" or e.module_class != "Linear" or not e.name.endswith(".weight") or len(e.shape) != 2:
            skipped.append(e.name)
            continue
        module = e.name[: -len(".weight")]
        u, s, v = e.factors()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = v.T.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (u * s).contiguous()
        ranks[module] = int(s.numel())
    if not ranks:
        raise SkillPackError("the pack has no low-rank entries on nn.Linear weights: nothing to export as LoRA")
    r_max = max(ranks.values())
    pattern = {re.escape(m): r for m, r in ranks.items()}
    cfg = LoraConfig(
        r=r_max,
        lora_alpha=r_max,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
    )
    with atomic_dir(out) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"modules": sorted(ranks), "skipped": skipped, "max_rank": r_max}


# --------------------------------------------------------------------------------------------------------- import
@dataclass
class LoraModule:
    """One adapted weight: ``delta = scaling * (b @ a)`` and the fields of its delta item / entry."""

    meta: dict  # name, shape, dtype, module_type, module_class
    a: torch.Tensor  # [r, n]
    b: torch.Tensor  # [m, r]
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.b @ self.a)


def _pattern_value(patterns: dict, key: str, default):
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return val
    return default


def _factor(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD factors of ``b @ a`` (b [m, r], a [r, n]) without forming the product."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u2, s, v2h = torch.linalg.svd(rb @ ra.T)
    return (qb @ u2).float(), s.float(), (qa @ v2h.T).float()


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json`` of a plain LoRA adapter (other peft types, DoRA and fan_in_fan_out are refused)."""
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise SkillPackError(f"{adapter_dir} has no adapter_config.json: not a peft adapter directory")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SkillPackError(f"only LoRA adapters can be imported, {adapter_dir} is {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise SkillPackError("DoRA adapters are not supported (their delta is not B @ A)")
    if cfg.get("fan_in_fan_out"):
        raise SkillPackError("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    return cfg


def read_adapter_pairs(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"lora_A"/"lora_B"/"lora_embedding_A"/"lora_embedding_B": tensor}}`` from the adapter weights."""
    from safetensors.torch import load_file

    wfile = adapter_dir / "adapter_model.safetensors"
    if wfile.is_file():
        weights = load_file(str(wfile))
    elif (adapter_dir / "adapter_model.bin").is_file():
        weights = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise SkillPackError(f"{adapter_dir} has no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in weights.items():
        m = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
            r"(?:\.[^.]+)?(?:\.weight)?",
            k,
        )
        if not m:
            raise SkillPackError(f"unsupported adapter tensor {k!r} (only LoRA A/B matrices can be imported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    return pairs


def _lora_module(
    module: str, ab: dict[str, torch.Tensor], cfg: dict, tensors: dict, modules: dict, base: nn.Module
) -> LoraModule:
    pname = f"{module}.weight"
    if pname not in tensors:
        raise ArchitectureMismatchError(
            f"the adapter targets {module}, which the base model {type(base).__name__} does not have"
        )
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if "lora_A" in ab:
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
    else:  # embedding LoRA: delta = (B @ A)^T
        a, b = ab["lora_embedding_B"].float().T, ab["lora_embedding_A"].float().T
    shape = tuple(tensors[pname].shape)
    if (b.shape[0], a.shape[1]) != shape:
        raise ArchitectureMismatchError(
            f"adapter for {module} gives a {b.shape[0]}x{a.shape[1]} delta, the base weight is {shape}"
        )
    mod = modules.get(module)
    kind = "embedding" if isinstance(mod, nn.Embedding) else "attention" if _ATTENTION_NAME.search(module) else "mlp"
    meta = {
        "name": pname,
        "shape": shape,
        "dtype": str(tensors[pname].dtype).replace("torch.", ""),
        "module_type": kind,
        "module_class": type(mod).__name__ if mod is not None else "",
    }
    return LoraModule(meta, a, b, scaling)


def read_lora_modules(adapter_dir, base: nn.Module) -> tuple[list[LoraModule], dict]:
    """The adapted weights of the LoRA adapter in ``adapter_dir``, checked against ``base`` (names and shapes), and
    the adapter's ``r`` / ``lora_alpha``."""
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    pairs = read_adapter_pairs(d)
    tensors, modules = model_tensors(base), dict(base.named_modules())
    out = [_lora_module(module, ab, cfg, tensors, modules, base) for module, ab in sorted(pairs.items())]
    return out, {"lora_r": cfg.get("r", 8), "lora_alpha": cfg.get("lora_alpha", 8)}


def factored_entry(lm: LoraModule, bits: int, group_size: int) -> Entry | None:
    """A lowrank entry holding ``lm``'s delta exactly refactored, its columns stored at ``bits``; None if zero."""
    u, s, v = _factor(lm.b * lm.scaling, lm.a)
    keep = s > 0
    u, s, v = u[:, keep], s[keep], v[:, keep]
    if s.numel() == 0:
        return None
    t = {"S": s.contiguous()}
    for role, fac in (("U", u), ("V", v)):
        for k, q in Q.quantize_tensor(fac, bits, group_size).items():
            t[f"{role}0.{k}"] = q
    meta = lm.meta
    e = Entry(
        meta["name"],
        "lowrank",
        meta["shape"],
        meta["dtype"],
        meta["module_type"],
        meta["module_class"],
        t,
        [(bits, int(s.numel()))],
        group_size,
    )
    full = lm.delta()
    e.rel_error = float((e.delta() - full).norm() / full.norm().clamp_min(1e-30))
    return e
