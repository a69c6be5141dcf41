"""Serving a distilled draft on CPU: its LM head cut to the frequent tokens (FR-Spec) x draft tokens per round.

A 6-layer draft cut from SmolLM2-135M-Instruct keeps the target's 49,152-row LM head, as many weights as 8 of its
transformer blocks, so at batch 1 each drafted token costs about 0.4 of a target token and assisted generation is
slower than the target alone (``distillspec_smollm2.py``: 0.62x with the best draft). This script takes a draft saved
by ``distillspec_smollm2.py --save-drafts DIR`` and measures, through the public API
(:func:`kd_plugins.speculative.frequent_token_ids`, :func:`~kd_plugins.speculative.restrict_draft_vocab`,
:func:`~kd_plugins.speculative.measure_speculative`):

* **Validation** (picks the setting): every LM-head size of ``--vocab-sizes`` (0: the full head) x every number of
  draft tokens per round of ``--gammas``, greedy assisted generation against the target alone on ``--val-prompts``
  prompts from the *training* sources that the draft was not trained on (BBC training-split articles after the
  training ones, Austen paragraphs of the five training novels between the training ones).
* **Test** (once): the setting with the highest validation speedup, and the unmodified draft at gamma 4 (the
  distillation benchmark's setting), on the evaluation prompts of ``distillspec_smollm2.py`` (BBC test split and
  *Persuasion*).

The kept tokens are the most frequent ones of training text only: the training rows (chat-template prompts and
reference completions), the BBC training-split articles and the five Austen novels other than *Persuasion*, plus the
tokenizer's special tokens. Greedy assisted generation is checked lossless in every measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import (  # noqa: E402
    BENCHMARKS,
    command_line,
    log,
    omp_prefix,
    replace_section,
    set_threads_and_seed,
    use_benchmark,
)

# isort: split
import torch  # noqa: E402

use_benchmark("speculative")
import distillspec_smollm2 as ds  # noqa: E402

from benchmarks.data.bbc import load_bbc_news, split_articles  # noqa: E402
from benchmarks.data.lm import AUSTEN_NOVELS, jane_austen_texts, load_smollm2  # noqa: E402
from kd_plugins.speculative import frequent_token_ids, measure_speculative, restrict_draft_vocab  # noqa: E402

REPORTED = (
    "speedup",
    "mean_accepted_per_round",
    "acceptance_rate",
    "all_lossless",
    "rounds",
    "target_seconds",
    "assisted_seconds",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--draft", required=True, help="a draft saved by distillspec_smollm2.py --save-drafts (ARM dir)")
    p.add_argument("--vocab-sizes", default="0,4096,8192,16384", help="LM-head sizes tried (0: the full head)")
    p.add_argument("--gammas", default="1,2,3,4", help="draft tokens per round tried")
    p.add_argument("--val-prompts", type=int, default=8, help="validation prompts, half BBC, half Austen")
    p.add_argument("--eval-prompts", type=int, default=8, help="as distillspec_smollm2.py --eval-prompts")
    p.add_argument("--eval-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--train-prompts", type=int, default=1024, help="as distillspec_smollm2.py (kept out of val)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="as distillspec_smollm2.py (reference length)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(BENCHMARKS / "speculative" / "results" / "draft_serving_speed.json"))
    p.add_argument(
        "--results",
        default=str(BENCHMARKS / "speculative" / "RESULTS_distillspec.md"),
        help="markdown file the table is written to ('' to skip)",
    )
    args = p.parse_args(argv)
    args.vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    args.gammas = [int(g) for g in args.gammas.split(",")]
    return args


def validation_rows(tok, args) -> list[dict]:
    """Prompts from the training sources that the training rows do not use (see the module docstring)."""
    split = split_articles(load_bbc_news())
    n_bbc, n_austen = args.val_prompts - args.val_prompts // 2, args.val_prompts // 2
    n_train_bbc, n_train_austen = args.train_prompts - args.train_prompts // 2, args.train_prompts // 2
    bbc = ds.bbc_examples(split.train, n_train_bbc + n_bbc)[n_train_bbc:]
    books = jane_austen_texts()
    # austen_examples picks paragraphs evenly spaced over its pool; twice as many picks interleave between them.
    pool = ds.austen_examples([books[b] for b in AUSTEN_NOVELS if b != ds.EVAL_NOVEL], 2 * n_train_austen)
    used = set(ds.austen_examples([books[b] for b in AUSTEN_NOVELS if b != ds.EVAL_NOVEL], n_train_austen))
    spare = [ex for ex in pool if ex not in used]
    austen = [spare[i * len(spare) // n_austen] for i in range(n_austen)]
    return ds.encode(tok, ds._interleave(bbc, austen), args.max_new_tokens)


def training_token_counts_source(tok, train_rows) -> list[list[int]]:
    """Training text only: the training rows, the BBC training split, the five training novels."""
    split = split_articles(load_bbc_news())
    books = jane_austen_texts()
    texts = [f"{a.title}\n{a.body}" for a in split.train]
    texts += [books[b] for b in AUSTEN_NOVELS if b != ds.EVAL_NOVEL]
    ids = [r["input_ids"] for r in train_rows]
    ids += [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ids


def decode_ms_per_token(model, prompt: list[int], repeats: int = 3) -> float:
    """Milliseconds per generated token of greedy ``generate`` with the KV cache, batch 1: (time of 33 tokens - time
    of 1 token) / 32, fastest of ``repeats``, so the prompt's prefill and the call's setup cancel out."""
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
                )
            best = min(best, time.perf_counter() - t0)
        return best

    run(2)  # warm-up
    return (run(33) - run(1)) / 32 * 1e3


def measure(target, draft, tok, rows, gamma: int, args) -> dict:
    report = measure_speculative(
        target, draft, [r["prompt"] for r in rows], tok, num_draft_tokens=gamma, max_new_tokens=args.eval_tokens
    )
    return {k: report.as_dict()[k] for k in REPORTED}


def markdown(record: dict) -> str:
    args, val, test = record["args"], record["validation"], record["test"]
    lines = [
        "## Serving the draft: LM head cut to the frequent tokens",
        "",
        f"Command: `{record['command']}` ({record['seconds']:.0f} s, {record['threads']} threads). Draft: "
        f"`{args['draft']}`. Validation: {args['val_prompts']} prompts from the training sources not trained on; "
        f"test: the {args['eval_prompts']} evaluation prompts, {args['eval_tokens']} greedy tokens each.",
        "",
        "Cost of one generated token (greedy `generate`, batch 1, KV cache; ms): "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in record["decode_ms_per_token"].items())
        + ".",
        "",
        "Validation (speedup of greedy assisted generation over the target alone; accepted tokens per round):",
        "",
        "| LM head rows | " + " | ".join(f"gamma {g}" for g in args["gammas"]) + " |",
        "|---" * (len(args["gammas"]) + 1) + "|",
    ]
    for k in args["vocab_sizes"]:
        cells = []
        for g in args["gammas"]:
            r = val[f"{k}/{g}"]
            cells.append(f"{r['speedup']:.2f}x ({r['mean_accepted_per_round']:.2f})")
        lines.append(f"| {k or 'full (49,152)'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test (once, the setting picked on validation and the unmodified draft):",
        "",
        "| setting | speedup | accepted / round | accepted / proposed | lossless | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in test.items():
        lines.append(
            f"| {name} | **{r['speedup']:.2f}x** | {r['mean_accepted_per_round']:.3f} | {r['acceptance_rate']:.3f} "
            f"| {r['all_lossless']} | {r['rounds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    set_threads_and_seed(args.threads, 0)
    cmd = omp_prefix() + command_line(__file__, argv)
    t0 = time.time()
    target, tok = load_smollm2()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    ds_args = argparse.Namespace(
        train_prompts=args.train_prompts, eval_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens
    )
    train_rows, eval_rows = ds.build_prompts(tok, ds_args)
    val_rows = validation_rows(tok, args)
    eval_prompts = {tuple(r["prompt"]) for r in eval_rows} | {tuple(r["prompt"]) for r in train_rows}
    if any(tuple(r["prompt"]) in eval_prompts for r in val_rows):
        raise RuntimeError("a validation prompt is also a training or evaluation prompt")
    counts_source = training_token_counts_source(tok, train_rows)
    vocab = target.config.vocab_size
    drafts = {0: draft}
    for k in args.vocab_sizes:
        if k:
            keep = frequent_token_ids(counts_source, k, vocab_size=vocab, always=tok.all_special_ids)
            drafts[k] = restrict_draft_vocab(copy.deepcopy(draft), keep)
    log(f"loaded; {len(val_rows)} validation / {len(eval_rows)} test prompts; heads {sorted(drafts)}")
    prompt = val_rows[0]["prompt"]
    decode_ms = {"target": decode_ms_per_token(target, prompt)}
    decode_ms.update({f"draft head {k or 'full'}": decode_ms_per_token(drafts[k], prompt) for k in sorted(drafts)})
    log(f"decode ms / token: {json.dumps(decode_ms)}")
    validation = {}
    for k in args.vocab_sizes:
        for g in args.gammas:
            validation[f"{k}/{g}"] = r = measure(target, drafts[k], tok, val_rows, g, args)
            log(f"validation head {k or 'full'} gamma {g}: {json.dumps(r)}")
    best = max(validation, key=lambda key: validation[key]["speedup"])
    k, g = (int(x) for x in best.split("/"))
    log(f"picked on validation: head {k or 'full'}, gamma {g}")
    test = {
        f"head {k or 'full'}, gamma {g} (picked)": measure(target, drafts[k], tok, eval_rows, g, args),
        "full head, gamma 4 (unmodified)": measure(target, drafts[0], tok, eval_rows, 4, args),
    }
    for name, r in test.items():
        log(f"test {name}: {json.dumps(r)}")
    record = {
        "command": cmd,
        "args": vars(args),
        "decode_ms_per_token": decode_ms,
        "validation": validation,
        "picked": best,
        "test": test,
        "seconds": time.time() - t0,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    log(f"wrote {args.out}")
    if args.results:
        replace_section(Path(args.results), "## Serving the draft", markdown(record), "# Speculative drafts\n\n")


if __name__ == "__main__":
    main()
