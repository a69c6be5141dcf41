"""Offline teacher cache benchmark: SmolLM2-135M -> 6-layer inherited student on Jane Austen, live teacher vs a
sharded top-k cache (k = 8, 32, 128), evaluated on held-out BBC News text (another domain).

Setup (fixed before any run):

* Teacher: SmolLM2-135M-Instruct (``benchmarks.data.lm.load_smollm2``; vocabulary 49,152).
* Student: ``kd_plugins.inherit_student(teacher, num_layers=--num-layers)`` (uniform layers), the same
  initialisation in every arm; the same batches in the same order (Trainer seed) and the same steps.
* Training data: ``--train-windows`` windows of ``--seq-len`` tokens from the five Austen novels other than *Pride
  and Prejudice*. Held-out: ``--eval-windows`` windows of the BBC test articles (``split_articles(seed=0).test``)
  and of *Pride and Prejudice*.
* Loss: ``0.5 * CE + KL(teacher || student)`` at ``--temperature`` (``DistillationCallback``); the cache arms read
  ``TeacherCache(dir)`` written by ``kd_plugins.cache_teacher`` (``--value-format``, tail form ``--topk-tail``;
  ``--selection topk,sampled``: the k likeliest tokens, or an exact head plus an unbiased sample of the tail;
  ``--selection lowrank``: ``cache_teacher(kind="lowrank")``, the exact top-k plus a ``--rank`` PCA code of the
  teacher's final hidden state, from which each step rebuilds the whole tail).
* Reported per arm: cache bytes per token and build time (one teacher pass), mean KD loss of the last quarter of
  the steps, training wall time per step, held-out perplexity (BBC, Austen). The KD loss is each arm's own
  objective: with a cache it is the sparse (top-k + tail bucket) KL, a lower bound of the live arm's full KL, so
  compare arms by perplexity, not by that column.

``--smoke`` runs every arm for 2 steps on 4 short windows (a check that the script works, not a result).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, command_line, log, replace_section, set_threads_and_seed  # noqa: E402

os.environ.setdefault("WANDB_DISABLED", "true")

# isort: split
import torch  # noqa: E402

from benchmarks.data.bbc import split_articles  # noqa: E402
from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2, perplexity  # noqa: E402

HERE = BENCHMARKS / "cache"
TEST_NOVEL = "prideprejudice"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=80, help="optimizer steps of every arm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-windows", type=int, default=320, help="training windows (the cache covers all of them)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--ks", default="8,32,128", help="top-k of the cache arms")
    p.add_argument("--value-format", default="bf16", choices=["bf16", "head_tail", "fp32"])
    p.add_argument(
        "--selection",
        default="topk",
        help="comma-separated cache selections: topk (the k most likely), sampled (unbiased sampled weights), "
        "lowrank (exact top-k head + a tail rebuilt from the hidden state's PCA code)",
    )
    p.add_argument("--rank", type=int, default=64, help="PCA rank of the lowrank arms")
    p.add_argument("--topk-tail", default="bucket", choices=["bucket", "zero", "renormalize"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-live", action="store_true", help="skip the live-teacher arm")
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="keep the student's (tied) token embeddings / output head at the teacher's values in every arm",
    )
    p.add_argument("--smoke", action="store_true", help="2 steps on 4 short windows: checks the script runs")
    p.add_argument("--out", default=str(HERE / "results" / "teacher_cache_smollm2.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.train_windows, args.eval_windows = 2, 2, 32, 4, 2
        args.ks = "8,32"
    args.ks = [int(k) for k in str(args.ks).split(",")]
    args.selection = [x.strip() for x in str(args.selection).split(",")]
    return args


def build_data(tok, args) -> dict:
    books = jane_austen_texts()
    train_text = "\n\n".join(t for name, t in sorted(books.items()) if name != TEST_NOVEL)
    test = split_articles(seed=0).test
    bbc = "\n\n".join(f"{a.title}\n\n{a.body}" for a in test)
    train = lm_windows(tok, train_text, args.seq_len, args.train_windows)
    return {
        "train": [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in train],
        "bbc": lm_windows(tok, bbc, args.seq_len, args.eval_windows),
        "austen": lm_windows(tok, books[TEST_NOVEL], args.seq_len, args.eval_windows),
    }


def train_arm(name: str, teacher_or_cache, teacher, data: dict, args, out_dir: str) -> dict:
    """Train a fresh inherited student for ``args.steps`` steps against the live teacher or a cache."""
    from transformers import Trainer, TrainingArguments, set_seed

    import kd_plugins

    set_seed(args.seed)
    student = kd_plugins.inherit_student(teacher, num_layers=args.num_layers, strategy="uniform")
    student.requires_grad_(True).train()
    if args.freeze_embeddings:  # both ends (the same tensor when tied, as in SmolLM2)
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    sparse = name.startswith("cache_")  # top-k / sampled rows; live and lowrank arms give dense distributions
    kwargs = {"kl": {"topk_tail": args.topk_tail}} if sparse else None
    cb = kd_plugins.DistillationCallback(
        teacher_or_cache,
        loss_terms={"kl": 1.0},
        temperature=args.temperature,
        hard_label_weight=0.5,
        loss_kwargs=kwargs,
    )
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, name),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=student, args=targs, train_dataset=data["train"], callbacks=[cb])
    t0 = time.time()
    trainer.train()
    secs = time.time() - t0
    kd = [h["kd_kl"] for h in trainer.state.log_history if "kd_kl" in h]
    tail = kd[-max(1, len(kd) // 4) :]
    row = {
        "arm": name,
        "step_s": secs / args.steps,
        "fused": bool(cb.fused.enabled),  # the fused linear+KD kernel (live teacher or top-k cache) or the plain path
        "kd_kl_last_quarter": sum(tail) / len(tail) if tail else None,
        "ppl_bbc": perplexity(student, data["bbc"], batch_size=4),
        "ppl_austen": perplexity(student, data["austen"], batch_size=4),
    }
    log(f"[{name}] {row}")
    return row


def cache_arm(k: int, selection: str, teacher, data: dict, args, out_dir: str) -> dict:
    import kd_plugins

    t0 = time.time()
    name = f"cache_k{k}" + ("" if selection == "topk" else f"_{selection}")
    path = Path(out_dir) / name
    cache = kd_plugins.cache_teacher(
        teacher,
        data["train"],
        path,
        top_k=k,
        temperature=args.temperature,
        value_format=args.value_format,
        selection=selection,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=False,
    )
    build_s = time.time() - t0
    row = train_arm(name, cache, teacher, data, args, out_dir)
    return {**row, "k": k, "selection": selection, "bytes_per_token": cache.store.bytes_per_token, "build_s": build_s}


def lowrank_arm(k: int, teacher, data: dict, args, out_dir: str) -> dict:
    """A sharded ``cache_teacher(kind="lowrank")``: the exact top-``k`` and a rank-``args.rank`` PCA code of the
    teacher's final hidden state per token (distill/cache_lowrank.py), streamed from disk like the other caches."""
    import kd_plugins

    t0 = time.time()
    cache = kd_plugins.cache_teacher(
        teacher,
        data["train"],
        Path(out_dir) / f"lowrank_k{k}_r{args.rank}",
        kind="lowrank",
        top_k=k,
        rank=args.rank,
        temperature=args.temperature,
        value_format=args.value_format,
        batch_size=args.batch_size,
        progress=False,
    )
    build_s = time.time() - t0
    m = cache.store.manifest
    once = cache.tensors["tail_bias"].nbytes + cache.tensors["tail_weight"].nbytes  # the index's [V, r] tail map
    row = train_arm(f"lowrank_k{k}_r{args.rank}", cache, teacher, data, args, out_dir)
    return {
        **row,
        "k": k,
        "selection": "lowrank",
        "rank": args.rank,
        "bytes_per_token": cache.store.bytes_per_token,  # shards + index (the tail map stored once included)
        "bytes_per_token_rows": (m["total_bytes"] - once) / m["num_rows"],
        "build_s": build_s,
    }


def fmt_table(rows: list[dict]) -> str:
    head = "| arm | bytes/token | cache build s | KD loss (last quarter) | s/step | path | ppl BBC | ppl Austen |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    for r in rows:
        bpt = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "-"
        build = f"{r['build_s']:.1f}" if "build_s" in r else "-"
        kd = f"{r['kd_kl_last_quarter']:.4f}" if r["kd_kl_last_quarter"] is not None else "-"
        ppl = f"{r['ppl_bbc']:.2f} | {r['ppl_austen']:.2f}"
        path = {True: "fused", False: "plain"}.get(r.get("fused"), "-")
        head += f"| {r['arm']} | {bpt} | {build} | {kd} | {r['step_s']:.2f} | {path} | {ppl} |\n"
    return head


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    teacher, tok = load_smollm2()
    teacher.eval()
    data = build_data(tok, args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd_cache_bench_") as out_dir:
        if not args.no_live:
            rows.append(train_arm("live", teacher, teacher, data, args, out_dir))
        for selection in args.selection:
            for k in args.ks:
                if selection == "lowrank":
                    rows.append(lowrank_arm(k, teacher, data, args, out_dir))
                else:
                    rows.append(cache_arm(k, selection, teacher, data, args, out_dir))
    table = fmt_table(rows)
    print(table)
    if args.smoke:
        return 0
    cmd = command_line(__file__, argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": cmd, "args": vars(args), "rows": rows}, indent=1))
    # its own section per student depth: the hand-written sections around it are never overwritten
    heading = f"## Latest run (written by the script): {args.num_layers}-layer student"
    if args.selection != ["topk"]:  # a section per selection too: a sampled run keeps the top-k table
        heading += f", {'/'.join(args.selection)} caches, {args.steps} steps"
    if args.freeze_embeddings:
        heading += ", frozen embeddings"
    if args.seed:  # another training seed keeps its own section beside seed 0's
        heading += f", training seed {args.seed}"
    section = f"{heading}\n\n`{cmd}`\n\n{table}"
    replace_section(HERE / "RESULTS_cache.md", heading, section, title="# Offline teacher cache\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
