"""SmolLM2-135M W8A8 on text of another domain: kd_plugins methods vs torchao and optimum-quanto.

Protocol (CPU, offline):

* directions: calibrate on Jane Austen (*Emma*) and evaluate on BBC News (test articles), and the reverse (calibrate
  on BBC training articles, evaluate on *Pride and Prejudice*); ``--calib`` calibration windows and ``--eval``
  evaluation windows of ``--seq-len`` tokens (BOS first, evenly spaced; token-level perplexity), one window per
  forward call (``--eval-batch``) so that dynamic methods see one sequence per call, as in a single-prompt prefill;
* arms: fp32; kd_plugins ``quantize`` methods (the default method is the call ``quantize(model,
  calibration_data=...)`` without ``method``); torchao ``Int8DynamicActivationInt8WeightConfig`` (W8A8 dynamic
  per-token) and ``Int8WeightOnlyConfig`` (W8A16); optimum-quanto W8A8 (int8 weights, static int8 activations
  calibrated on the same windows). The peers are optional: arms whose package is missing are reported as skipped.
  Every arm keeps ``lm_head`` (tied to the embedding), embeddings and norms in fp32;
* per arm: perplexity in both directions, time to quantize (calibration included), on-disk size (kd_plugins:
  ``save_quantized`` directory; others: ``torch.save`` of the state dict; fp32: safetensors);
* ``--speed``: prefill latency at 1 x 512 and 4 x 512 tokens and greedy decode tokens/s (batch 1, 32-token prompt,
  ``--decode-tokens`` new tokens with the KV cache), arms alternated within one process, fastest of ``--repeats``;
  ratios vs fp32 from the same run;
* ``--sweep A,B,..``: perplexity of ``crossquant_dynamic_int8`` (and its fake-quant paper reference) at those alphas
  on validation windows (*Mansfield Park*, BBC validation articles), which the test windows never overlap.

Run: ``OMP_NUM_THREADS=1 python benchmarks/quant/quant_cross_domain.py --threads 1 --speed``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.data.bbc import split_articles  # noqa: E402
from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2, perplexity, smollm2_dir  # noqa: E402
from kd_plugins.kernels import cpu_int8
from kd_plugins.quant import DEFAULT_ALPHA, DEFAULT_METHOD, quantize, save_quantized  # noqa: E402

# (label, builder kind, method / config, alpha, needs calibration)
ARMS = {
    "fp32": ("fp32", None, None, False),
    "default": ("kd", None, None, False),  # quantize(model, calibration_data=...) without method (data unused)
    "default_auto": ("kd", "crossquant_dynamic_int8", "auto", True),  # alpha per layer on the calibration data
    "per_token": ("kd", "per_token", None, False),
    "smoothquant_0.5": ("kd", "smoothquant", 0.5, True),
    "smoothquant_0.65": ("kd", "smoothquant", 0.65, True),
    "smoothquant_auto": ("kd", "smoothquant", "auto", True),
    "crossquant_0.35": ("kd", "crossquant", 0.35, True),
    "crossquant_auto": ("kd", "crossquant", "auto", True),
    "crossquant_dynamic_fake": ("kd", "crossquant_dynamic", None, False),
    "torchao_w8a8": ("torchao", "Int8DynamicActivationInt8WeightConfig", None, False),
    "torchao_w8a16": ("torchao", "Int8WeightOnlyConfig", None, False),
    "quanto_w8a8": ("quanto", None, None, True),
}
SPEED_ARMS = ",".join(
    ("fp32", "default", "default_eager", "default_compiled", "default_weight_only", "per_token", "smoothquant_0.65")
    + ("torchao_w8a8", "torchao_w8a16", "quanto_w8a8")
)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def not_lm_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and "lm_head" not in fqn


class EagerSteps(nn.Module):
    """Runs the wrapped quantized model with the native CPU kernels switched off (its eager PyTorch steps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        with cpu_int8.disabled():
            return self.model(*args, **kwargs)


def build(name: str, model: nn.Module, calib: list[dict]) -> nn.Module | None:
    """A quantized copy of ``model`` for arm ``name`` (``None``: its package is not installed)."""
    if name == "default_eager":  # the same model and outputs, per-call steps in eager PyTorch
        return EagerSteps(quantize(copy.deepcopy(model), calibration_data=calib))
    if name == "default_compiled":
        return quantize(copy.deepcopy(model), calibration_data=calib, compile_quantizer=True)
    if name == "default_weight_only":  # decode fallback without activation rounding
        return quantize(copy.deepcopy(model), calibration_data=calib, fallback="weight_only")
    kind, method, alpha, _ = ARMS[name]
    if kind == "fp32":
        return model
    if kind == "kd":
        if method is None:
            return quantize(copy.deepcopy(model), calibration_data=calib)  # the call users make
        kw = {"calibration_data": calib} if ARMS[name][3] else {}
        return quantize(copy.deepcopy(model), method=method, alpha=alpha, **kw)
    if kind == "torchao":
        if not have("torchao"):
            return None
        import torchao.quantization as tq

        m = copy.deepcopy(model)
        tq.quantize_(m, getattr(tq, method)(), filter_fn=not_lm_head)
        return m
    if not have("optimum.quanto"):
        return None
    from optimum.quanto import Calibration, freeze, qint8
    from optimum.quanto import quantize as quanto_quantize

    m = copy.deepcopy(model)
    quanto_quantize(m, weights=qint8, activations=qint8, exclude=["lm_head"])
    with torch.no_grad(), Calibration():
        for b in calib:
            m(**b)
    freeze(m)
    return m


def disk_bytes(name: str, model: nn.Module, fp_dir: Path) -> int:
    if name == "fp32":
        return sum(p.stat().st_size for p in fp_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        if ARMS.get(name, ("kd",))[0] == "kd":
            out = save_quantized(model, Path(tmp) / "q")
            return sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        path = Path(tmp) / "state.pt"
        try:
            torch.save(model.state_dict(), path)
        except Exception as e:  # noqa: BLE001 - a peer's tensor subclass that does not pickle: report, go on
            print(f"  {name}: torch.save failed ({type(e).__name__}: {e})", flush=True)
            return -1
        return path.stat().st_size


# ------------------------------------------------------------------------------------------------------------ data
def bbc_text(articles) -> str:
    return "\n\n".join(f"{a.title}\n\n{a.body}" for a in articles)


def load_data(tok, args):
    books = jane_austen_texts()
    split = split_articles(seed=0)
    w = lambda text, n: lm_windows(tok, text, args.seq_len, n)  # noqa: E731
    data = {
        "austen->bbc": (w(books["emma"], args.calib), w(bbc_text(split.test), args.eval)),
        "bbc->austen": (w(bbc_text(split.train), args.calib), w(books["prideprejudice"], args.eval)),
    }
    val = {"austen": w(books["mansfieldpark"], args.eval), "bbc": w(bbc_text(split.validation), args.eval)}
    return data, val


def batches(windows: torch.Tensor, bs: int) -> list[dict]:
    return [{"input_ids": windows[i : i + bs]} for i in range(0, windows.shape[0], bs)]


# ------------------------------------------------------------------------------------------------------------ parts
def accuracy(model, arms: list[str], data: dict, args, fp_dir: Path) -> list[dict]:
    rows = []
    for name in arms:
        calibrated = ARMS[name][3]
        row, shared = {"arm": name, "ppl": {}, "quantize_s": {}}, None
        for direction, (calib, test) in data.items():
            if name == "fp32":
                m = model
            elif shared is not None:  # calibration-free: one model for both directions
                m = shared
            else:
                t0 = time.perf_counter()
                m = build(name, model, batches(calib, 2))
                row["quantize_s"][direction] = time.perf_counter() - t0
                shared = None if calibrated else m
            if m is None:
                row["skipped"] = "package not installed"
                break
            row["ppl"][direction] = perplexity(m, test, batch_size=args.eval_batch)
            if name == "default" and direction == "austen->bbc":
                row["ppl_batch4"] = perplexity(m, test, batch_size=4)
            row.setdefault("disk_bytes", disk_bytes(name, m, fp_dir))
            print(f"  {name:26s} {direction}: ppl {row['ppl'][direction]:.3f}", flush=True)
        rows.append(row)
    return rows


def sweep(model, alphas: list[float], val: dict, args) -> list[dict]:
    rows = [{"method": "fp32", "alpha": None, **{k: perplexity(model, v, args.eval_batch) for k, v in val.items()}}]
    arms = [("crossquant_dynamic_int8", float(t)) for t in args.sweep_outliers.split(",")]
    arms.append(("crossquant_dynamic", None))
    for method, tau in arms:
        for a in alphas:
            kw = {} if tau is None else {"outlier_threshold": tau}
            m = quantize(copy.deepcopy(model), method=method, alpha=a, **kw)
            ppl = {k: perplexity(m, v, args.eval_batch) for k, v in val.items()}
            rows.append({"method": method, "outlier_threshold": tau, "alpha": a, **ppl})
            print(f"  sweep {method} outlier_threshold={tau} alpha={a}: {ppl}", flush=True)
    return rows


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        best = min(best, fn())
    return best


def prefill_s(model, ids: torch.Tensor, last_only: bool = True) -> float:
    """Seconds for one prompt forward. ``last_only``: logits of the last position only, as ``generate`` computes
    them in its prefill (``logits_to_keep=1``); otherwise every position's logits (scoring a text)."""
    kw = {"logits_to_keep": 1} if last_only else {}
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False, **kw)
        return time.perf_counter() - t


def decode_tokens_per_s(model, prompt: torch.Tensor, n_new: int) -> float:
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        past, tok = out.cache, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(n_new):
            out = model(input_ids=tok, cache=past, use_cache=True)
            past, tok = out.cache, out.logits[:, -1:].argmax(-1)
        return n_new / (time.perf_counter() - t)


def pin_allocator() -> bool:
    """Fix glibc malloc's trim and mmap thresholds for the whole run (every arm alike).

    With its default dynamic thresholds, which arm's multi-megabyte temporaries come back as fresh pages from the OS
    depends on what the arms before it allocated and freed: with nine models in one process we measured 0 to 400k
    page faults (up to 0.6 s of system time) per 4 x 512 forward on whichever arm the allocator's state happened to
    penalise (dynamic CrossQuant, per-token and the peers in turn), a ranking artefact of sharing one process. Fixed
    thresholds (trim above 1 GiB, mmap above 32 MiB) remove it for all arms. Returns whether ``mallopt`` took them.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def speed(model, arms: list[str], tok, calib: torch.Tensor, args) -> dict:
    text = jane_austen_texts()["persuasion"]
    ids = {b: lm_windows(tok, text, 512, b) for b in (1, 4)}
    prompt = ids[1][:, :32]
    models = {}
    for name in arms:
        m = build(name, model, batches(calib, 2))
        if m is not None:
            models[name] = m
    for m in models.values():  # warm-up (and torch.compile) outside the timings
        prefill_s(m, ids[1])
        decode_tokens_per_s(m, prompt, 2)
    res = {n: {k: [] for k in ("prefill_1x512_s", "prefill_4x512_s", "score_4x512_s", "decode_tok_s")} for n in models}
    for _ in range(args.repeats):  # arms alternate, so load changes on a shared machine hit every arm alike
        for name, m in models.items():
            res[name]["prefill_1x512_s"].append(prefill_s(m, ids[1]))
            res[name]["prefill_4x512_s"].append(prefill_s(m, ids[4]))
            res[name]["score_4x512_s"].append(prefill_s(m, ids[4], last_only=False))
            res[name]["decode_tok_s"].append(decode_tokens_per_s(m, prompt, args.decode_tokens))
        print(f"  speed round done: { {n: round(min(r['prefill_4x512_s']), 3) for n, r in res.items()} }", flush=True)
    out = {}
    for name, r in res.items():
        out[name] = {
            "prefill_1x512_s": min(r["prefill_1x512_s"]),
            "prefill_4x512_s": min(r["prefill_4x512_s"]),
            "score_4x512_s": min(r["score_4x512_s"]),
            "decode_tok_s": max(r["decode_tok_s"]),
        }
    return out


# ------------------------------------------------------------------------------------------------------------ report
def label(name: str) -> str:
    if name == "default":
        return f"**kd_plugins default ({DEFAULT_METHOD}, alpha {DEFAULT_ALPHA[DEFAULT_METHOD]:g})**"
    if name in ("default_eager", "default_compiled", "default_weight_only"):
        return {
            "default_eager": "default, eager PyTorch steps (native kernels off)",
            "default_compiled": "default + compile_quantizer",
            "default_weight_only": "default, fallback weight_only",
        }[name]
    return {"crossquant_dynamic_fake": "crossquant_dynamic (fake-quant paper reference)"}.get(name, name)


def print_accuracy(rows: list[dict]) -> None:
    fp = next(r for r in rows if r["arm"] == "fp32")["ppl"]
    print("\n| arm | ppl Austen->BBC | vs fp32 | ppl BBC->Austen | vs fp32 | quantize s | on disk MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {label(r['arm'])} | skipped: {r['skipped']} | | | | | |")
            continue
        cells = []
        for d in ("austen->bbc", "bbc->austen"):
            p = r["ppl"][d]
            cells += [f"{p:.3f}", "-" if r["arm"] == "fp32" else f"{100 * (p / fp[d] - 1):+.2f}%"]
        qs = "/".join(f"{v:.1f}" for v in r["quantize_s"].values()) or "-"
        disk = f"{r['disk_bytes'] / 2**20:.1f}" if r["disk_bytes"] >= 0 else "n/a"
        print(f"| {label(r['arm'])} | {' | '.join(cells)} | {qs} | {disk} |")
    d = next((r for r in rows if r["arm"] == "default" and "ppl_batch4" in r), None)
    if d:
        print(
            "\nDefault, 4 windows per call (column maxima shared by 4 sequences): "
            f"Austen->BBC ppl {d['ppl_batch4']:.3f}"
        )


def print_speed(res: dict, threads: int) -> None:
    fp = res["fp32"]
    print(
        f"\n| arm ({threads} thread(s)) | prefill 1x512 s | vs fp32 | prefill 4x512 s | vs fp32 | "
        "all logits 4x512 s | vs fp32 | decode tok/s | vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        a = fp["prefill_1x512_s"] / r["prefill_1x512_s"]
        b = fp["prefill_4x512_s"] / r["prefill_4x512_s"]
        c = r["decode_tok_s"] / fp["decode_tok_s"]
        d = fp["score_4x512_s"] / r["score_4x512_s"]
        print(
            f"| {label(name)} | {r['prefill_1x512_s']:.3f} | {a:.2f}x | {r['prefill_4x512_s']:.3f} | {b:.2f}x | "
            f"{r['score_4x512_s']:.3f} | {d:.2f}x | {r['decode_tok_s']:.1f} | {c:.2f}x |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=12)
    ap.add_argument("--eval-batch", type=int, default=1, help="windows per forward call in the perplexity runs")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--speed-arms", default=SPEED_ARMS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--no-pin-allocator",
        action="store_true",
        help="keep glibc malloc's dynamic thresholds in the speed runs (see pin_allocator)",
    )
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--sweep", default="", help="alphas for the validation sweep of crossquant_dynamic_int8")
    ap.add_argument(
        "--sweep-outliers", default="8", help="outlier_threshold values of the sweep (0: every column folded)"
    )
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    set_threads_and_seed(args.threads, seed=0)
    t0 = time.time()
    model, tok = load_smollm2()
    model.eval()
    data, val = load_data(tok, args)
    print(f"# {command_line()}\n# SmolLM2-135M fp32, torch {torch.__version__}, threads={args.threads}", flush=True)
    result = {"command": command_line(), "threads": args.threads}
    if args.sweep:
        result["sweep"] = sweep(model, [float(a) for a in args.sweep.split(",")], val, args)
        fp = result["sweep"][0]
        print("\n| method | outlier_threshold | alpha | val ppl Mansfield Park | vs fp32 | val ppl BBC | vs fp32 |")
        print("|---|---|---|---|---|---|---|")
        for r in result["sweep"]:
            d = [f"{100 * (r[k] / fp[k] - 1):+.2f}%" if r["alpha"] is not None else "-" for k in ("austen", "bbc")]
            tau = "-" if r.get("outlier_threshold") is None else f"{r['outlier_threshold']:g}"
            print(f"| {r['method']} | {tau} | {r['alpha']} | {r['austen']:.3f} | {d[0]} | {r['bbc']:.3f} | {d[1]} |")
    if not args.no_accuracy:
        result["accuracy"] = accuracy(model, args.arms.split(","), data, args, Path(smollm2_dir()))
        print_accuracy(result["accuracy"])
    if args.speed:
        if not args.no_pin_allocator:
            print(f"# glibc malloc thresholds pinned for every arm: {pin_allocator()}", flush=True)
        result["speed"] = speed(model, args.speed_arms.split(","), tok, data["austen->bbc"][0], args)
        print_speed(result["speed"], args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n# total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
