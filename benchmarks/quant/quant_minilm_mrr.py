"""all-MiniLM-L6-v2 W8A8: BBC title -> body retrieval (MRR, R@1) fp32 vs per-token vs SmoothQuant vs CrossQuant.

Protocol: 400 BBC articles (seed 0) as queries (titles) and documents (bodies), mean pooling, max 256 tokens;
calibration on 64 other articles (title + body), all 37 linears quantized (6 blocks x q/k/v/attn-out/intermediate/
output + pooler), embeddings and LayerNorms fp32. Also reports the quantization-kernel proportion on 2 calibration
batches and the cosine between fp32 and quantized document embeddings.

Run: ``OMP_NUM_THREADS=1 python benchmarks/quant/quant_minilm_mrr.py`` (about 4 min on one core). ``--model DIR``
evaluates another HF encoder directory with the same tokenizer family (e.g. a distilled student).
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
import quant_common as qc  # noqa: E402
from kd_plugins.quant import DEFAULT_ALPHA, quantization_kernel_report, quantize  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF encoder directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    set_threads_and_seed(args.threads)
    t0 = time.time()
    if args.model:
        from transformers import AutoModel, AutoTokenizer

        model, tok = AutoModel.from_pretrained(args.model).eval(), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = qc.load_minilm()
    ev, cal = qc.bbc_split(args.n_eval, args.n_calib, seed=0)
    titles = [t for _, t, _ in ev]
    bodies = [b for _, _, b in ev]
    calib = qc.calib_batches_text(tok, [f"{t}. {b}" for _, t, b in cal], batch_size=16, max_length=256)

    configs = [
        ("fp32", None, None),
        ("per-token W8A8", "per_token", None),
        (f"SmoothQuant W8A8 (alpha={DEFAULT_ALPHA['smoothquant']:g})", "smoothquant", None),
        (f"CrossQuant W8A8 (alpha={DEFAULT_ALPHA['crossquant']:g})", "crossquant", None),
    ]
    rows = []
    d_fp = None
    for label, method, alpha in configs:
        m = model if method is None else quantize(copy.deepcopy(model), method, alpha, calibration_data=calib)
        q = qc.embed(m, tok, titles)
        d = qc.embed(m, tok, bodies)
        mrr, r1 = qc.mrr_at(q, d)
        if d_fp is None:
            d_fp = d
        cos = float((d * d_fp).sum(-1).mean())
        kern = quantization_kernel_report(m, calib[:2]).summary() if method else None
        rows.append((label, mrr, r1, cos, kern))
        print(f"  {label}: MRR={mrr:.4f} R@1={r1:.4f}  [{time.time() - t0:.0f}s]", flush=True)
    print(
        f"\nBBC title -> body retrieval, {args.n_eval} articles (seed 0), calibration {args.n_calib} other articles, "
        f"threads={args.threads}\n"
    )
    print("| model | MRR | R@1 | doc-embedding cosine vs fp32 | kernel | per-token kernel |")
    print("|---|---|---|---|---|---|")
    for label, mrr, r1, cos, kern in rows:
        k = f"{100 * kern['kernel']:.2f}% | {100 * kern['per_token_kernel']:.2f}%" if kern else "- | -"
        print(f"| {label} | {mrr:.4f} | {r1:.4f} | {cos:.4f} | {k} |")
    print(f"\n# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
