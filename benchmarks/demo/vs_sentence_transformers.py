"""The demo's recipe beside sentence-transformers' standard distillation recipe, same student, split and wall-clock.

Both arms start from the same inherited student (teacher layers ``RECIPE["layers"]`` of all-MiniLM-L6-v2) and train
on the same BBC News training articles, 8 (title, body) pairs per batch, AdamW at the same lr, linear schedule with
10% warm-up, max 256 tokens:

* **kd_plugins** (``examples/distill_minilm_bbc.py``'s ``distill``, the demo's recipe by default: all-mpnet-base-v2
  quantized to int8 with ``quantize_teacher``): ``build_teacher_cache`` over the pairs, then an unmodified
  ``transformers.Trainer`` + ``DistillationCallback(cache, config)`` on ``PairCollator`` batches;
* **sentence-transformers** (optional dependency, ``pip install sentence-transformers``): the teacher's normalised
  embeddings computed once with ``SentenceTransformer.encode`` as labels, then ``SentenceTransformerTrainer`` with
  ``losses.MSELoss`` on (title, body) columns with per-column labels and ``MultipleNegativesRankingLoss`` on
  (title, body), the two datasets alternated round-robin (sentence-transformers' multi-dataset training).
  ``--st-arms mse`` runs the MSE-only recipe, ``cos+mnrl`` swaps ``MSELoss`` for ``EmbedDistillLoss`` with the
  cosine distance (the distillation term kd_plugins' recipe uses). An arm name ending in ``@mpnet`` labels with
  all-mpnet-base-v2 instead (max 128 tokens), reduced to the student's 384 dimensions by PCA fitted on the labels
  and re-normalised: sentence-transformers' documented way to distil a narrower student from a wider teacher
  (its ``model_distillation.py`` example adds the PCA as a ``Dense`` layer on the teacher).

``--teacher``, ``--teacher-quantization``, ``--loss-terms``, ``--loss-kwargs`` and ``--projector-lr`` override the
kd_plugins arm's recipe (the demo's flags of the same names; ``--teacher minilm`` with the MiniLM recipe's losses
gives the sessions 13-21 arm).

Equal wall-clock: each sentence-transformers arm gets the kd_plugins arm's measured time (teacher pass + training).
Its step count is planned from its step time measured on a few warm-up steps (not counted), so its learning-rate
schedule ends when its time does; a time budget stops it as a safety net. Quality: title -> body MRR and R@1 on the
held-out split (``--eval-split test`` for the reported figures; the recipe was chosen on ``validation``).

    python benchmarks/demo/vs_sentence_transformers.py --eval-split test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line  # noqa: E402

# isort: split
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from benchmarks.data import minilm_path, mpnet_path, split_articles  # noqa: E402
from kd_plugins import inherit_student  # noqa: E402


def load_demo():
    """The bundled demo module (``examples/distill_minilm_bbc.py``): its recipe, ``distill`` and ``evaluate``."""
    spec = importlib.util.spec_from_file_location("distill_minilm_bbc", ROOT / "examples" / "distill_minilm_bbc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StepClock(TrainerCallback):
    """Wall-clock at the end of every optimizer step (the warm-up run's step time, without start-up costs)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())


class _StopAfter(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds, self.t0, self.stopped = seconds, None, False

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self.t0 > self.seconds:
            self.stopped = control.should_training_stop = True


def _st_model(path: str):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(path, max_seq_length=256)
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")


def _st_trainer(model, datasets, losses, out: str, steps: int, recipe: dict, seed: int, callbacks=()):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import MultiDatasetBatchSamplers

    args = SentenceTransformerTrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=recipe["batch_articles"],
        learning_rate=recipe["lr"],
        lr_scheduler_type=recipe["scheduler"],
        warmup_steps=int(round(recipe["warmup_ratio"] * steps)),
        weight_decay=0.01,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        logging_steps=max(1, steps // 6),
        multi_dataset_batch_sampler=MultiDatasetBatchSamplers.ROUND_ROBIN,
    )
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=datasets, loss=losses, callbacks=list(callbacks)
    )


def _mpnet_labels(texts: list[str], dim: int) -> torch.Tensor:
    """all-mpnet-base-v2's normalised embeddings (max 128 tokens), PCA-reduced to ``dim`` and re-normalised."""
    teacher = _st_model(str(mpnet_path()))
    teacher[0].max_seq_length = 128
    emb = teacher.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True).cpu().float()
    centred = emb - emb.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return torch.nn.functional.normalize(centred @ v[:dim].T, dim=-1)


def run_st(arm: str, student_dir: str, teacher_dir: str, train, budget_s: float, recipe: dict, seed: int) -> dict:
    """One sentence-transformers arm (``"mse"``, ``"mse+mnrl"``, or ``"cos+mnrl"``: ``EmbedDistillLoss`` with the
    cosine distance in place of ``MSELoss``) within ``budget_s`` seconds of labelling +
    training; returns its model and timings."""
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import losses

    titles, bodies = [a.title for a in train], [a.body for a in train]
    t0 = time.perf_counter()
    if arm.endswith("@mpnet"):
        emb = _mpnet_labels(titles + bodies, _st_model(student_dir).get_sentence_embedding_dimension())
        arm = arm.removesuffix("@mpnet")
    else:
        teacher = _st_model(teacher_dir)
        emb = teacher.encode(titles + bodies, batch_size=32, convert_to_tensor=True, normalize_embeddings=True).cpu()
    label_s = time.perf_counter() - t0
    labels = torch.stack([emb[: len(train)], emb[len(train) :]], dim=1).tolist()  # per-column teacher embeddings
    data = {"mse": Dataset.from_dict({"title": titles, "body": bodies, "label": labels})}
    if arm.endswith("+mnrl"):
        data["mnrl"] = Dataset.from_dict({"anchor": titles, "positive": bodies})

    def make(model):
        distil = losses.EmbedDistillLoss(model, distance_metric="cosine") if arm.startswith("cos") else None
        loss = {"mse": distil or losses.MSELoss(model)}
        if "mnrl" in data:
            loss["mnrl"] = losses.MultipleNegativesRankingLoss(model)
        return loss

    with tempfile.TemporaryDirectory() as tmp:  # step time on a throwaway copy: plans the step count
        probe, clock = _st_model(student_dir), _StepClock()
        warm = _st_trainer(probe, data, make(probe), tmp, 12, recipe, seed, callbacks=[clock])
        t1 = time.perf_counter()
        warm.train()
        step_s = (clock.ends[-1] - clock.ends[1]) / (len(clock.ends) - 2)  # steady state: steps 3..12
        startup_s = (time.perf_counter() - t1) - step_s * len(clock.ends)  # trainer set-up and tear-down
    train_budget = max(budget_s - label_s, step_s)
    steps = max(1, math.floor((train_budget - max(startup_s, 0.0)) / step_s))
    model = _st_model(student_dir)
    stop = _StopAfter(train_budget)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _st_trainer(model, data, make(model), tmp, steps, recipe, seed, callbacks=[stop])
        t2 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t2
    return {
        "model": model[0].auto_model.eval(),
        "steps": trainer.state.global_step,
        "planned_steps": steps,
        "cache_s": label_s,
        "train_s": train_s,
        "stopped_by_budget": stop.stopped,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-split", choices=("test", "validation"), default="test")
    p.add_argument("--st-arms", default="mse+mnrl", help="sentence-transformers arms: mse, mse+mnrl, cos+mnrl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", choices=("minilm", "mpnet"), default=None, help="kd_plugins arm's cached teacher")
    p.add_argument("--loss-terms", default=None, help="kd_plugins arm's loss terms (default: the demo's)")
    p.add_argument("--loss-kwargs", default=None, help="kd_plugins arm's loss kwargs JSON (default: the demo's)")
    p.add_argument("--projector-lr", default=None, help="kd_plugins arm's projector lr (default: the demo's)")
    p.add_argument(
        "--teacher-quantization",
        choices=("none", "int8"),
        default=None,
        help="kd_plugins arm's cached-teacher quantization (default: the demo's)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny run (64 training articles, 4 steps, 40 eval articles)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--json",
        default=None,
        help="write the figures here (default with --eval-split test: benchmarks/demo/vs_sentence_transformers.json, "
        "which `make demo` quotes)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import sentence_transformers
    except ImportError:
        print("sentence-transformers is not installed: pip install sentence-transformers (optional benchmark dep)")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    demo = load_demo()
    recipe = dict(demo.RECIPE)
    overrides = [
        (flag, value)
        for flag, value in (
            ("--teacher", args.teacher),
            ("--loss-terms", args.loss_terms),
            ("--loss-kwargs", args.loss_kwargs),
            ("--projector-lr", args.projector_lr),
            ("--teacher-quantization", args.teacher_quantization),
        )
        if value is not None
    ]
    demo_args = demo.parse_args(
        ["--max-minutes", "0", "--seed", str(args.seed)]
        + (["--steps", "4"] if args.smoke else [])
        + [x for pair in overrides for x in pair]
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    split = split_articles(seed=0)
    held_out = split.test if args.eval_split == "test" else split.validation
    train = split.train
    if args.smoke:
        held_out, train = held_out[:40], train[:64]
    layers = [int(x) for x in recipe["layers"].split(",")]

    rows = {"teacher": {"eval": demo.evaluate(teacher, tokenizer, held_out)}}
    with tempfile.TemporaryDirectory() as out:
        student, steps, cache_s, train_s, _ = demo.distill(teacher, tokenizer, train, demo_args, out)
    rows["kd_plugins"] = {"steps": steps, "cache_s": cache_s, "train_s": train_s}
    rows["kd_plugins"]["eval"] = demo.evaluate(student, tokenizer, held_out)
    budget = cache_s + train_s
    print(f"kd_plugins: {steps} steps, {budget:.0f} s, MRR {rows['kd_plugins']['eval']['mrr']:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as student_dir:
        inherit_student(teacher, strategy=layers).save_pretrained(student_dir)
        tokenizer.save_pretrained(student_dir)
        for arm in [a.strip() for a in args.st_arms.split(",") if a.strip()]:
            r = run_st(arm, student_dir, str(minilm_path()), train, budget, recipe, args.seed)
            r["eval"] = demo.evaluate(r.pop("model"), tokenizer, held_out)
            rows[f"sentence-transformers {arm}"] = r
            print(f"ST {arm}: {r['steps']} steps, MRR {r['eval']['mrr']:.4f}", flush=True)

    print(
        f"\n{command_line()}  (sentence-transformers {sentence_transformers.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"| recipe ({args.eval_split}, {len(held_out)} articles) | steps | teacher pass | training | MRR | R@1 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if name == "teacher":
            label = "teacher (6 layers)" if demo_args.teacher == "minilm" else "all-MiniLM-L6-v2 (the layer source)"
            print(f"| {label} | | | | {r['eval']['mrr']:.3f} | {r['eval']['recall@1']:.3f} |")
            continue
        print(
            f"| {name} | {r['steps']} | {r['cache_s']:.0f} s | {r['train_s']:.0f} s | {r['eval']['mrr']:.3f} | "
            f"{r['eval']['recall@1']:.3f} |"
        )
    default_out = ROOT / "benchmarks" / "demo" / "vs_sentence_transformers.json"
    out = args.json or (str(default_out) if args.eval_split == "test" and not args.smoke else None)
    if out:
        peer = next((r for n, r in rows.items() if n.startswith("sentence-transformers mse+mnrl")), None)
        peer = peer or next((r for n, r in rows.items() if n.startswith("sentence-transformers")), None)
        summary = {
            "command": command_line(),
            "split": args.eval_split,
            "threads": torch.get_num_threads(),
            "kd_plugins": rows["kd_plugins"]["eval"],
            "sentence-transformers": peer["eval"] if peer else None,
            "rows": rows,
        }
        Path(out).write_text(json.dumps(summary, indent=2, default=float) + "\n")
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
