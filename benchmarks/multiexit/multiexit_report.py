"""Write ``benchmarks/multiexit/RESULTS_multiexit.md`` and the figures under ``benchmarks/multiexit/figures/`` from
the JSON results of ``multiexit_minilm_bbc.py``, ``multiexit_smollm2_austen.py`` and ``multiexit_fashion_mnist.py``.

Run with ``python benchmarks/multiexit/multiexit_report.py`` after the benchmarks (missing results are listed, not
invented). Notes written by hand (what was tried, round by round) live in
``benchmarks/multiexit/results/archive/multiexit_notes.md`` and are appended verbatim.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
import _harness  # noqa: E402, F401

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
FIG = HERE / "figures"
OUT = HERE / "RESULTS_multiexit.md"
NOTES = RES / "archive" / "multiexit_notes.md"


def _load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.is_file() else None


def _command(r) -> str:
    """The recorded command of a run, with the script path of the current layout (the JSONs of runs made before the
    benchmarks moved to ``benchmarks/multiexit/`` record ``benchmarks/multiexit_*.py``)."""
    return re.sub(r"\bbenchmarks/multiexit_(\w+\.py)\b", r"benchmarks/multiexit/multiexit_\1", r["command"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _steps_text(r) -> str:
    """'N steps', or 'N steps of an M-step schedule' for a run stopped (by its time limit) before its end."""
    planned = r["args"].get("steps")
    if r.get("stopped_at") and planned and planned != r["steps"]:
        return f"{r['steps']} steps (of a {planned}-step schedule, stopped: {r['stopped_at']})"
    return f"{r['steps']} steps"


def _minilm_settings(r) -> str:
    a = r["args"]
    names = {"embedding_mse": "MSE", "embedding_cosine": "cosine distance"}
    dist = names.get(a.get("distill_loss", "embedding_cosine"))
    if a.get("distill_normalize"):
        dist += " (L2-normalised)"
    w = a.get("weights", "depth")
    wtxt = {"depth": "k/6", "uniform": "1"}.get(w, f"[{w}] for exits {a['exits']}")
    terms = []
    if a.get("task_weight", 0) > 0:
        terms.append(f"InfoNCE title<->body (scale {a['scale']}) x {a['task_weight']}")
    if a.get("teacher_weight", 0) > 0:
        terms.append(
            f"{dist} of the exit's mean-pooled embedding to the frozen original model's x {a['teacher_weight']}"
        )
    if a.get("self_weight", 0) > 0:
        terms.append(f"{dist} to the deepest exit's embedding x {a['self_weight']}")
    lr = f"AdamW lr {a['lr']} (weight decay 0.01, {a.get('warmup', 0.1):.0%} warm-up, then linear decay, grad clip 1.0)"
    if a.get("shallow_lr_mult", 1.0) != 1.0:
        lr += f", x{a['shallow_lr_mult']} for encoder layers 1-{a['shallow_upto']} and the exit heads"
    if a.get("head_lr") is not None:
        lr += f", lr {a['head_lr']} for the exit heads"
    if a.get("head_init") == "lsq":
        lr += (
            f"; exit heads initialised by a per-dimension least-squares fit to the teacher on "
            f"{a['head_init_n']} training articles"
        )
    if a.get("anchor_sentences"):
        terms.append(
            f"{a['anchor_weight']} x MSE of the full model's mean-pooled embedding to the original's on "
            f"{a['anchor_sentences']} training body sentences per step (sentence anchor)"
        )
    if a.get("bf16"):
        lr += "; bfloat16 autocast on the student's training forwards (teacher, head init and every evaluation in fp32)"
    epochs = r.get("epochs", a.get("epochs"))
    return (
        f"Settings: exits {a['exits']}, head `{a['head']}` (per-exit elementwise affine, folded into the layer's "
        f"LayerNorm by `truncate`); {_steps_text(r)} of {a['batch']} training articles, each giving its title "
        f"and its body, both cut to {a['train_max_len']} tokens ({epochs:.2f} epochs of the "
        f"{r.get('train_articles', '')} train-split articles); {lr}; dropout "
        f"{'off' if a.get('no_dropout') else 'on'} during training; loss = sum over exits k of weight {wtxt} x ("
        + " + ".join(terms)
        + "). Training "
        f"{r['train_seconds'] / 60:.1f} min, whole run {r['total_seconds'] / 60:.1f} min on {r['threads']} "
        "thread(s) of a shared 2-core machine."
    )


def _phase_change(prev: dict, a: dict) -> str:
    """What a resumed phase changed against the phase before it (the loss, what trains, the schedule)."""
    ch = []
    if a.get("head") != prev.get("head"):
        ch.append(
            f"exit heads converted exactly to `{a['head']}`"
            + (
                " (each shallow exit's own copy of its block's feed-forward half, swapped in by `truncate`)"
                if a.get("head") == "ffn"
                else ""
            )
        )
    if a.get("freeze_shared") != prev.get("freeze_shared"):
        ch.append(
            "every shared weight frozen, only the exit heads train (the full model stays as loaded)"
            if a.get("freeze_shared")
            else "the shared weights train again"
        )
    if (a.get("task_weight", 0), a.get("scale")) != (prev.get("task_weight", 0), prev.get("scale")):
        ch.append(
            f"InfoNCE title<->body (scale {a['scale']}, training split, in-batch negatives) x {a['task_weight']}"
            " on every exit"
            if a.get("task_weight", 0) > 0
            else "no InfoNCE term"
        )
    if (a.get("ict", 0), a.get("ict_weight")) != (prev.get("ict", 0), prev.get("ict_weight")):
        ch.append(
            f"plus inverse-cloze InfoNCE on {a['ict']} (body sentence -> rest of that body) training pairs per "
            f"step x {a.get('ict_weight', 1.0)}"
            if a.get("ict")
            else "no inverse-cloze pairs"
        )
    if (a.get("anchor_sentences", 0), a.get("anchor_weight")) != (
        prev.get("anchor_sentences", 0),
        prev.get("anchor_weight"),
    ):
        ch.append(
            f"sentence anchor {a['anchor_sentences']} x weight {a['anchor_weight']}"
            if a.get("anchor_sentences")
            else "no sentence anchor"
        )
    if a.get("batch") != prev.get("batch"):
        ch.append(f"batch {a['batch']} articles")
    lr = (a.get("lr"), a.get("warmup"), a.get("shallow_lr_mult"), a.get("shallow_upto"))
    if lr != (prev.get("lr"), prev.get("warmup"), prev.get("shallow_lr_mult"), prev.get("shallow_upto")):
        mult = (
            f", x{a['shallow_lr_mult']} for layers 1-{a['shallow_upto']} and the heads"
            if a.get("shallow_lr_mult", 1.0) != 1.0
            else ""
        )
        ch.append(f"peak lr {a['lr']}{mult}, {a.get('warmup', 0.1):.0%} warm-up then linear decay")
    return "; ".join(ch) if ch else "same settings"


def _minilm_recipe(r) -> list[str]:
    """Settings and commands; a run trained in phases (``--resume``) lists every phase and the evaluation command."""
    phases = r.get("phases")
    if not phases:
        return [_minilm_settings(r), "", f"Command: `{_command(r)}`"]
    out = [_minilm_settings(phases[0])]
    for i in range(1, len(phases)):
        ph = phases[i]
        res = str(ph["args"].get("resume", ""))
        src = (
            f"phase {i}'s step-{res.rsplit('.step', 1)[1]} checkpoint"
            if ".step" in res.rsplit("/", 1)[-1]
            else f"phase {i}'s last weights"
        )
        out[0] += (
            f" Phase {i + 1}: {_steps_text(ph)} more from {src}, "
            + _phase_change(phases[i - 1]["args"], ph["args"])
            + f" (fresh optimizer and schedule, data-order seed {ph['args']['seed']}; training "
            f"{ph['train_seconds'] / 60:.1f} min)."
        )
    curves = [(i + 1, c) for i, ph in enumerate(phases) for c in ph.get("validation_curve", [])]
    if curves:
        sel = r.get("selected")
        chosen = (
            f"the reported model, in bold, is phase {sel['phase']} step {sel['step']}, picked by the rule "
            "written down before the run and"
            if sel
            else "the reported model is the last checkpoint, chosen"
        )
        ks = sorted(curves[0][1]["mrr"], key=int)[:-1]
        has_drift = any(c.get("drift") for _, c in curves)
        out += [
            "",
            "Validation curve (MRR ratio to the full model on the 300 validation articles"
            + (
                "; drift = the full model's mean cosine distance to the original on the validation titles and bodies"
                if has_drift
                else ""
            )
            + f"; {chosen} before the test split was evaluated):",
            "",
            "| phase | step | "
            + " | ".join(f"layers 1-{k}" for k in ks)
            + " | full MRR |"
            + (" drift |" if has_drift else ""),
            "|---|---|" + "---|" * (len(ks) + 1 + has_drift),
        ]
        for i, c in curves:
            full = max(c["mrr"], key=int)
            cells = [f"{c['mrr'][k] / c['mrr'][full]:.3f}" for k in ks] + [f"{c['mrr'][full]:.4f}"]
            if has_drift:
                d = c.get("drift") or {}
                cells.append(f"{(d['titles'] + d['bodies']) / 2:.3f}" if d else "")
            step = str(c["step"])
            if sel and (sel["phase"], sel["step"]) == (i, c["step"]):
                cells, step = [f"**{x}**" for x in cells], f"**{step}**"
            out.append(f"| {i} | {step} | " + " | ".join(cells) + " |")
    out += ["", "Commands (training phases, then the single test evaluation of the saved weights):", ""]
    out += [f"    {_command(ph)}" for ph in phases] + [f"    {_command(r)}"]
    return out


def minilm_section(r) -> list[str]:
    if r is None:
        return ["## 1. all-MiniLM-L6-v2, BBC title -> body retrieval", "", "_not run_", ""]
    before, after = r["before"], r["after"]
    a = r["args"]
    full = str(max(int(k) for k in after))
    full_b, full_a = before[full], after[full]
    ratio = {k: after[k] / full_a for k in after}
    split = r.get("eval_split", "test")
    exits = ", ".join(str(k) for k in a["exits"])
    lines = [
        f"## 1. all-MiniLM-L6-v2 with exits at layers {exits}: BBC title -> body MRR",
        "",
        f"{split.capitalize()} split: {r['eval_articles']} held-out articles (`split_articles(seed=0)`), titles "
        f"retrieve bodies among the {r['eval_articles']} {split} bodies; mean pooling, max {a['max_len']} tokens. "
        "Each row is the standalone `truncate(model, k)` (a plain `BertModel` with k layers)."
        + (
            " The MRRs after training were computed in one pass through the exits; exit k and `truncate(model, k)` "
            "are the same function (max |difference| of their normalised embeddings on 8 bodies: "
            f"{max(r['truncate_check_max_abs_diff'].values()):.1e})."
            if r.get("after_eval") == "exits" and r.get("truncate_check_max_abs_diff")
            else ""
        ),
        "",
        "| truncation | params | MRR before | MRR after | before / full before | after / full after | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    full_ok = full_b - full_a <= 0.01
    for k in sorted(after, key=int):
        if k == full:
            goal = f"full loses <= 0.01: {'met' if full_ok else 'missed'} ({full_a - full_b:+.3f})"
        else:
            goal = f">= 0.90: {'met' if ratio[k] >= 0.9 else 'missed'}"
        lines.append(
            f"| layers 1-{k} | {r['params'][k] / 1e6:.1f}M | {before[k]:.3f} | {after[k]:.3f} | "
            f"{before[k] / full_b:.3f} | {ratio[k]:.3f} | {goal} |"
        )
    via = []
    if "3" in ratio and ratio["3"] >= 0.9:
        via.append("layer 3")
    if "2" in ratio and "4" in ratio and ratio["2"] >= 0.9 and ratio["4"] >= 0.9:
        via.append("layers 2 and 4")
    if full_ok and via:
        verdict = f"**met** (via {' and via '.join(via)}; full model {full_a - full_b:+.3f} MRR)"
    else:
        why = [] if full_ok else [f"full model lost {full_b - full_a:.3f} MRR"]
        if not via:
            why.append("no qualifying truncation reached 90% of the full model")
        verdict = "**missed** (" + "; ".join(why) + ")"
    lines += [
        "",
        "Goal (issue #5): the layer-3 truncation, or both the layer-2 and layer-4 truncations, at >= 90% of "
        f"the full model's MRR while the full model loses at most 0.01 MRR: {verdict}.",
        "",
        f"Reference: the original model cut to its first 3 layers (no training): MRR {r['before_first3']:.3f}.",
        "",
        *_minilm_recipe(r),
        "",
        "![MiniLM exits](figures/multiexit_minilm_bbc.png)",
        "",
    ]
    plt = _plt()
    ks = sorted(after, key=int)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot([int(k) for k in ks], [before[k] for k in ks], "o--", label="before (plain truncation)")
    ax.plot([int(k) for k in ks], [after[k] for k in ks], "o-", label="after multi-exit training")
    ax.axhline(0.9 * full_a, color="grey", lw=0.8, ls=":", label="90% of full (after)")
    ax.set_xlabel("layers kept")
    ax.set_ylabel(f"title -> body MRR ({split})")
    ax.set_title("all-MiniLM-L6-v2 truncations, BBC News")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIG / "multiexit_minilm_bbc.png")
    plt.close(fig)
    return lines


def lm_section(r) -> list[str]:
    if r is None:
        return ["## 2. SmolLM2-135M, Jane Austen perplexity", "", "_not run_", ""]
    a = r["args"]
    lines = [
        "## 2. SmolLM2-135M with exits: held-out Jane Austen perplexity per exit",
        "",
        f"Held-out novel: `{a['eval_novel']}` ({a['eval_windows']} windows x {a['eval_seq']} tokens, never "
        "trained on). Exit k = its own RMSNorm copy + the shared tied LM head.",
        "",
        "| exit (layers) | perplexity before | perplexity after |",
        "|---|---|---|",
    ]
    for k in sorted(r["after"], key=int):
        lines.append(f"| {k} / 30 | {r['before'][k]:,.1f} | {r['after'][k]:,.1f} |")
    gb, ga = r["generation_before"], r["generation_after"]
    lines += [
        "",
        f"Early-exit greedy generation (`early_exit_generate`, confidence >= {ga['threshold']}, "
        f"{a['gen_prompts']} held-out prompts x {a['gen_tokens']} tokens): average answering depth "
        f"{gb['avg_depth']:.1f} -> {ga['avg_depth']:.1f} layers, agreement with the full model's greedy tokens "
        f"{gb['token_agreement']:.2f} -> {ga['token_agreement']:.2f}.",
        f"`truncate(model, {a['exits'][0]})` reproduces exit {a['exits'][0]} (max |logit difference| "
        f"{r['truncation_max_abs_diff']:.1e}).",
        "",
        f"Settings: {a['steps']} steps, batch {a['batch']} x {a['seq']} tokens from the other five novels, AdamW "
        f"lr {a['lr']} (warm-up + linear decay); trained: layers 1-{r.get('trained_layers', 30)} and the exit "
        f"norms ({r.get('trainable_params', 0) / 1e6:.0f}M params), frozen: tied embeddings / LM head, the "
        "layers above and the final norm; CE per exit weighted by k/30 + "
        f"KL self-distillation from layer 30 (weight {a['self_weight']}) + KL from a frozen copy of the original "
        f"model to every exit (weight {a.get('teacher_weight', 0.0)}). Training "
        f"{r['train_seconds'] / 60:.1f} min, whole run {r['total_seconds'] / 60:.1f} min.",
        "",
        f"Command: `{_command(r)}`",
        "",
        "![SmolLM2 exits](figures/multiexit_smollm2_austen.png)",
        "",
    ]
    plt = _plt()
    ks = sorted(r["after"], key=int)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.semilogy([int(k) for k in ks], [r["before"][k] for k in ks], "o--", label="before")
    ax.semilogy([int(k) for k in ks], [r["after"][k] for k in ks], "o-", label="after multi-exit training")
    ax.set_xlabel("exit layer")
    ax.set_ylabel(f"perplexity ({a['eval_novel']}, log scale)")
    ax.set_title("SmolLM2-135M exits, held-out Jane Austen")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIG / "multiexit_smollm2_austen.png")
    plt.close(fig)
    return lines


def fmnist_section(r) -> list[str]:
    from kd_plugins.multiexit import plot_accuracy_vs_depth

    if r is None:
        return ["## 3. Fashion-MNIST, timm ViT and ResNet", "", "_not run_", ""]
    a = r["args"]
    lines = [
        "## 3. Fashion-MNIST: timm ViT and ResNet, accuracy per exit and early exit",
        "",
        f"{a['train']} training images (seeded subset), first {a['test']} test images; {a['steps']} steps of "
        f"batch {a['batch']}, AdamW lr {a['lr']} one-cycle, seed {a['seed']}; both models from scratch.",
        "",
    ]
    for arch in ("vit", "resnet"):
        if arch not in r:
            continue
        x = r[arch]
        std, me = x["standard"], x["multi_exit"]
        name = "ViT (6 blocks, width 64)" if arch == "vit" else "ResNet-18 layout (channels 16-128)"
        lines += [
            f"### {name}, exits {x['exits']}",
            "",
            "| exit | standard training + probe heads | multi-exit training | truncated model params |",
            "|---|---|---|---|",
        ]
        for k in sorted(me["per_exit"], key=int):
            lines.append(
                f"| {k} / {x['num_layers']} | {std['per_exit'][k]:.4f} | {me['per_exit'][k]:.4f} | "
                f"{me['truncations'][k]['params']:,} |"
            )
        pts = sorted(me["curve"], key=lambda p: p["threshold"])
        lines += [
            "",
            "Early exit (multi-exit model): threshold -> accuracy @ average depth: "
            + "; ".join(
                f"{p['threshold']}: {p['accuracy']:.4f} @ {p['average_depth']:.2f}"
                for p in pts
                if p["threshold"] in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
            )
            + ".",
            "`early_exit_classify` at 0.9 on 1,000 test images: accuracy "
            f"{me['early_exit_check']['inference_accuracy']:.4f}"
            f" @ depth {me['early_exit_check']['inference_avg_depth']:.2f} (simulated: "
            f"{me['early_exit_check']['simulated_accuracy']:.4f} @ "
            f"{me['early_exit_check']['simulated_avg_depth']:.2f})."
            f" Training time: standard {std['train_seconds']:.0f} s (incl. probes), multi-exit "
            f"{me['train_seconds']:.0f} s.",
            "",
            f"![{arch} early exit](figures/multiexit_fmnist_{arch}.png)",
            "",
        ]
        plot_accuracy_vs_depth(
            {"multi-exit": me["curve"], "standard + probes": std["curve"]},
            FIG / f"multiexit_fmnist_{arch}.png",
            num_layers=x["num_layers"],
            per_exit={
                "multi-exit": {int(k): v for k, v in me["per_exit"].items()},
                "standard + probes": {int(k): v for k, v in std["per_exit"].items()},
            },
            title=f"Fashion-MNIST {arch}: accuracy vs average depth",
        )
    lines += [f"Command: `{_command(r)}` ({r['total_seconds'] / 60:.1f} min)", ""]
    return lines


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options; gives --help
    FIG.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Multi-exit self-distillation benchmarks (kd_plugins.multiexit)",
        "",
        "Generated by `python benchmarks/multiexit/multiexit_report.py` from "
        "`benchmarks/multiexit/results/multiexit_*.json`. "
        "CPU only (2 shared cores); HF_HUB_OFFLINE=1; models and data from PyPI / Debian packages.",
        "",
    ]
    lines += minilm_section(_load("multiexit_minilm.json"))
    lines += lm_section(_load("multiexit_smollm2.json"))
    lines += fmnist_section(_load("multiexit_fashion_mnist.json"))
    if NOTES.is_file():
        lines += [NOTES.read_text().rstrip(), ""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
