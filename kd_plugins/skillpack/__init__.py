"""GraftLLM SkillPacks: extract a fine-tune's weight delta, compress it module by module (low-rank SVD with
mixed-precision quantized factors; small deltas exact), save / load it with checksums, apply / remove it on the base
model, fuse several (task arithmetic, TIES, router), and convert to / from peft LoRA adapters.

    from kd_plugins.skillpack import SkillPack, fuse
    pack = SkillPack.extract(base, finetuned, budget="5%")      # or energy=0.9
    print(pack.summary())
    pack.save("packs/austen")
    pack = SkillPack.load("packs/austen")
    pack.apply(base)          # base now ~= finetuned;  pack.remove(base) restores it bit for bit
"""

from .core import Entry, SkillPack, applied_packs, energy_rank, model_fingerprint, parse_budget
from .errors import (ArchitectureMismatchError, BudgetTooSmallError, FingerprintMismatchError, IntegrityError,
                     SkillPackError)
from .fuse import RoutedSkillPacks, SkillRouter, fuse, ties_merge_tensors
from .peft_io import export_lora, import_lora

__all__ = [
    "SkillPack", "Entry", "fuse", "RoutedSkillPacks", "SkillRouter", "ties_merge_tensors", "export_lora",
    "import_lora", "model_fingerprint", "energy_rank", "parse_budget", "applied_packs", "SkillPackError",
    "ArchitectureMismatchError", "FingerprintMismatchError", "IntegrityError", "BudgetTooSmallError",
]
