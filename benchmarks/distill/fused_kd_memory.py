"""Peak memory and time (forward + backward) of the distillation loss: naive full-logit vs fused (chunked / Triton).

Every (configuration, method) runs in a fresh subprocess so that peaks do not leak between measurements:

* CPU: the peak is ``VmHWM - VmRSS`` read from ``/proc/self/status`` around the measured forward+backward, after the
  high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs`` (tracemalloc does not see torch's
  allocations). ``MALLOC_MMAP_THRESHOLD_`` is pinned so that freed blocks go back to the OS and cannot hide a peak.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, relative to the allocation
  before the call.

The peak is what the loss needs on top of its inputs (student/teacher hidden states and head weights), and includes
the gradients it returns (``grad_hidden [N, H]``, ``grad_W [V, H]``) for both methods. Time is one measured
forward+backward after a small warm-up on a slice of the rows.

Naive = ``logits = h_s @ W_s.T``, ``teacher = h_t @ W_t.T``, then ``kd_plugins.losses`` (the reference) and
``loss.backward()``. Chunked = ``fused_linear_kd_loss(backend="torch")``; Triton = ``backend="triton"`` (CUDA only).

Naive configurations whose estimated peak exceeds ``--naive-max-gb`` are not run; they are *extrapolated* linearly in
N from measured points at smaller N with the same (H, V) (``--extrapolate-from``), and marked ``est.`` in the table.

Examples::

    python benchmarks/distill/fused_kd_memory.py --n 4096 --hidden 576 --vocab 49152
    python benchmarks/distill/fused_kd_memory.py --n 4096 16384 --hidden 576 2048 --vocab 49152 131072 \\
        --out benchmarks/distill/RESULTS_fused_kd.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch

    from kd_plugins import losses as L
    from kd_plugins.kernels import fused_linear_kd_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.n, args.h, args.v
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = torch.randn(n, h, generator=g).to(dev, dtype).requires_grad_()
    ws = (torch.randn(v, h, generator=g) * h**-0.5).to(dev, dtype).requires_grad_()
    xt = torch.randn(n, h, generator=g).to(dev, dtype)
    wt = (torch.randn(v, h, generator=g) * h**-0.5).to(dev, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    labels[::16] = -100
    ref = {
        "kl": L.kl_divergence,
        "reverse_kl": L.reverse_kl_divergence,
        "jsd": L.generalized_jsd,
        "tvd": L.total_variation_distance,
    }[args.divergence]

    def run(rows: slice):
        x, w = xs, ws
        if args.method == "naive":
            z = x[rows] @ w.T
            with torch.no_grad():
                zt = xt[rows] @ wt.T
            loss = ref(z, zt, labels=labels[rows], temperature=args.temperature)
            del z, zt
        else:
            loss = fused_linear_kd_loss(
                x[rows],
                w,
                xt[rows],
                wt,
                labels=labels[rows],
                divergence=args.divergence,
                temperature=args.temperature,
                chunk_size=args.chunk_size,
                backend="torch" if args.method == "chunked" else "triton",
            )
        loss.backward()
        return float(loss.detach())

    cuda = dev.type == "cuda"
    run(slice(0, min(n, 256)))  # warm-up (threads, kernels / Triton compilation)
    xs.grad = ws.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_ok = _reset_hwm()
        base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    loss = run(slice(0, n))
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
        if not hwm_ok:
            peak = float("nan")
    return {"peak_bytes": peak, "time_s": dt, "loss": loss, "threads": torch.get_num_threads()}


def naive_estimate_bytes(n, h, v, itemsize) -> float:
    """Rough upper estimate used only to decide whether to run naive (about 12 live [N, V] float32 matrices)."""
    return 12.0 * n * v * 4 + 2.0 * n * v * itemsize + (n + v) * h * 4


def run_one(cfg: dict, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--method",
        cfg["method"],
        "--n-one",
        str(cfg["n"]),
        "--h-one",
        str(cfg["h"]),
        "--v-one",
        str(cfg["v"]),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--chunk-size",
        str(args.chunk_size),
        "--divergence",
        args.divergence,
        "--temperature",
        str(args.temperature),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return dict(cfg, error=f"exit {res.returncode}: {' | '.join(tail)}", wall_s=time.time() - t0)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return dict(cfg, **out, wall_s=time.time() - t0)


def fmt_gb(b) -> str:
    return f"{b / 2**30:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--hidden", type=int, nargs="+", default=[576])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152])
    p.add_argument(
        "--methods", nargs="+", default=None, help="naive chunked triton (default: naive chunked, plus triton on CUDA)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--divergence", default="kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    p.add_argument(
        "--naive-max-gb",
        type=float,
        default=14.0,
        help="do not run naive when its estimated peak exceeds this; extrapolate instead",
    )
    p.add_argument(
        "--extrapolate-from",
        type=int,
        nargs="+",
        default=[512, 1024],
        help="N values measured to extrapolate naive (linear in N)",
    )
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None, help="write the markdown table here")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--n-one", dest="n1", type=int, help=argparse.SUPPRESS)
    p.add_argument("--h-one", dest="h1", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v-one", dest="v1", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.n, args.h, args.v = args.n1, args.h1, args.v1
        print(json.dumps(worker(args)))
        return

    import torch

    methods = args.methods or (["naive", "chunked"] + (["triton"] if args.device == "cuda" else []))
    if "triton" in methods and args.device != "cuda":
        print("note: the Triton method needs --device cuda; skipping it")
        methods = [m for m in methods if m != "triton"]
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    rows_out = []
    t_start = time.time()
    for n, h, v in itertools.product(args.n, args.hidden, args.vocab):
        for m in methods:
            cfg = dict(method=m, n=n, h=h, v=v)
            too_big = naive_estimate_bytes(n, h, v, itemsize) > args.naive_max_gb * 2**30
            if m == "naive" and args.device == "cpu" and too_big:
                pts = [run_one(dict(method="naive", n=ne, h=h, v=v), args) for ne in args.extrapolate_from]
                pts = [q for q in pts if "error" not in q]
                for q in pts:  # the measured points go into the table too
                    rows_out.append(q)
                    print(json.dumps(q), flush=True)
                if len(pts) >= 2:
                    (n0, p0, t0), (n1, p1, t1) = [(q["n"], q["peak_bytes"], q["time_s"]) for q in pts[:2]]
                    slope_p, slope_t = (p1 - p0) / (n1 - n0), (t1 - t0) / (n1 - n0)
                    r = dict(
                        cfg,
                        peak_bytes=p1 + slope_p * (n - n1),
                        time_s=t1 + slope_t * (n - n1),
                        estimated=f"linear from N={n0},{n1}",
                    )
                else:
                    r = dict(cfg, error="could not measure extrapolation points")
            else:
                r = run_one(cfg, args)
            rows_out.append(r)
            print(json.dumps(r), flush=True)
    total = time.time() - t_start

    lines = [
        f"Device: {args.device}, dtype {args.dtype}, divergence {args.divergence}, T={args.temperature}, "
        f"chunk_size {args.chunk_size}, torch threads {args.threads or torch.get_num_threads()}; "
        f"teacher hidden = student hidden size; 1/16 of rows ignored (-100). Total wall time {total:.0f} s.",
        "",
        "| N | H | V | method | peak MB (fwd+bwd) | time s (fwd+bwd) | peak vs naive | time vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["n"], r["h"], r["v"], r["method"]): r for r in rows_out}
    for r in rows_out:
        naive = by_key.get((r["n"], r["h"], r["v"], "naive"))
        if "error" in r:
            lines.append(f"| {r['n']} | {r['h']} | {r['v']} | {r['method']} | error: {r['error']} | | | |")
            continue
        est = " (est.)" if r.get("estimated") else ""
        mem_ratio = time_ratio = ""
        if naive and "error" not in naive and r["method"] != "naive":
            mem_ratio = f"{naive['peak_bytes'] / max(r['peak_bytes'], 1):.1f}x lower" + (
                " (vs est.)" if naive.get("estimated") else ""
            )
            time_ratio = f"{r['time_s'] / naive['time_s']:.2f}x" + (" (vs est.)" if naive.get("estimated") else "")
        lines.append(
            f"| {r['n']} | {r['h']} | {r['v']} | {r['method']}{est} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['time_s']:.2f} | {mem_ratio} | {time_ratio} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + f"Command: `{command_line(__file__, argv or sys.argv[1:], quote=False)}`\n\n")
            f.write(table + "\n")


if __name__ == "__main__":
    main()
