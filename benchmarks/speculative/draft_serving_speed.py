"""Serving a distilled draft on CPU: few-row GEMMs, an int8 body, the LM head cut to the frequent tokens.

A 6-layer draft cut from SmolLM2-135M-Instruct keeps the target's 49,152-row LM head, as many weights as 8 of its
transformer blocks, so at batch 1 each drafted token costs about 0.4 of a target token; and on this CPU the target's
verification forward over ``gamma + 1`` tokens costs far more than one decoded token (``verify_row_cost.py``). This
script takes a draft saved by ``distillspec_smollm2.py --save-drafts DIR`` and measures, through the public API
(:func:`kd_plugins.speculative.use_few_row_gemm`, :func:`kd_plugins.quantize`,
:func:`~kd_plugins.speculative.frequent_token_ids`, :func:`~kd_plugins.speculative.restrict_draft_vocab`,
:func:`~kd_plugins.speculative.measure_speculative`):

* **Decode cost** of one token (greedy ``generate``, batch 1) for the target with and without few-row GEMMs, and for
  every draft form.
* **Validation** (picks the setting): every LM-head size of ``--vocab-sizes`` (0: the full head) x draft body
  (``--draft-dtypes``: ``fp32``, or ``int8`` = ``kd_plugins.quantize`` with its default W8A8 method) x draft tokens per
  round (``--gammas``), greedy assisted generation against the target alone on ``--val-prompts`` prompts from the
  *training* sources that the draft was not trained on (BBC training-split articles after the training ones, Austen
  paragraphs of the five training novels between the training ones).
* **Test** (once): the setting with the highest validation speedup, and the unmodified draft (full head, fp32) at
  gamma 4 (the distillation benchmark's setting), on the evaluation prompts of ``distillspec_smollm2.py`` (BBC test
  split and *Persuasion*).

With ``--few-row-gemm`` (default) the target and every draft run :func:`~kd_plugins.speculative.use_few_row_gemm`,
so the target-alone baseline of every speedup is the faster target. The kept tokens are the most frequent ones of
training text only: the training rows (chat-template prompts and reference completions), the BBC training-split
articles and the five Austen novels other than *Persuasion*, plus the tokenizer's special tokens. Greedy assisted
generation is checked lossless in every measurement.
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
from kd_plugins import quantize  # noqa: E402
from kd_plugins.speculative import (  # noqa: E402
    frequent_token_ids,
    measure_speculative,
    restrict_draft_vocab,
    use_few_row_gemm,
)

SECTION = "## Serving the draft on CPU"
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
    p.add_argument("--vocab-sizes", default="0,4096", help="LM-head sizes tried (0: the full head)")
    p.add_argument("--gammas", default="1,2,3,4", help="draft tokens per round tried")
    p.add_argument("--draft-dtypes", default="fp32,int8", help="draft bodies tried: fp32, int8 (kd_plugins.quantize)")
    p.add_argument(
        "--few-row-gemm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use_few_row_gemm on the target and every draft",
    )
    p.add_argument("--val-prompts", type=int, default=8, help="validation prompts, half BBC, half Austen")
    p.add_argument("--eval-prompts", type=int, default=8, help="as distillspec_smollm2.py --eval-prompts")
    p.add_argument("--eval-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--train-prompts", type=int, default=1024, help="as distillspec_smollm2.py (kept out of val)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="as distillspec_smollm2.py (reference length)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(BENCHMARKS / "speculative" / "results" / "draft_serving_speed_gemm_int8.json"))
    p.add_argument(
        "--results",
        default=str(BENCHMARKS / "speculative" / "RESULTS_distillspec.md"),
        help="markdown file the table is written to ('' to skip)",
    )
    args = p.parse_args(argv)
    args.vocab_sizes = [int(v) for v in args.vocab_sizes.split(",")]
    args.gammas = [int(g) for g in args.gammas.split(",")]
    args.draft_dtypes = args.draft_dtypes.split(",")
    if not set(args.draft_dtypes) <= {"fp32", "int8"}:
        raise SystemExit(f"--draft-dtypes: fp32 and/or int8, got {args.draft_dtypes}")
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


def _form(k: int, dtype: str) -> str:
    return f"head {k or 'full'}, {dtype}"


def markdown(record: dict) -> str:
    args, val, test = record["args"], record["validation"], record["test"]
    gemm = "few-row GEMMs on target and draft" if args["few_row_gemm"] else "plain nn.Linear"
    lines = [
        f"{SECTION}: {gemm}, draft body fp32 or int8, LM head full or cut",
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
        "| draft form | " + " | ".join(f"gamma {g}" for g in args["gammas"]) + " |",
        "|---" * (len(args["gammas"]) + 1) + "|",
    ]
    for k in args["vocab_sizes"]:
        for dtype in args["draft_dtypes"]:
            cells = []
            for g in args["gammas"]:
                r = val[f"{k}/{dtype}/{g}"]
                cells.append(f"{r['speedup']:.2f}x ({r['mean_accepted_per_round']:.2f})")
            lines.append(f"| {_form(k, dtype)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test (once, the setting picked on validation and the unmodified draft):",
        "",
        "| setting | speedup | accepted / round | accepted / proposed | lossless | rounds | target s | assisted s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in test.items():
        lines.append(
            f"| {name} | **{r['speedup']:.2f}x** | {r['mean_accepted_per_round']:.3f} | {r['acceptance_rate']:.3f} "
            f"| {r['all_lossless']} | {r['rounds']} | {r['target_seconds']:.1f} | {r['assisted_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def draft_forms(draft, tok, counts_source, vocab: int, args) -> dict:
    """``{(head size, dtype): draft}``: every head size of ``--vocab-sizes`` x body of ``--draft-dtypes``."""
    forms = {}
    for k in args.vocab_sizes:
        cut = copy.deepcopy(draft)
        if k:
            keep = frequent_token_ids(counts_source, k, vocab_size=vocab, always=tok.all_special_ids)
            restrict_draft_vocab(cut, keep)
        for dtype in args.draft_dtypes:
            form = copy.deepcopy(cut)
            if dtype == "int8":
                quantize(form)  # the default W8A8 method; the LM head stays in float (its default skip)
            if args.few_row_gemm:
                use_few_row_gemm(form)
            forms[(k, dtype)] = form.eval()
    return forms


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
    prompt = val_rows[0]["prompt"]
    decode_ms = {"target": decode_ms_per_token(target, prompt)}
    if args.few_row_gemm:
        use_few_row_gemm(target)
        decode_ms["target few-row GEMM"] = decode_ms_per_token(target, prompt)
    drafts = draft_forms(draft, tok, counts_source, target.config.vocab_size, args)
    log(f"loaded; {len(val_rows)} validation / {len(eval_rows)} test prompts; draft forms {sorted(drafts)}")
    decode_ms.update({f"draft {_form(*key)}": decode_ms_per_token(d, prompt) for key, d in sorted(drafts.items())})
    log(f"decode ms / token: {json.dumps(decode_ms)}")
    validation = {}
    for (k, dtype), d in sorted(drafts.items()):
        for g in args.gammas:
            validation[f"{k}/{dtype}/{g}"] = r = measure(target, d, tok, val_rows, g, args)
            log(f"validation {_form(k, dtype)} gamma {g}: {json.dumps(r)}")
    best = max(validation, key=lambda key: validation[key]["speedup"])
    k, dtype, g = best.split("/")
    k, g = int(k), int(g)
    log(f"picked on validation: {_form(k, dtype)}, gamma {g}")
    unmodified = drafts.get((0, "fp32"))
    if unmodified is None:
        unmodified = draft_forms(draft, tok, counts_source, target.config.vocab_size, _only_full_fp32(args))[
            (0, "fp32")
        ]
    test = {
        f"{_form(k, dtype)}, gamma {g} (picked)": measure(target, drafts[(k, dtype)], tok, eval_rows, g, args),
        "head full, fp32, gamma 4 (unmodified)": measure(target, unmodified, tok, eval_rows, 4, args),
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
        replace_section(Path(args.results), SECTION, markdown(record), "# Speculative drafts\n\n")


def _only_full_fp32(args) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "vocab_sizes": [0], "draft_dtypes": ["fp32"]})


if __name__ == "__main__":
    main()
