"""CPU speed, memory and checkpoint size of W8A8 (CrossQuant) vs fp32.

1. One linear layer at LLM shapes, M = 512..4096 tokens: fp32 ``nn.Linear`` vs ``QuantizedLinear`` (int8 path:
   activation quantization + ``torch._int_mm`` + row x column rescale, everything included in the timing).
2. ``--dynamic``: one ``crossquant_dynamic_int8`` layer at SmolLM2-135M shapes for M = 1..2048 rows per call: the
   dynamic int8 path (per-call statistics, weight requantization, codes, GEMM) vs its two decode fallbacks
   (weight-only, per-token) vs fp32, the cost of each step (eager and ``torch.compile``d), and the row count below
   which a fallback is faster (``DEFAULT_FALLBACK_ROWS``).
3. SmolLM2-135M prefill (batch x 512 tokens): fp32 vs the default method vs static CrossQuant W8A8 (lm_head,
   embeddings, norms stay fp32).
4. Peak resident memory of a fresh process that loads the model and runs one prefill, and checkpoint size on disk.

Timings: fastest of ``--repeats`` runs after one warm-up, ``torch.set_num_threads(--threads)``.
Run: ``python benchmarks/quant/quant_speed.py --threads 2`` (on a shared/overloaded machine use ``--threads 1``:
oversubscribed OpenMP threads make both paths erratic).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import quant_common as qc  # noqa: E402
from kd_plugins.quant import QuantizedLinear, dynamic, quantize, save_quantized  # noqa: E402


def timeit(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs after one warm-up (the minimum is the least contention-sensitive estimate on a
    shared machine)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


PEAK = r"""
import json, os, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
import quant_common as qc
kind, path = {kind!r}, {path!r}
if kind == "fp32":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
else:
    from kd_plugins.quant import load_quantized
    model = load_quantized(path)
def hwm_kb():  # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's, it survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
rss_loaded = hwm_kb()
ids = torch.randint(0, 1000, (1, 512))
with torch.no_grad():
    model(input_ids=ids)
print("RESULT" + json.dumps({{"peak_kb": hwm_kb(), "load_kb": rss_loaded}}))
"""


def peak_rss(kind: str, path: str, threads: int) -> dict:
    code = PEAK.format(bench=os.path.dirname(os.path.abspath(__file__)), threads=threads, kind=kind, path=path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT"))[6:])


def model_bytes(m: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def dynamic_layer(args) -> None:
    """Section 2: the dynamic layer vs its fallbacks over the rows of a call, and its per-call steps."""
    print("\n## crossquant_dynamic_int8 layer: rows per call vs decode fallbacks (ms per call)\n")
    print("| K x N | M | fp32 | dynamic int8 | weight-only fallback | per-token fallback |")
    print("|---|---|---|---|---|---|")
    for shp in args.dynamic_shapes.split(","):
        k, n = (int(v) for v in shp.split("x"))
        lin = nn.Linear(k, n)
        q = QuantizedLinear.from_float(lin, method="crossquant_dynamic_int8", alpha=0.35, fallback_rows=0)
        wo = copy.deepcopy(q).set_fallback("weight_only", 1 << 30)
        pt = copy.deepcopy(q).set_fallback("per_token", 1 << 30)
        for m in (int(v) for v in args.dynamic_ms.split(",")):
            x = torch.randn(m, k)
            x[:, 7] *= 30
            with torch.no_grad():
                t = [timeit(lambda f=f: f(x), args.repeats) * 1e3 for f in (lin, q, wo, pt)]
            print(f"| {k} x {n} | {m} | " + " | ".join(f"{v:.3f}" for v in t) + " |", flush=True)
    print("\n## crossquant_dynamic_int8: per-call steps (ms), eager vs torch.compile\n")
    print("| K x N | M | column abs-max + outliers | row abs-max | weight requant | codes | int8 GEMM + epilogue |")
    print("|---|---|---|---|---|---|---|")
    for compiled in (False, True):
        for shp in args.dynamic_shapes.split(","):
            k, n = (int(v) for v in shp.split("x"))
            q = QuantizedLinear.from_float(nn.Linear(k, n), method="crossquant_dynamic_int8", alpha=0.35)
            for m in (512, 2048):
                x = torch.randn(m, k)
                x[:, 7] *= 30
                plan = dynamic.plan_call(x, 0.35, 8.0, q.ROW_BLOCK, compiled)
                r = dynamic.row_factors(dynamic.row_absmax(x, plan.outliers, q.ROW_BLOCK, compiled), 0.35)
                wq, ws = dynamic.step("requantize", compiled)(q.weight_int8, q.weight_scale, plan.g)
                codes, rs = dynamic.step("quantize", compiled)(x, r, plan.inv)
                steps = [
                    lambda: dynamic.plan_call(x, 0.35, 8.0, q.ROW_BLOCK, compiled),
                    lambda: dynamic.row_absmax(x, plan.outliers, q.ROW_BLOCK, compiled),
                    lambda: dynamic.step("requantize", compiled)(q.weight_int8, q.weight_scale, plan.g),
                    lambda: dynamic.step("quantize", compiled)(x, r, plan.inv),
                    lambda: q._int8_product(codes, rs, wq, ws),
                ]
                ms = [timeit(f, args.repeats) * 1e3 for f in steps]
                tag = " (compiled)" if compiled else ""
                print(f"| {k} x {n}{tag} | {m} | " + " | ".join(f"{v:.3f}" for v in ms) + " |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ms", type=str, default="512,1024,2048,4096")
    ap.add_argument("--shapes", type=str, default="4096x4096,576x1536,1536x576", help="KxN list")
    ap.add_argument("--prefill-batches", type=str, default="1,4")
    ap.add_argument("--dynamic", action="store_true", help="run section 2 (the crossquant_dynamic_int8 layer)")
    ap.add_argument("--dynamic-only", action="store_true", help="run section 2 only")
    ap.add_argument("--dynamic-shapes", type=str, default="576x1536,1536x576,576x192")
    ap.add_argument("--dynamic-ms", type=str, default="1,4,16,32,64,128,256,512,2048")
    args = ap.parse_args(argv)
    set_threads_and_seed(args.threads, seed=0)
    print(f"# CPU: {os.cpu_count()} logical cores visible, torch threads={args.threads}, torch {torch.__version__}")
    if args.dynamic or args.dynamic_only:
        dynamic_layer(args)
        if args.dynamic_only:
            return

    print("\n## One linear layer (fp32 nn.Linear vs QuantizedLinear crossquant int8, quantization included)\n")
    print("| K x N | M | fp32 ms | int8 ms | speed-up |")
    print("|---|---|---|---|---|")
    for shp in args.shapes.split(","):
        k, n = (int(v) for v in shp.split("x"))
        lin = nn.Linear(k, n)
        calib = torch.randn(256, k)
        q = QuantizedLinear.from_float(lin, method="crossquant", alpha=0.35, col_max=calib.abs().amax(0))
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k)
            with torch.no_grad():
                tf = timeit(lambda: lin(x), args.repeats)
                ti = timeit(lambda: q(x), args.repeats)
            print(f"| {k} x {n} | {m} | {tf * 1e3:.1f} | {ti * 1e3:.1f} | {tf / ti:.2f}x |", flush=True)

    print("\n## SmolLM2-135M prefill (512-token sequences)\n")
    model, tok = qc.load_smollm2()
    books = qc.austen_books()
    calib = qc.lm_windows(tok, books["emma"], 512, 4)
    calibration = [{"input_ids": calib[i : i + 2]} for i in (0, 2)]
    qmodel = quantize(copy.deepcopy(model), calibration_data=calibration)  # the default method
    static = quantize(copy.deepcopy(model), "crossquant", calibration_data=calibration)
    print("| batch x seq | fp32 s | default W8A8 s | speed-up | static CrossQuant W8A8 s | speed-up |")
    print("|---|---|---|---|---|---|")
    for b in (int(v) for v in args.prefill_batches.split(",")):
        ids = qc.lm_windows(tok, books["prideprejudice"], 512, b)
        with torch.no_grad():
            tf = timeit(lambda: model(input_ids=ids), args.repeats)
            ti = timeit(lambda: qmodel(input_ids=ids), args.repeats)
            ts = timeit(lambda: static(input_ids=ids), args.repeats)
        print(f"| {b} x 512 | {tf:.2f} | {ti:.2f} | {tf / ti:.2f}x | {ts:.2f} | {tf / ts:.2f}x |", flush=True)

    print("\n## Memory and checkpoint size (SmolLM2-135M)\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = save_quantized(qmodel, Path(tmp) / "q", tokenizer=tok)
        fp_dir = qc.smollm2_dir()
        fp_size = sum(p.stat().st_size for p in Path(fp_dir).glob("*.safetensors"))
        q_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        cfg = json.loads((out / "quant_config.json").read_text())
        names = set(cfg["layers"])
        q_layers = sum(
            (lambda t: 1 * t[0] * t[1] if "weight_int8" in k else 4 * t[0])(v["shape"] + [1])
            for k, v in cfg["tensors"].items()
            if k.rsplit(".", 1)[0] in names
        )
        fp_layers = sum(
            4 * (l["in_features"] * l["out_features"] + (l["out_features"] if l["bias"] else 0))
            for l in cfg["layers"].values()
        )
        pr_fp = peak_rss("fp32", str(fp_dir), args.threads)
        pr_q = peak_rss("quant", str(out), args.threads)
    mb = 2**20
    print("| | fp32 | default W8A8 | ratio |")
    print("|---|---|---|---|")
    print(
        f"| quantized layers' tensors | {fp_layers / mb:.1f} MB | {q_layers / mb:.1f} MB | {q_layers / fp_layers:.3f} |"
    )
    print(
        f"| checkpoint (safetensors, incl. fp32 embedding) | {fp_size / mb:.1f} MB | {q_size / mb:.1f} MB | "
        f"{q_size / fp_size:.3f} |"
    )
    print(
        f"| model in memory (params + buffers) | {model_bytes(model) / mb:.1f} MB | "
        f"{model_bytes(qmodel) / mb:.1f} MB | "
        f"{model_bytes(qmodel) / model_bytes(model):.3f} |"
    )
    print(
        f"| peak RSS, fresh process: load + 1x512 prefill | {pr_fp['peak_kb'] / 1024:.0f} MB | "
        f"{pr_q['peak_kb'] / 1024:.0f} MB | {pr_q['peak_kb'] / pr_fp['peak_kb']:.3f} |"
    )


if __name__ == "__main__":
    main()
