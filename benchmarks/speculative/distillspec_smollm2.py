"""DistillSpec drafts for SmolLM2-135M-Instruct: off- vs on-policy distillation with FKL / RKL / TVD / JSD, scored as
speculative-decoding drafts, and the per-step cost of DistillationCallback against TRL's GKDTrainer.

Setup (fixed before any run):

* Target: SmolLM2-135M-Instruct (``benchmarks.data.lm.load_smollm2``, fp32). Draft: ``build_draft(target,
  num_layers=6)``, the target's first 6 of 30 layers with its final norm and tied head (untrained: the
  ``untrained`` arm).
* Prompts (chat template, one user turn): "Write the first paragraph of a news article headlined: <title>" for BBC
  News articles, and "Continue this passage from a novel: <first sentence>" for Jane Austen paragraphs with at least
  two sentences. Training prompts: the BBC training split and the five novels other than *Persuasion*; evaluation
  prompts: the BBC test split and *Persuasion*, disjoint from training. The reference completion (off-policy data) is
  the article's first paragraph / the paragraph's remaining sentences, at most ``--max-new-tokens`` tokens.
* Arms, the same number of optimizer steps each, the same batches (Trainer seed), lr and schedule:
  ``offpolicy_fkl`` (``lmbda=0``: the reference completions, forward KL), ``onpolicy_fkl`` / ``onpolicy_rkl`` /
  ``onpolicy_tvd`` / ``onpolicy_jsd`` (``lmbda=1``: completions sampled from the draft at T = 1, scored by the
  target; JSD with beta 0.5), ``onpolicy_fkl_greedy`` (the draft's greedy completions, forward KL), ``seqkd_fkl``
  (``lmbda=1``, ``on_policy_source="teacher"``: the target's greedy completions, sequence-level KD, forward KL),
  ``mixed_fkl_greedy`` (``lmbda=0.5``, ``on_policy_source="student_or_teacher"``: each micro-batch greedily
  completed by the draft or, with probability 0.5, by the target; forward KL), all through
  ``DistillationCallback(target, distillspec_config(...))``.
* Metrics on the evaluation prompts: analytic acceptance ``expected_acceptance`` (greedy and T = 1) on the target's
  own greedy continuations, the predicted tokens per target forward at gamma = 4, and ``measure_speculative`` with 4
  draft tokens per round (greedy): accepted tokens per round, accepted / proposed, tokens per target forward,
  losslessness and speedup over the target alone.
* Cost: seconds per optimizer step (first step excluded) of ``Trainer`` + ``DistillationCallback`` and of TRL's
  ``GKDTrainer`` (``trl.experimental.gkd``) at the same ``lmbda`` (``--cost-lmbda``), JSD beta 0.5, T = 1,
  ``max_new_tokens``, batches and draft.

``--smoke`` runs every arm and the cost comparison at toy sizes (2 steps, batch 2, 8 new tokens, 2 evaluation
prompts of 6 tokens, no untimed warm-up) to check the script end to end; it writes only ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import (  # noqa: E402
    BENCHMARKS,
    ROOT,
    command_line,
    log,
    omp_prefix,
    replace_section,
    set_threads_and_seed,
)

os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# isort: split
import torch  # noqa: E402

from benchmarks.data.bbc import article_paragraphs, load_bbc_news, split_articles  # noqa: E402
from benchmarks.data.lm import AUSTEN_NOVELS, jane_austen_texts, load_smollm2  # noqa: E402

EVAL_NOVEL = "persuasion"
#: arm -> (divergence, lmbda, other DistillationConfig fields); "untrained" is the draft as cut from the target.
ARMS = {
    "untrained": None,
    "offpolicy_fkl": ("kl", 0.0, {}),
    "onpolicy_fkl": ("kl", 1.0, {}),
    "onpolicy_rkl": ("reverse_kl", 1.0, {}),
    "onpolicy_tvd": ("tvd", 1.0, {}),
    "onpolicy_jsd": ("jsd", 1.0, {}),
    # on-policy with the draft's greedy completions (its T = 1 samples are near-random text for a cut draft)
    "onpolicy_fkl_greedy": ("kl", 1.0, {"generation_temperature": 0.0}),
    # sequence-level KD: the target's own greedy completions, the text acceptance is measured on
    "seqkd_fkl": ("kl", 1.0, {"on_policy_source": "teacher", "generation_temperature": 0.0}),
    # half the micro-batches the draft's greedy completions (the path a greedy draft proposes within a round), half
    # the target's (TRL GKD's seq_kd=True at lmbda 0.5): the target's text keeps the draft's own path plausible
    "mixed_fkl_greedy": ("kl", 0.5, {"on_policy_source": "student_or_teacher", "generation_temperature": 0.0}),
}
SMOKE = {
    "steps": 2,
    "batch_size": 2,
    "max_new_tokens": 8,
    "train_prompts": 8,
    "eval_prompts": 2,
    "eval_tokens": 6,
    "cost_steps": 2,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every trained arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--smoke", action="store_true", help=f"toy sizes, end-to-end check only: {SMOKE}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, warmup, cosine decay)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generated (and reference) completion length")
    p.add_argument("--num-layers", type=int, default=6, help="draft depth (first layers of the target)")
    p.add_argument(
        "--init-draft",
        default=None,
        help="start every arm from this saved draft (from_pretrained; e.g. one of --save-drafts) instead of the "
        "target's first --num-layers layers; the 'untrained' arm then scores it as it is",
    )
    p.add_argument("--train-prompts", type=int, default=1024, help="training prompts, half BBC, half Austen")
    p.add_argument("--eval-prompts", type=int, default=16, help="evaluation prompts, half BBC, half Austen")
    p.add_argument("--eval-tokens", type=int, default=48, help="tokens generated per evaluation prompt")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    p.add_argument("--cost-steps", type=int, default=6, help="steps timed per trainer in the cost comparison (0: skip)")
    p.add_argument("--cost-lmbda", type=float, default=1.0, help="lmbda of both trainers in the cost comparison")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in training (both trainers)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; --smoke: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-drafts", default=None, help="folder: each trained arm's draft saved there (save_pretrained) as ARM/"
    )
    p.add_argument("--out", default=None, help="JSON results (default: results/distillspec_smollm2.json here)")
    p.add_argument(
        "--results",
        default=str(BENCHMARKS / "speculative" / "RESULTS_distillspec.md"),
        help="markdown file the table is written to ('' to skip; never written with --smoke)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.threads = args.threads or 1
        args.results = ""
        args.out = args.out or str(ROOT / ".cache" / "speculative" / "distillspec_smoke.json")
    args.out = args.out or str(BENCHMARKS / "speculative" / "results" / "distillspec_smollm2.json")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    return args


# --------------------------------------------------------------------------------------------------------- data
def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def bbc_examples(articles, n: int) -> list[tuple[str, str]]:
    """(instruction, reference completion) from BBC articles: headline -> first paragraph."""
    out = []
    for a in articles:
        paras = article_paragraphs(a)
        if paras:
            out.append((f"Write the first paragraph of a news article headlined: {a.title}", paras[0]))
        if len(out) == n:
            break
    return out


def austen_examples(texts: list[str], n: int) -> list[tuple[str, str]]:
    """(instruction, reference completion) from paragraphs with >= 2 sentences: first sentence -> the rest; ``n``
    paragraphs evenly spaced over ``texts``."""
    pool = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            sents = _sentences(para)
            if len(sents) >= 2 and 8 <= len(sents[0].split()) <= 60:
                pool.append((f"Continue this passage from a novel: {sents[0]}", " ".join(sents[1:])))
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} Austen paragraphs fit; {n} were requested")
    return [pool[i * len(pool) // n] for i in range(n)]


def encode(tok, examples, max_new_tokens: int) -> list[dict]:
    """Rows ``{"input_ids", "labels", "prompt"}``: chat-template prompt + reference completion (EOS-terminated
    unless truncated), labels -100 on the prompt."""
    rows = []
    for instruction, completion in examples:
        text = tok.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        comp = tok(completion, add_special_tokens=False)["input_ids"]
        comp = comp[:max_new_tokens] if len(comp) >= max_new_tokens else comp + [tok.eos_token_id]
        rows.append({"input_ids": prompt + comp, "labels": [-100] * len(prompt) + comp, "prompt": prompt})
    return rows


def build_prompts(tok, args) -> tuple[list[dict], list[dict]]:
    """Training and evaluation rows, half BBC and half Austen each, interleaved; disjoint sources."""
    split = split_articles(load_bbc_news())
    books = jane_austen_texts()
    n_train, n_eval = args.train_prompts, args.eval_prompts
    train = _interleave(
        bbc_examples(split.train, n_train - n_train // 2),
        austen_examples([books[b] for b in AUSTEN_NOVELS if b != EVAL_NOVEL], n_train // 2),
    )
    evals = _interleave(
        bbc_examples(split.test, n_eval - n_eval // 2), austen_examples([books[EVAL_NOVEL]], n_eval // 2)
    )
    return encode(tok, train, args.max_new_tokens), encode(tok, evals, args.max_new_tokens)


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


class Collator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``; with ``prompts=True`` also the left-padded
    ``prompts`` / ``prompt_attention_mask`` that TRL's GKDTrainer generates from."""

    def __init__(self, pad_id: int, prompts: bool = False):
        self.pad_id, self.prompts = pad_id, prompts

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": torch.tensor([r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
            ),
            "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
        }
        if self.prompts:
            pw = max(len(r["prompt"]) for r in rows)
            batch["prompts"] = torch.tensor([[self.pad_id] * (pw - len(r["prompt"])) + r["prompt"] for r in rows])
            batch["prompt_attention_mask"] = torch.tensor(
                [[0] * (pw - len(r["prompt"])) + [1] * len(r["prompt"]) for r in rows]
            )
        return batch


# ----------------------------------------------------------------------------------------------------- training
def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock seconds of every optimizer step (generation, forwards, backward, optimizer)."""

        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_kwargs(args, out_dir: str, steps: int) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(0.05 * steps)),
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )


def train_arm(target, tok, rows, args, divergence: str, lmbda: float, steps: int, overrides: dict | None = None):
    """A fresh draft trained ``steps`` steps by ``Trainer`` + ``DistillationCallback``; (draft, logs, step seconds)."""
    from transformers import Trainer, TrainingArguments

    from kd_plugins import DistillationCallback
    from kd_plugins.speculative import distillspec_config

    draft = initial_draft(target, args)
    cfg = distillspec_config(divergence, lmbda=lmbda, max_new_tokens=args.max_new_tokens, **(overrides or {}))
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=draft,
            args=TrainingArguments(**_train_kwargs(args, tmp, steps)),
            train_dataset=rows,
            data_collator=Collator(_pad_id(tok)),
            callbacks=[DistillationCallback(target, cfg), timer],
        )
        trainer.train()
    return draft, trainer.state.log_history, timer.seconds


def gkd_step_seconds(target, tok, rows, args) -> list[float]:
    """Seconds per step of TRL's GKDTrainer on the same draft, batches and settings."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kd_plugins.speculative import build_draft

    draft, teacher = build_draft(target, num_layers=args.num_layers), copy.deepcopy(target)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(
            **_train_kwargs(args, tmp, args.cost_steps),
            lmbda=args.cost_lmbda,
            beta=0.5,
            temperature=1.0,
            max_new_tokens=args.max_new_tokens,
            gradient_checkpointing=False,  # SFTConfig turns it on by default; the Trainer arm runs without it
        )
        trainer = GKDTrainer(
            model=draft,
            teacher_model=teacher,
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            data_collator=Collator(_pad_id(tok), prompts=True),
            processing_class=tok,
            callbacks=[timer],
        )
        trainer.train()
    return timer.seconds


def ours_step_seconds(target, tok, rows, args) -> list[float]:
    return train_arm(target, tok, rows, args, "jsd", args.cost_lmbda, args.cost_steps)[2]


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# --------------------------------------------------------------------------------------------------- evaluation
def greedy_continuations(target, tok, rows, n_tokens: int) -> list[dict]:
    """The target's greedy continuation of every evaluation prompt, as acceptance batches (labels on it only)."""
    batches = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["prompt"]], device=target.device)
            out = target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=_pad_id(tok),
            )
            labels = out.clone()
            labels[:, : ids.shape[1]] = -100
            batches.append({"input_ids": out, "labels": labels})
    return batches


def evaluate(target, draft, tok, eval_rows, batches, args) -> dict:
    from kd_plugins.speculative import expected_acceptance, expected_tokens_per_round, measure_speculative

    greedy = expected_acceptance(target, draft, batches)
    sampled = expected_acceptance(target, draft, batches, temperature=1.0)
    report = measure_speculative(
        target,
        draft,
        [r["prompt"] for r in eval_rows],
        tok,
        num_draft_tokens=args.gamma,
        max_new_tokens=args.eval_tokens,
        warmup=not args.smoke,
    )
    measured = report.as_dict()
    return {
        "alpha_greedy": greedy.mean,
        "alpha_t1": sampled.mean,
        "positions": greedy.count,
        "predicted_tokens_per_round": expected_tokens_per_round(greedy.mean, args.gamma),
        **{
            k: measured[k]
            for k in (
                "mean_accepted_per_round",
                "acceptance_rate",
                "tokens_per_target_forward",
                "speedup",
                "all_lossless",
                "rounds",
                "target_seconds",
                "assisted_seconds",
            )
        },
    }


# --------------------------------------------------------------------------------------------------------- main
def initial_draft(target, args):
    """The draft every arm starts from: the target's first ``--num-layers`` layers, or ``--init-draft``."""
    from kd_plugins.speculative import build_draft

    if args.init_draft is None:
        return build_draft(target, num_layers=args.num_layers)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.init_draft, dtype=next(target.parameters()).dtype)


def run_arms(target, tok, train_rows, eval_rows, args) -> dict:
    batches = greedy_continuations(target, tok, eval_rows, args.eval_tokens)
    results = {}
    for arm in args.arms:
        t0 = time.time()
        if ARMS[arm] is None:
            draft, logs, seconds = initial_draft(target, args), [], []
        else:
            divergence, lmbda, overrides = ARMS[arm]
            draft, logs, seconds = train_arm(target, tok, train_rows, args, divergence, lmbda, args.steps, overrides)
        train_s = time.time() - t0
        if args.save_drafts and ARMS[arm] is not None:
            draft.save_pretrained(os.path.join(args.save_drafts, arm))
        metrics = evaluate(target, draft, tok, eval_rows, batches, args)
        last = next((h for h in reversed(logs) if "kd_loss" in h), {})
        results[arm] = {
            **metrics,
            "train_seconds": train_s,
            "mean_step_seconds": _mean(seconds[1:] or seconds),
            "final_kd_loss": last.get("kd_loss"),
            "on_policy_fraction": last.get("on_policy_fraction"),
            "generated_tokens": last.get("generated_tokens"),
        }
        log(f"{arm}: {json.dumps({k: _round(v) for k, v in results[arm].items()})}")
        del draft
    return results


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def markdown(results: dict, cost: dict | None, args, cmd: str) -> str:
    lines = [
        "## DistillSpec drafts for SmolLM2-135M-Instruct",
        "",
        f"Command: `{cmd}`",
        "",
        f"Draft: first {args.num_layers} of 30 layers; {args.steps} steps x batch {args.batch_size}, lr {args.lr}, "
        f"completions of at most {args.max_new_tokens} tokens; {args.eval_prompts} evaluation prompts, "
        f"{args.eval_tokens} tokens each, gamma = {args.gamma}.",
        "",
        "| arm | alpha greedy | alpha T=1 | predicted tokens / round | accepted / round | accepted / proposed | "
        "tokens / target forward | speedup | lossless | s / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        step = f"{r['mean_step_seconds']:.2f}" if r["mean_step_seconds"] else "-"
        lines.append(
            f"| {arm} | {r['alpha_greedy']:.3f} | {r['alpha_t1']:.3f} | {r['predicted_tokens_per_round']:.3f} | "
            f"{r['mean_accepted_per_round']:.3f} | {r['acceptance_rate']:.3f} | {r['tokens_per_target_forward']:.3f} | "
            f"{r['speedup']:.2f} | {r['all_lossless']} | {step} |"
        )
    if cost:
        lines += [
            "",
            f"Per-step cost at lmbda = {args.cost_lmbda} (JSD beta 0.5, {args.cost_steps} steps, first excluded): "
            f"DistillationCallback {cost['ours_mean']:.2f} s, TRL GKDTrainer {cost['gkd_mean']:.2f} s "
            f"(ratio {cost['ours_mean'] / cost['gkd_mean']:.2f}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    cmd = omp_prefix() + command_line(__file__, argv)
    t0 = time.time()
    target, tok = load_smollm2()
    if torch.cuda.is_available():
        target.to("cuda")
    train_rows, eval_rows = build_prompts(tok, args)
    log(f"target loaded, {len(train_rows)} training / {len(eval_rows)} evaluation prompts")
    results = run_arms(target, tok, train_rows, eval_rows, args)
    cost = None
    if args.cost_steps > 0:
        ours, gkd = ours_step_seconds(target, tok, train_rows, args), gkd_step_seconds(target, tok, train_rows, args)
        cost = {
            "ours_seconds": ours,
            "gkd_seconds": gkd,
            "ours_mean": _mean(ours[1:] or ours),
            "gkd_mean": _mean(gkd[1:] or gkd),
        }
        log(f"cost per step: ours {cost['ours_mean']:.3f} s, GKDTrainer {cost['gkd_mean']:.3f} s")
    record = {
        "command": cmd,
        "args": vars(args),
        "arms": results,
        "cost": cost,
        "seconds": time.time() - t0,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    log(f"wrote {args.out} ({record['seconds']:.0f} s)")
    if args.results:
        replace_section(
            Path(args.results), "## DistillSpec drafts", markdown(results, cost, args, cmd), "# Speculative drafts\n\n"
        )


if __name__ == "__main__":
    main()
