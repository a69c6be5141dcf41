"""``kd-plugins skillpack``: extract / apply / info / export-lora.

    kd-plugins skillpack extract BASE_DIR FINETUNED_DIR OUT_DIR [--budget 5% | --energy 0.9]
    kd-plugins skillpack apply PACK_DIR BASE_DIR OUT_DIR [--scale 1.0]
    kd-plugins skillpack info PACK_DIR [--modules]
    kd-plugins skillpack export-lora PACK_DIR OUT_DIR

Model directories are Hugging Face ``save_pretrained`` folders; they load with the class named in their config's
``architectures`` (override with ``--auto-class``, e.g. ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from .config import EMBEDDING_POLICIES, POLICIES, SkillPackConfig
from .errors import SkillPackError
from .pack import SkillPack


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


def _help(name: str) -> str:
    """The help text of a :class:`SkillPackConfig` field (one source for the library and the command line)."""
    return next(f.metadata["help"] for f in dataclasses.fields(SkillPackConfig) if f.name == name)


def _add_extract_parser(sub) -> None:
    ex = sub.add_parser("extract", help="compress FINETUNED - BASE into a SkillPack directory")
    ex.add_argument("base")
    ex.add_argument("finetuned")
    ex.add_argument("out")
    g = ex.add_mutually_exclusive_group()  # neither: the documented default budget (SkillPackConfig)
    g.add_argument("--budget", help=_help("budget"))
    g.add_argument("--energy", type=float, help=_help("energy"))
    ex.add_argument("--policy", default="module-aware", choices=list(POLICIES), help=_help("policy"))
    ex.add_argument("--embeddings", default="lowrank", choices=list(EMBEDDING_POLICIES), help=_help("embeddings"))
    ex.add_argument("--bits", default="8,4,2", help=_help("bits"))
    ex.add_argument("--bit-split", default=None, help=_help("bit_split"))
    ex.add_argument("--group-size", type=int, default=64, help=_help("group_size"))
    ex.add_argument("--exact-max-dim", type=int, default=16, help=_help("exact_max_dim"))
    ex.add_argument("--sparse-density", type=float, default=0.01, help=_help("sparse_density"))
    ex.add_argument("--name", default=None, help=_help("name"))
    ex.add_argument("--auto-class", default=None)
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--modules", action="store_true", help="print every module's row")


def _extract_config(args):
    """The :class:`SkillPackConfig` of an ``extract`` command line (raises SkillPackError on bad values)."""
    return SkillPackConfig(
        budget=args.budget,
        energy=args.energy,
        policy=args.policy,
        embeddings=args.embeddings,
        bits=args.bits,
        bit_split=args.bit_split,
        group_size=args.group_size,
        exact_max_dim=args.exact_max_dim,
        sparse_density=args.sparse_density,
        name=args.name,
    )


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-plugins skillpack", description="GraftLLM SkillPacks (see kd_plugins.skillpack)."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_extract_parser(sub)

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
    return p


def _extract(args) -> None:
    config = _extract_config(args)  # before loading the models: bad options fail fast
    base = _load_model(args.base, args.auto_class)
    ft = _load_model(args.finetuned, args.auto_class)
    pack = SkillPack.extract(base, ft, config)
    pack.save(args.out, overwrite=args.overwrite)
    print(pack.summary(per_module=args.modules))
    print(f"saved to {args.out}")


def _apply(args) -> None:
    pack = SkillPack.load(args.pack)
    model = _load_model(args.base, args.auto_class)
    pack.apply(model, scale=args.scale, strict=not args.no_strict)
    model.save_pretrained(args.out)
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "merges.txt",
        "vocab.json",
    ):
        src = Path(args.base) / f
        if src.is_file():
            shutil.copy(src, Path(args.out) / f)
    print(f"applied {pack!r} (scale {args.scale}) to {args.base}; saved to {args.out}")


def _info(args) -> None:
    pack = SkillPack.load(args.pack, verify=True)
    print(pack.summary(per_module=args.modules))
    print(f"base fingerprint {pack.base_fingerprint}\nchecksums OK")


def _export_lora(args) -> None:
    pack = SkillPack.load(args.pack)
    res = pack.to_lora(args.out, overwrite=args.overwrite)
    print(
        f"exported {len(res['modules'])} LoRA modules (max rank {res['max_rank']}) to {args.out}; "
        f"{len(res['skipped'])} non-low-rank tensors skipped"
    )


_COMMANDS = {"extract": _extract, "apply": _apply, "info": _info, "export-lora": _export_lora}


def skillpack_main(argv: list[str]) -> int:
    """Entry point of ``kd-plugins skillpack``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        _COMMANDS[args.cmd](args)
    except (SkillPackError, FileExistsError) as e:
        print(f"kd-plugins skillpack {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0
