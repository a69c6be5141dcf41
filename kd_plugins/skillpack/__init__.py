"""GraftLLM SkillPacks: extract a fine-tune's weight delta, compress it module by module (low-rank SVD with
mixed-precision quantized factors; small deltas exact), save / load it with checksums, apply / remove it on the base
model, fuse several (task arithmetic, TIES, router), and convert to / from peft LoRA adapters.

    from kd_plugins.skillpack import SkillPack, fuse, load_skillpack, save_skillpack
    pack = SkillPack.extract(base, finetuned, budget="5%")      # or energy=0.9, or a SkillPackConfig
    print(pack.summary())
    save_skillpack(pack, "packs/austen")                        # = pack.save("packs/austen")
    pack = load_skillpack("packs/austen")                       # = SkillPack.load("packs/austen")
    pack.apply(base)          # base now ~= finetuned;  pack.remove(base) restores it bit for bit
"""

from .apply import applied_packs
from .budget import parse_budget
from .config import SkillPackConfig
from .entry import Entry
from .errors import (
    ArchitectureMismatchError,
    BudgetTooSmallError,
    FingerprintMismatchError,
    IntegrityError,
    SkillPackError,
)
from .fingerprint import model_fingerprint
from .fuse import RoutedSkillPacks, SkillRouter, fuse, ties_merge_tensors
from .lowrank import energy_rank
from .pack import SkillPack, compress_deltas, load_skillpack, save_skillpack
from .peft_io import export_lora, import_lora

__all__ = [
    "SkillPack",
    "SkillPackConfig",
    "Entry",
    "save_skillpack",
    "load_skillpack",
    "compress_deltas",
    "fuse",
    "RoutedSkillPacks",
    "SkillRouter",
    "ties_merge_tensors",
    "export_lora",
    "import_lora",
    "model_fingerprint",
    "energy_rank",
    "parse_budget",
    "applied_packs",
    "SkillPackError",
    "ArchitectureMismatchError",
    "FingerprintMismatchError",
    "IntegrityError",
    "BudgetTooSmallError",
]
