"""peft interop: a SkillPack's low-rank part as a LoRA adapter, and a LoRA adapter as a SkillPack.

Export: every ``lowrank`` entry on an ``nn.Linear`` weight becomes ``lora_B = U diag(S)`` ``[out, r]`` and
``lora_A = V^T`` ``[r, in]`` (de-quantized, fp32), with per-module ranks in ``rank_pattern`` and
``alpha_pattern = rank`` so that peft's scaling ``alpha / r`` is 1. Exact / sparse entries (norms, biases,
embeddings) have no LoRA form and are listed as skipped. ``PeftModel.from_pretrained(base, out_dir)`` then computes
``W x + B A x``, the same function as ``pack.subset(kinds=["lowrank"])`` applied to the base.

Import: ``delta W = scaling * B A`` (``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA; per-module rank
and alpha from ``rank_pattern`` / ``alpha_pattern``), re-factored exactly into ``U diag(S) V^T`` by two thin QR
decompositions and an r x r SVD, then stored at ``bits`` (default fp32: lossless) or re-compressed with ``budget``.

The format code is in :mod:`kd_plugins.skillpack.lora`; these are the public functions, equal to
:meth:`SkillPack.to_lora` and :meth:`SkillPack.from_lora`.
"""

from __future__ import annotations

from torch import nn

from .lora import PREFIX
from .pack import SkillPack

__all__ = ["export_lora", "import_lora", "PREFIX"]


def export_lora(pack: SkillPack, out_dir, base_model_name_or_path: str | None = None, overwrite: bool = False) -> dict:
    """Write a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the pack's low-rank
    entries on Linear layers. Returns ``{"modules": [...], "skipped": [...], "max_rank": r}``."""
    return pack.to_lora(out_dir, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)


def import_lora(
    adapter_dir,
    base: nn.Module,
    *,
    bits: int = 32,
    budget=None,
    energy: float | None = None,
    name: str | None = None,
    group_size: int = 64,
    **compress_overrides,
) -> SkillPack:
    """A SkillPack holding the LoRA adapter in ``adapter_dir`` as deltas of ``base`` (which must be the adapter's
    base model: names and shapes are checked; the pack's fingerprint is ``base``'s).

    By default the factors are stored in fp32 (``bits=32``, lossless; ``bits=8/4/2/16`` quantizes every column at
    that width); ``budget=`` / ``energy=`` instead re-compress the dense deltas with :meth:`SkillPack.extract` rules.
    """
    return SkillPack.from_lora(
        adapter_dir,
        base,
        bits=bits,
        budget=budget,
        energy=energy,
        name=name,
        group_size=group_size,
        **compress_overrides,
    )
