"""LLaVA-MoD for text LMs on SmolLM2: a dense vs an upcycled MoE student, mimic then preference distillation.

Setup (fixed before any run):

* Text: Jane Austen's novels (Debian ``r-cran-janeaustenr``). Training text: the five novels other than
  *Persuasion*; held-out text: *Persuasion*. Token windows of ``--seq-len`` tokens (``lm_windows``).
* Teacher: SmolLM2-135M-Instruct fine-tuned on the training windows for ``--teacher-steps`` steps (an unmodified
  ``Trainer``, cross-entropy), then frozen.
* Students, cut from the fine-tuned teacher by ``inherit_student`` (``--student-layers`` = 10 of its 30 layers,
  uniform): ``dense`` (as cut), ``moe`` (``upcycle_moe``: every other layer, 4 experts, top-2, balance loss 0.01 through
  ``MoEBalanceCallback``) and ``moe_nobalance`` (the same, ``balance_weight=0``: loads logged, no balance term).
* Stage 1, mimic distillation: ``DistillationCallback(teacher, loss_terms="kl")`` (T = 1, no hard labels, as the
  paper's mimic stage), ``--mimic-steps`` steps, the same batches for every student.
* Stage 2, preference distillation (``dense`` and ``moe``): ``PreferenceDistillationCallback(teacher, beta=0.1)``
  (DPO, sigmoid form, the frozen teacher as reference) for ``--pref-steps`` steps on pairs ``(prompt, chosen,
  rejected)``: prompt = ``--prompt-tokens`` tokens of a training-novel passage, chosen = its next
  ``--answer-tokens`` tokens, rejected = as many tokens from a passage of another training novel.
* Metrics: held-out perplexity on *Persuasion* windows (after each stage); expert load after mimic (share of the
  token assignments per expert, max and min over experts averaged over the MoE layers; balanced: 0.25 each) and the
  balance loss; on held-out pairs (prompt and chosen from *Persuasion*, rejected from a training novel) the share of
  pairs whose student preference margin ``log p_S(chosen) - log p_S(rejected)`` exceeds the teacher's, and the
  share the student itself ranks right (margin > 0). The upcycled student saved with ``save_moe`` and reloaded with
  ``load_moe`` gives bit-identical logits (checked).

``--smoke`` runs every stage for 2 steps on a few short windows to check the script end to end (its figures mean
nothing; it writes only its JSON under ``.cache/``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, ROOT, command_line, log, omp_prefix, replace_section, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402

from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2, perplexity  # noqa: E402

HELDOUT = "persuasion"
STUDENTS = ("dense", "moe", "moe_nobalance")
SMOKE = dict(
    seq_len=32,
    train_windows=16,
    eval_windows=4,
    teacher_steps=2,
    mimic_steps=2,
    pref_steps=2,
    train_pairs=8,
    eval_pairs=4,
    prompt_tokens=12,
    answer_tokens=6,
    batch_size=2,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-windows", type=int, default=240, help="training windows (teacher fine-tune and mimic)")
    p.add_argument("--eval-windows", type=int, default=48, help="held-out Persuasion windows")
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--mimic-steps", type=int, default=60)
    p.add_argument("--pref-steps", type=int, default=30)
    p.add_argument("--train-pairs", type=int, default=240)
    p.add_argument("--eval-pairs", type=int, default=96)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--student-layers", type=int, default=10, help="layers of the students (of the teacher's 30)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="mimic and teacher fine-tune (AdamW, cosine)")
    p.add_argument("--pref-lr", type=float, default=2e-5, help="preference distillation")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help=f"toy sizes, end-to-end check only: {SMOKE}")
    p.add_argument("--out", default=None, help="JSON results (default: results/llava_mod_smollm2.json here)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.threads = args.threads or 1
        args.out = args.out or str(ROOT / ".cache" / "moe" / "llava_mod_smoke.json")
    args.out = args.out or str(BENCHMARKS / "moe" / "results" / "llava_mod_smollm2.json")
    return args


# ---------------------------------------------------------------------------------------------------------- data
def build_data(tok, args) -> dict:
    books = jane_austen_texts()
    train_books = {k: v for k, v in sorted(books.items()) if k != HELDOUT}
    train_text = "\n\n".join(train_books.values())
    train = lm_windows(tok, train_text, args.seq_len, args.train_windows)
    rng = random.Random(args.seed)
    return {
        "train": [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in train],
        "eval": lm_windows(tok, books[HELDOUT], args.seq_len, args.eval_windows),
        "train_pairs": preference_pairs(tok, train_books, train_books, args.train_pairs, args, rng),
        "eval_pairs": preference_pairs(tok, {HELDOUT: books[HELDOUT]}, train_books, args.eval_pairs, args, rng),
    }


def preference_pairs(tok, sources: dict, others: dict, n: int, args, rng: random.Random) -> list[dict]:
    """``n`` pairs: a passage of a ``sources`` novel (prompt + true continuation) and, as the rejected answer, as
    many tokens from a passage of another novel of ``others`` (token ids)."""
    span = args.prompt_tokens + args.answer_tokens
    ids = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in {**others, **sources}.items()}
    names = sorted(sources)
    pairs = []
    for i in range(n):
        book = names[i % len(names)]
        start = rng.randrange(0, len(ids[book]) - span)
        text = ids[book][start : start + span]
        other = rng.choice([k for k in sorted(others) if k != book])
        o_start = rng.randrange(0, len(ids[other]) - args.answer_tokens)
        pairs.append(
            {
                "prompt": text[: args.prompt_tokens],
                "chosen": text[args.prompt_tokens :],
                "rejected": ids[other][o_start : o_start + args.answer_tokens],
            }
        )
    return pairs


# ---------------------------------------------------------------------------------------------------------- training
def training_args(out_dir: str, steps: int, lr: float, args, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
        **kw,
    )


def fine_tune_teacher(model, data, args, out_dir: str):
    from transformers import Trainer

    model.requires_grad_(True).train()
    Trainer(
        model=model, args=training_args(out_dir, args.teacher_steps, args.lr, args), train_dataset=data["train"]
    ).train()
    return model.eval().requires_grad_(False)


def make_student(teacher, kind: str, args):
    import kd_plugins

    student = kd_plugins.inherit_student(teacher, num_layers=args.student_layers, strategy="uniform")
    student.requires_grad_(True).train()
    if kind != "dense":
        kd_plugins.upcycle_moe(student, num_experts=4, top_k=2, layers="every_other")
    return student


def moe_callback(kind: str):
    from kd_plugins import MoEBalanceCallback

    if kind == "dense":
        return []
    return [MoEBalanceCallback(balance_weight=0.01 if kind == "moe" else 0.0)]


def mimic(student, teacher, kind: str, data, args, out_dir: str) -> dict:
    from transformers import Trainer

    from kd_plugins import DistillationCallback

    callbacks = [DistillationCallback(teacher, loss_terms="kl", hard_label_weight=0.0), *moe_callback(kind)]
    trainer = Trainer(
        model=student,
        args=training_args(out_dir, args.mimic_steps, args.lr, args, remove_unused_columns=False),
        train_dataset=data["train"],
        callbacks=callbacks,
    )
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kd_kl" in h]
    tail = logs[-max(1, len(logs) // 4) :]
    out = {
        "mimic_seconds": round(time.time() - t0, 1),
        "kd_kl_last_quarter": sum(h["kd_kl"] for h in tail) / len(tail),
    }
    if kind != "dense":
        out["moe_balance_last_quarter"] = sum(h["moe_balance"] for h in tail) / len(tail)
    return out


def preference(student, teacher, kind: str, data, args, out_dir: str) -> dict:
    from transformers import Trainer

    from kd_plugins import PreferenceDistillationCallback
    from kd_plugins.moe import PreferenceCollator

    trainer = Trainer(
        model=student,
        args=training_args(out_dir, args.pref_steps, args.pref_lr, args, remove_unused_columns=False),
        train_dataset=data["train_pairs"],
        data_collator=PreferenceCollator(add_eos=False),
        callbacks=[PreferenceDistillationCallback(teacher, beta=args.beta), *moe_callback(kind)],
    )
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "pref_loss" in h]
    tail = logs[-max(1, len(logs) // 4) :]
    return {
        "pref_seconds": round(time.time() - t0, 1),
        "pref_loss_last_quarter": sum(h["pref_loss"] for h in tail) / len(tail),
        "pref_reward_accuracy_last_quarter": sum(h["pref_reward_accuracy"] for h in tail) / len(tail),
    }


# ---------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def margins(model, pairs: list[dict], batch_size: int) -> torch.Tensor:
    """``log p(chosen) - log p(rejected)`` per pair (sums over the answer tokens)."""
    from kd_plugins.moe import PreferenceCollator, sequence_logprobs

    was = model.training
    model.eval()
    out = []
    collate = PreferenceCollator(add_eos=False)
    for i in range(0, len(pairs), batch_size):
        batch = collate(pairs[i : i + batch_size])
        side = {
            s: sequence_logprobs(
                model, batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"], batch[f"{s}_completion_mask"]
            )
            for s in ("chosen", "rejected")
        }
        out.append(side["chosen"] - side["rejected"])
    model.train(was)
    return torch.cat(out)


def expert_loads(model, windows: torch.Tensor) -> dict:
    """Share of the token assignments per expert on ``windows``: max / min over experts, mean over MoE layers."""
    from kd_plugins.moe import expert_load, record_router

    was = model.training
    model.eval()
    with torch.no_grad(), record_router(model):
        for i in range(0, windows.shape[0], 8):
            model(input_ids=windows[i : i + 8])
        loads = torch.stack(list(expert_load(model).values()))
    model.train(was)
    return {
        "load_max": float(loads.max(-1).values.mean()),
        "load_min": float(loads.min(-1).values.mean()),
        "load_per_layer": [[round(float(v), 4) for v in row] for row in loads],
    }


def reload_check(model, tok, windows: torch.Tensor) -> bool:
    """``save_moe`` + ``load_moe`` give bit-identical logits."""
    from kd_plugins import load_moe, save_moe

    model.eval()
    with tempfile.TemporaryDirectory(prefix="llava_mod_") as tmp:
        save_moe(model, tmp, tokenizer=tok)
        again = load_moe(tmp)
        with torch.no_grad():
            same = torch.equal(model(input_ids=windows[:2]).logits, again(input_ids=windows[:2]).logits)
    return bool(same)


# ---------------------------------------------------------------------------------------------------------- report
def table(record: dict) -> str:
    t = record["teacher"]
    lines = [
        "| model | held-out ppl after mimic | after preference | expert load max / min | balance loss | "
        "pairs: margin > teacher's | pairs ranked right |",
        "|---|---|---|---|---|---|---|",
        f"| teacher (30 layers, fine-tuned) | {t['ppl']:.2f} | - | - | - | - | {t['pairs_right']:.3f} |",
    ]
    for r in record["students"]:
        load = f"{r['load_max']:.3f} / {r['load_min']:.3f}" if "load_max" in r else "-"
        bal = f"{r['moe_balance_last_quarter']:.3f}" if "moe_balance_last_quarter" in r else "-"
        after = f"{r['ppl_after_pref']:.2f}" if "ppl_after_pref" in r else "-"
        beats = (
            f"{r['beats_teacher_before']:.3f} -> {r['beats_teacher_after']:.3f}"
            if "beats_teacher_after" in r
            else (f"{r['beats_teacher_before']:.3f}")
        )
        right = (
            f"{r['right_before']:.3f} -> {r['right_after']:.3f}" if "right_after" in r else f"{r['right_before']:.3f}"
        )
        lines.append(f"| {r['student']} | {r['ppl_after_mimic']:.2f} | {after} | {load} | {bal} | {beats} | {right} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    t_start = time.time()
    base, tok = load_smollm2()
    data = build_data(tok, args)
    log(f"data: {len(data['train'])} windows, {len(data['train_pairs'])} / {len(data['eval_pairs'])} pairs")
    record = {"command": omp_prefix() + command_line(__file__), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="llava_mod_bench_") as tmp:
        record["base_ppl"] = perplexity(base, data["eval"], batch_size=4)
        teacher = fine_tune_teacher(base, data, args, f"{tmp}/teacher")
        t_margins = margins(teacher, data["eval_pairs"], args.batch_size)
        record["teacher"] = {
            "ppl": perplexity(teacher, data["eval"], batch_size=4),
            "pairs_right": float((t_margins > 0).float().mean()),
        }
        log(f"teacher: base ppl {record['base_ppl']:.2f} -> {record['teacher']}")
        record["students"] = []
        for kind in STUDENTS:
            torch.manual_seed(args.seed)
            student = make_student(teacher, kind, args)
            row = {"student": kind, **mimic(student, teacher, kind, data, args, f"{tmp}/{kind}")}
            row["ppl_after_mimic"] = perplexity(student, data["eval"], batch_size=4)
            if kind != "dense":
                row.update(expert_loads(student, data["eval"]))
            m = margins(student, data["eval_pairs"], args.batch_size)
            row["beats_teacher_before"] = float((m > t_margins).float().mean())
            row["right_before"] = float((m > 0).float().mean())
            if kind != "moe_nobalance":
                row.update(preference(student, teacher, kind, data, args, f"{tmp}/{kind}_pref"))
                row["ppl_after_pref"] = perplexity(student, data["eval"], batch_size=4)
                m = margins(student, data["eval_pairs"], args.batch_size)
                row["beats_teacher_after"] = float((m > t_margins).float().mean())
                row["right_after"] = float((m > 0).float().mean())
            if kind == "moe":
                row["reload_bit_identical"] = reload_check(student, tok, data["eval"])
            log(f"{kind}: {json.dumps({k: v for k, v in row.items() if k != 'load_per_layer'})}")
            record["students"].append(row)
            del student
    record["seconds"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(table(record))
    log(f"wrote {out} ({record['seconds']} s)")
    if not args.smoke:
        section = (
            "## LLaVA-MoD on SmolLM2 (mimic + preference distillation)\n\n"
            f"`{record['command']}` ({record['seconds']:.0f} s)\n\n{table(record)}\n"
        )
        replace_section(BENCHMARKS / "moe" / "RESULTS_moe.md", "## LLaVA-MoD on SmolLM2", section, "# MoE students\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
