"""Collect a fine-tune's weight delta, tensor by tensor, with what kind of module each tensor belongs to."""

from __future__ import annotations

import re
from typing import TypedDict

import torch
from torch import nn

from .errors import ArchitectureMismatchError, SkillPackError
from .fingerprint import model_tensors


class DeltaItem(TypedDict):
    """One changed tensor: ``delta`` (float32, CPU) = fine-tuned - base, plus what the compressor needs to know."""

    name: str
    delta: torch.Tensor
    shape: tuple[int, ...]
    dtype: str
    module_type: str  # attention | mlp | embedding | norm | bias | other
    module_class: str


def module_type(name: str, module: nn.Module | None, t: torch.Tensor, output_embedding: bool) -> str:
    """Coarse role of parameter ``name`` (owned by ``module``), from its class and name."""
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


def _check_same_architecture(base: nn.Module, finetuned: nn.Module, tb: dict, tf: dict) -> None:
    missing, extra = sorted(set(tb) - set(tf)), sorted(set(tf) - set(tb))
    if missing or extra:
        raise ArchitectureMismatchError(
            f"base ({type(base).__name__}) and fine-tuned ({type(finetuned).__name__}) models have different "
            f"parameters: {len(missing)} only in base (e.g. {missing[:3]}), {len(extra)} only in fine-tuned "
            f"(e.g. {extra[:3]}). A SkillPack needs the same architecture on both sides."
        )
    bad = [(n, tuple(tb[n].shape), tuple(tf[n].shape)) for n in sorted(tb) if tb[n].shape != tf[n].shape]
    if bad:
        raise ArchitectureMismatchError(
            f"{len(bad)} parameter shapes differ between base and fine-tuned, e.g. "
            + "; ".join(f"{n}: {a} vs {b}" for n, a, b in bad[:3])
        )


def _output_embedding(model: nn.Module) -> torch.Tensor | None:
    try:
        oe = model.get_output_embeddings()
        return oe.weight if oe is not None else None
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without output embeddings
        return None


def collect_deltas(base: nn.Module, finetuned: nn.Module) -> list[DeltaItem]:
    """``finetuned - base`` for every floating tensor that changed, sorted by name. Neither model is modified.

    Raises :class:`ArchitectureMismatchError` for different tensor names or shapes and :class:`SkillPackError` for
    the same model object, non-finite deltas or no change at all."""
    if base is finetuned:
        raise SkillPackError("base and finetuned are the same model object; pass the base and the fine-tuned model")
    tb, tf = model_tensors(base), model_tensors(finetuned)
    _check_same_architecture(base, finetuned, tb, tf)
    modules = dict(base.named_modules())
    out_emb = _output_embedding(base)
    items: list[DeltaItem] = []
    for name in sorted(tb):
        a, b = tb[name].detach(), tf[name].detach()
        if not a.is_floating_point():
            continue
        d = b.to("cpu", torch.float32) - a.to("cpu", torch.float32)
        if not torch.isfinite(d).all():
            raise SkillPackError(f"non-finite values in the delta of {name}")
        if not torch.any(d != 0):
            continue
        module = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
        is_out_emb = out_emb is not None and tb[name] is out_emb
        items.append(
            {
                "name": name,
                "delta": d,
                "shape": tuple(d.shape),
                "dtype": str(a.dtype).replace("torch.", ""),
                "module_type": module_type(name, module, d, is_out_emb),
                "module_class": type(module).__name__ if module is not None else "",
            }
        )
    if not items:
        raise SkillPackError("the fine-tuned model is identical to the base: no delta to pack")
    return items
