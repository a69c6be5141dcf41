"""all-MiniLM-L6-v2 W8A8: BBC title -> body retrieval (MRR, R@1) fp32 vs per-token vs SmoothQuant vs CrossQuant.

Protocol: 400 BBC articles (seed 0) as queries (titles) and documents (bodies), mean pooling, max 256 tokens;
calibration (``--calib-source``) on 64 passages of Jane Austen's *Emma* (default: text of another domain than the
evaluation) or on 64 other BBC articles (title + body); all 37 linears quantized (6 blocks x q/k/v/attn-out/
intermediate/output + pooler), embeddings and LayerNorms fp32. The default method (``quantize(model,
calibration_data=...)`` without ``method``) measures its column statistics on every call (a batch of 32 padded
texts), so it does not use the calibration data. Also reports the quantization-kernel proportion on 2 calibration
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
from kd_plugins.quant import DEFAULT_ALPHA, DEFAULT_METHOD, quantization_kernel_report, quantize  # noqa: E402


def austen_passages(n: int, words: int = 150) -> list[str]:
    """``n`` consecutive passages of ``words`` words from the start of *Emma* (after the first 2,000 words)."""
    ws = qc.austen_books()["emma"].split()[2000:]
    return [" ".join(ws[i * words : (i + 1) * words]) for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF encoder directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-source", choices=("austen", "bbc"), default="austen")
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
    texts = austen_passages(args.n_calib) if args.calib_source == "austen" else [f"{t}. {b}" for _, t, b in cal]
    calib = qc.calib_batches_text(tok, texts, batch_size=16, max_length=256)

    configs = [
        ("fp32", None, None),
        (f"default: {DEFAULT_METHOD} (alpha={DEFAULT_ALPHA[DEFAULT_METHOD]:g})", "default", None),
        ("per-token W8A8", "per_token", None),
        (f"SmoothQuant W8A8 (alpha={DEFAULT_ALPHA['smoothquant']:g})", "smoothquant", None),
        (f"CrossQuant W8A8 (alpha={DEFAULT_ALPHA['crossquant']:g})", "crossquant", None),
    ]
    rows = []
    d_fp = None
    for label, method, alpha in configs:
        if method is None:
            m = model
        elif method == "default":
            m = quantize(copy.deepcopy(model), calibration_data=calib)
        else:
            m = quantize(copy.deepcopy(model), method, alpha, calibration_data=calib)
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
        f"\nBBC title -> body retrieval, {args.n_eval} articles (seed 0), calibration {args.n_calib} "
        f"{'passages of Emma' if args.calib_source == 'austen' else 'other articles'}, threads={args.threads}\n"
    )
    print("| model | MRR | R@1 | doc-embedding cosine vs fp32 | kernel | per-token kernel |")
    print("|---|---|---|---|---|---|")
    for label, mrr, r1, cos, kern in rows:
        k = f"{100 * kern['kernel']:.2f}% | {100 * kern['per_token_kernel']:.2f}%" if kern else "- | -"
        print(f"| {label} | {mrr:.4f} | {r1:.4f} | {cos:.4f} | {k} |")
    print(f"\n# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
