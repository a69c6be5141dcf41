"""peft interop: a SkillPack's low-rank part as a LoRA adapter, and a LoRA adapter as a SkillPack.

Export: every ``lowrank`` entry on an ``nn.Linear`` weight becomes ``lora_B = U diag(S)`` ``[out, r]`` and
``lora_A = V^T`` ``[r, in]`` (de-quantized, fp32), with per-module ranks in ``rank_pattern`` and
``alpha_pattern = rank`` so that peft's scaling ``alpha / r`` is 1. Exact / sparse entries (norms, biases,
embeddings) have no LoRA form and are listed as skipped. ``PeftModel.from_pretrained(base, out_dir)`` then computes
``W x + B A x``, the same function as ``pack.subset(kinds=["lowrank"])`` applied to the base.

Import: ``delta W = scaling * B A`` (``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; per-module rank
and alpha from ``rank_pattern`` / ``alpha_pattern``), re-factored exactly into ``U diag(S) V^T`` by two thin QR
decompositions and an r x r SVD, then stored at ``bits`` (default fp32: lossless) or re-compressed with ``budget``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from .._atomic import atomic_dir
from .core import Entry, SkillPack, compress_deltas, model_fingerprint, model_tensors
from .errors import ArchitectureMismatchError, SkillPackError
from . import quant as Q

PREFIX = "base_model.model."


def export_lora(pack: SkillPack, out_dir, base_model_name_or_path: str | None = None, overwrite: bool = False) -> dict:
    """Write a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the pack's low-rank
    entries on Linear layers. Returns ``{"modules": [...], "skipped": [...], "max_rank": r}``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    tensors, ranks, skipped = {}, {}, []
    for name, e in sorted(pack.entries.items()):
        if e.kind != "lowrank" or e.module_class != "Linear" or not name.endswith(".weight") or len(e.shape) != 2:
            skipped.append(name)
            continue
        module = name[: -len(".weight")]
        u, s, v = e.factors()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = v.T.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (u * s).contiguous()
        ranks[module] = int(s.numel())
    if not ranks:
        raise SkillPackError("the pack has no low-rank entries on nn.Linear weights: nothing to export as LoRA")
    r_max = max(ranks.values())
    pattern = {re.escape(m): r for m, r in ranks.items()}
    cfg = LoraConfig(r=r_max, lora_alpha=r_max, target_modules=sorted(ranks), rank_pattern=pattern,
                     alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
                     base_model_name_or_path=base_model_name_or_path)
    with atomic_dir(out) as tmp:
        cfg.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"modules": sorted(ranks), "skipped": skipped, "max_rank": r_max}


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


def import_lora(adapter_dir, base: nn.Module, *, bits: int = 32, budget=None, energy: float | None = None,
                name: str | None = None, group_size: int = 64, **compress_kwargs) -> SkillPack:
    """A SkillPack holding the LoRA adapter in ``adapter_dir`` as deltas of ``base`` (which must be the adapter's
    base model: names and shapes are checked; the pack's fingerprint is ``base``'s).

    By default the factors are stored in fp32 (``bits=32``, lossless; ``bits=8/4/2/16`` quantizes every column at
    that width); ``budget=`` / ``energy=`` instead re-compress the dense deltas with :meth:`SkillPack.extract` rules.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise SkillPackError(f"{d} has no adapter_config.json: not a peft adapter directory")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SkillPackError(f"only LoRA adapters can be imported, {d} is {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise SkillPackError("DoRA adapters are not supported (their delta is not B @ A)")
    if cfg.get("fan_in_fan_out"):
        raise SkillPackError("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    wfile = d / "adapter_model.safetensors"
    if wfile.is_file():
        weights = load_file(str(wfile))
    elif (d / "adapter_model.bin").is_file():
        weights = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise SkillPackError(f"{d} has no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.[^.]+)?(?:\.weight)?", k)
        if not m:
            raise SkillPackError(f"unsupported adapter tensor {k!r} (only LoRA A/B matrices can be imported)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    tensors = model_tensors(base)
    modules = dict(base.named_modules())
    r_def, a_def = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    items, entries = [], []
    for module, ab in sorted(pairs.items()):
        pname = f"{module}.weight"
        if pname not in tensors:
            raise ArchitectureMismatchError(f"the adapter targets {module}, which the base model "
                                            f"{type(base).__name__} does not have")
        r = _pattern_value(cfg.get("rank_pattern"), module, r_def)
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, a_def)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if "lora_A" in ab:
            a, b = ab["lora_A"].float(), ab["lora_B"].float()
        else:  # embedding LoRA: delta = (B @ A)^T
            a, b = ab["lora_embedding_B"].float().T, ab["lora_embedding_A"].float().T
        shape = tuple(tensors[pname].shape)
        if (b.shape[0], a.shape[1]) != shape:
            raise ArchitectureMismatchError(f"adapter for {module} gives a {b.shape[0]}x{a.shape[1]} delta, the base "
                                            f"weight is {shape}")
        mod = modules.get(module)
        meta = {"name": pname, "shape": shape, "dtype": str(tensors[pname].dtype).replace("torch.", ""),
                "module_type": "embedding" if isinstance(mod, nn.Embedding) else "attention"
                if re.search(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value", module) else "mlp",
                "module_class": type(mod).__name__ if mod is not None else ""}
        if budget is not None or energy is not None:
            items.append(dict(meta, delta=scaling * (b @ a)))
            continue
        u, s, v = _factor(b * scaling, a)
        keep = s > 0
        u, s, v = u[:, keep], s[keep], v[:, keep]
        if s.numel() == 0:
            continue
        t = {"S": s.contiguous()}
        for role, fac in (("U", u), ("V", v)):
            for k2, q in Q.quantize(fac, bits, group_size).items():
                t[f"{role}0.{k2}"] = q
        e = Entry(pname, "lowrank", shape, meta["dtype"], meta["module_type"], meta["module_class"], t,
                  [(bits, int(s.numel()))], group_size)
        full = scaling * (b @ a)
        e.rel_error = float((e.delta() - full).norm() / full.norm().clamp_min(1e-30))
        entries.append(e)
    fp = model_fingerprint(base)
    info = {"imported_from": str(d), "lora_r": r_def, "lora_alpha": a_def}
    if items:
        pack = compress_deltas(items, fp, budget=budget, energy=energy, name=name or d.name, group_size=group_size,
                               **compress_kwargs)
        pack.info.update(info)
        return pack
    info["dense_bytes"] = sum(e.numel * 2 for e in entries)
    return SkillPack(entries, fp, name=name or d.name, info=info)
