"""``kd-plugins`` command line: one-shot jobs (quantize, losses, inherit, ...).

Each subcommand lives with its capability and is imported only when used, so ``kd-plugins --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS = {
    "quantize": ("kd_plugins.quant.cli", "quantize_main", "Post-training W8A8 quantization (CrossQuant, ...)."),
    "skillpack": ("kd_plugins.skillpack.cli", "skillpack_main", "Extract / apply / inspect GraftLLM SkillPacks."),
    "inherit": ("kd_plugins.cli", "inherit_main", "Build a shallower student from a teacher's layers."),
    "losses": ("kd_plugins.cli", "losses_main", "List the registered distillation losses."),
    "transfer-tokenizer": (
        "kd_plugins.cli",
        "transfer_tokenizer_main",
        "Move a causal LM to a new tokenizer (embedding init + ALM training against the original).",
    ),
    "cache-teacher": (
        "kd_plugins.distill.offline_cache",
        "cache_teacher_main",
        "Run a teacher once over a dataset; write a sharded top-k logit cache (TeacherCache(dir)).",
    ),
}


def losses_main(argv: list[str]) -> int:
    """Print the loss registry: name, kind, one-line description."""
    from kd_plugins.losses import get_loss_spec, list_losses

    p = argparse.ArgumentParser(prog="kd-plugins losses", description=losses_main.__doc__)
    p.add_argument("--kind", default=None, help="only losses of this kind (logits, hidden, embedding, ...)")
    args = p.parse_args(argv)
    names = list_losses(args.kind)
    width = max((len(n) for n in names), default=4)
    for n in names:
        spec = get_loss_spec(n)
        print(f"{n:<{width}}  {spec.kind:<9}  {spec.description}")
    return 0


def inherit_main(argv: list[str]) -> int:
    """Save a k-layer student inherited from a Hugging Face teacher checkpoint."""
    p = argparse.ArgumentParser(prog="kd-plugins inherit", description=inherit_main.__doc__)
    p.add_argument("teacher_dir")
    p.add_argument("out_dir")
    p.add_argument("--num-layers", type=int, required=False)
    p.add_argument(
        "--strategy",
        default="uniform",
        help="uniform | first | last | comma-separated teacher layer indices (e.g. 0,2,4)",
    )
    p.add_argument("--auto-class", default="AutoModel", help="transformers Auto class used to load the teacher")
    args = p.parse_args(argv)
    import transformers

    from kd_plugins.distill import inherit_student

    strategy = args.strategy
    if strategy not in ("uniform", "first", "last"):
        strategy = [int(x) for x in strategy.split(",")]
    teacher = getattr(transformers, args.auto_class).from_pretrained(args.teacher_dir)
    student = inherit_student(teacher, num_layers=args.num_layers, strategy=strategy)
    student.save_pretrained(args.out_dir)
    try:
        transformers.AutoTokenizer.from_pretrained(args.teacher_dir).save_pretrained(args.out_dir)
    except (OSError, ValueError):
        pass  # teacher directory without a tokenizer
    layers = student.config.kd_plugins_inherited_layers
    print(f"saved {len(layers)}-layer student (teacher layers {layers}) to {args.out_dir}")
    return 0


def transfer_tokenizer_main(argv: list[str]) -> int:
    """Move the causal LM in MODEL_DIR to the tokenizer in TOKENIZER_DIR: initialise its embeddings from the old ones,
    train it --steps steps on --data with ALM (+ cross-entropy) against the original model, save model and new
    tokenizer to OUT_DIR. Options: the fields of TokenizerTransferConfig (docs/cross_tokenizer.md)."""
    import re
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from kd_plugins.crosstok.transfer import TokenizerTransferConfig, transfer_tokenizer

    p = HfArgumentParser(TokenizerTransferConfig, prog="kd-plugins transfer-tokenizer")
    p.description = transfer_tokenizer_main.__doc__
    p.add_argument("model_dir", help="Hugging Face causal LM directory (with its tokenizer): the original model")
    p.add_argument("tokenizer_dir", help="directory of the new (fast) tokenizer")
    p.add_argument("out_dir", help="where the transferred model and the new tokenizer are saved")
    p.add_argument("--data", help="UTF-8 text file to train on (paragraphs separated by blank lines)")
    cfg, args = p.parse_args_into_dataclasses(args=argv)
    if cfg.steps > 0 and not args.data:
        p.error("--data FILE is needed to train (or pass --steps 0 to initialise only)")
    old_tok, new_tok = AutoTokenizer.from_pretrained(args.model_dir), AutoTokenizer.from_pretrained(args.tokenizer_dir)
    if new_tok.pad_token is None and new_tok.eos_token is not None:
        new_tok.pad_token = new_tok.eos_token  # the batches need one; saved with the tokenizer
        print(f"new tokenizer has no pad token: using its EOS {new_tok.eos_token!r}")
    original = AutoModelForCausalLM.from_pretrained(args.model_dir)
    student = transfer_tokenizer(original, old_tok, new_tok, cfg)
    print(f"initialised {len(new_tok)} embedding rows: {student.config.kd_plugins_tokenizer_transfer}")
    if cfg.steps > 0:
        from kd_plugins.integrations.hf.tokenizer_transfer import train_transferred

        with open(args.data, encoding="utf-8") as f:
            texts = [t for t in re.split(r"\n\s*\n", f.read()) if t.strip()]
        with tempfile.TemporaryDirectory(prefix="kd_plugins_transfer_") as tmp:
            trainer = train_transferred(student, new_tok, original, old_tok, texts, cfg, output_dir=tmp)
        last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
        shown = {k: v for k, v in last.items() if k in ("loss", "task_loss", "kd_alm", "kd_uld", "kd_chunk_hidden")}
        print(f"trained {trainer.state.global_step} steps; last logged {shown}")
    student.save_pretrained(args.out_dir)
    new_tok.save_pretrained(args.out_dir)
    print(f"saved the transferred model and tokenizer to {args.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kd-plugins <command> [args]\n\ncommands:")
        for name, (_, _, help_) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        print(f"kd-plugins: unknown command {cmd!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[cmd]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        print(f"kd-plugins {cmd}: not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
