"""``kd-plugins skillpack``: extract / apply / info / export-lora.

    kd-plugins skillpack extract BASE_DIR FINETUNED_DIR OUT_DIR --budget 5%      (or --energy 0.9)
    kd-plugins skillpack apply PACK_DIR BASE_DIR OUT_DIR [--scale 1.0]
    kd-plugins skillpack info PACK_DIR [--modules]
    kd-plugins skillpack export-lora PACK_DIR OUT_DIR

Model directories are Hugging Face ``save_pretrained`` folders; they load with the class named in their config's
``architectures`` (override with ``--auto-class``, e.g. ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def _load_model(path: str, auto_class: str | None):
    import transformers

    if auto_class:
        cls = getattr(transformers, auto_class, None)
        if cls is None:
            raise SystemExit(f"unknown transformers class {auto_class!r}")
    else:
        cfg = transformers.AutoConfig.from_pretrained(path)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    return cls.from_pretrained(path).eval()


def _bits(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",") if b.strip())


def _budget(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def skillpack_main(argv: list[str]) -> int:
    """Entry point of ``kd-plugins skillpack``; returns the exit status."""
    from .core import SkillPack
    from .errors import SkillPackError

    p = argparse.ArgumentParser(prog="kd-plugins skillpack", description="GraftLLM SkillPacks (see "
                                "kd_plugins.skillpack).")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="compress FINETUNED - BASE into a SkillPack directory")
    ex.add_argument("base")
    ex.add_argument("finetuned")
    ex.add_argument("out")
    g = ex.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="bytes (int), fraction of the dense bf16 delta (0.05), '5%%', '20MB'")
    g.add_argument("--energy", type=float, help="per-module energy threshold beta in (0, 1]")
    ex.add_argument("--policy", default="module-aware", choices=["module-aware", "uniform"])
    ex.add_argument("--embeddings", default="lowrank", choices=["lowrank", "exact", "sparse", "skip"])
    ex.add_argument("--bits", default="8,4,2", help="allowed factor widths, e.g. 8,4,2 or 8")
    ex.add_argument("--group-size", type=int, default=64)
    ex.add_argument("--sparse-density", type=float, default=0.01)
    ex.add_argument("--name", default=None)
    ex.add_argument("--auto-class", default=None)
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--modules", action="store_true", help="print every module's row")

    ap = sub.add_parser("apply", help="add a pack to BASE and save the result to OUT")
    ap.add_argument("pack")
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--no-strict", action="store_true", help="apply even if the base fingerprint differs")
    ap.add_argument("--auto-class", default=None)

    inf = sub.add_parser("info", help="verify a pack and print its report")
    inf.add_argument("pack")
    inf.add_argument("--modules", action="store_true")

    el = sub.add_parser("export-lora", help="write the pack's low-rank part as a peft LoRA adapter")
    el.add_argument("pack")
    el.add_argument("out")
    el.add_argument("--overwrite", action="store_true")

    args = p.parse_args(argv)
    try:
        if args.cmd == "extract":
            base = _load_model(args.base, args.auto_class)
            ft = _load_model(args.finetuned, args.auto_class)
            kw = dict(policy=args.policy, embeddings=args.embeddings, bits=_bits(args.bits),
                      group_size=args.group_size, sparse_density=args.sparse_density, name=args.name)
            if args.budget is not None:
                pack = SkillPack.extract(base, ft, budget=_budget(args.budget), **kw)
            else:
                pack = SkillPack.extract(base, ft, energy=args.energy, **kw)
            pack.save(args.out, overwrite=args.overwrite)
            print(pack.summary(per_module=args.modules))
            print(f"saved to {args.out}")
        elif args.cmd == "apply":
            pack = SkillPack.load(args.pack)
            model = _load_model(args.base, args.auto_class)
            pack.apply(model, scale=args.scale, strict=not args.no_strict)
            model.save_pretrained(args.out)
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                      "merges.txt", "vocab.json"):
                src = Path(args.base) / f
                if src.is_file():
                    shutil.copy(src, Path(args.out) / f)
            print(f"applied {pack!r} (scale {args.scale}) to {args.base}; saved to {args.out}")
        elif args.cmd == "info":
            pack = SkillPack.load(args.pack, verify=True)
            print(pack.summary(per_module=args.modules))
            print(f"base fingerprint {pack.base_fingerprint}\nchecksums OK")
        elif args.cmd == "export-lora":
            pack = SkillPack.load(args.pack)
            res = pack.to_lora(args.out, overwrite=args.overwrite)
            print(f"exported {len(res['modules'])} LoRA modules (max rank {res['max_rank']}) to {args.out}; "
                  f"{len(res['skipped'])} non-low-rank tensors skipped")
    except (SkillPackError, FileExistsError) as e:
        print(f"kd-plugins skillpack {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0
