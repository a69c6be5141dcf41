"""Prepared GPU check for the fused linear + distillation loss (Triton and chunked PyTorch). ~1-3 min on an H200.

On a CUDA machine:

1. parity of ``backend="triton"`` (and ``"torch"``) against the reference path (``logits = h @ W.T + b`` then
   ``kd_plugins.losses``) for every divergence, dense-hidden / dense-logits / top-k teachers, float32 and bfloat16:
   loss, grad_hidden, grad_W, grad_b relative errors (``max|a-b| / max|ref|``) with pass/fail;
2. forward+backward time and peak CUDA memory of naive vs chunked vs Triton (and Liger-Kernel's
   ``LigerFusedLinearJSDLoss`` if ``liger_kernel`` imports; its objective differs from ours: timing only).

Without CUDA it runs the parity part at tiny shapes in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before triton is imported) and skips timing.

    python benchmarks/distill/gpu_check_fused_kd.py            # everything (CUDA) / interpreter parity (CPU)
    python benchmarks/distill/gpu_check_fused_kd.py --quick    # parity + the smallest timing config only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
# Imported for its side effects: offline environment, repository root on sys.path.
import _harness  # noqa: E402, F401

# isort: split
import torch  # noqa: E402

if not torch.cuda.is_available():  # must precede the first ``import triton`` (done lazily by kd_plugins)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from kd_plugins import losses as L  # noqa: E402
from kd_plugins.kernels import fused_linear_kd_loss  # noqa: E402

REF = {
    "kl": L.kl_divergence,
    "reverse_kl": L.reverse_kl_divergence,
    "jsd": L.generalized_jsd,
    "tvd": L.total_variation_distance,
}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def make(n, h, v, dtype, dev, k=16, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dev, dtype)  # noqa: E731
    d = dict(
        xs=r(n, h),
        w=r(v, h, sc=3 * h**-0.5),
        b=r(v),
        xt=r(n, h + 8),
        wt=r(v, h + 8, sc=3 * (h + 8) ** -0.5),
        bt=r(v),
        labels=torch.randint(0, v, (n,), generator=g).to(dev),
    )
    d["labels"][::5] = -100
    zt = d["xt"] @ d["wt"].T + d["bt"]
    d["zt"] = zt
    lp, idx = torch.log_softmax(zt.float() / temperature, -1).topk(k, -1)
    d["topk"] = (idx, lp)
    return d


def parity(dev, quick: bool):
    if dev.type == "cuda":
        n, h, v, k = 600, 256, 4099, 32
    else:
        n, h, v, k = 21, 20, 45, 5
    backends = ["triton", "torch"]
    rows = []
    T, beta, hw = 2.0, 0.3, 0.5
    for dtype in (torch.float32, torch.bfloat16):
        tol_l, tol_g = (2e-5, 2e-5) if dtype == torch.float32 else (2e-2, 4e-2)
        if dev.type == "cuda" and dtype == torch.float32:
            tol_l, tol_g = 1e-4, 1e-4
        for teacher in ("hidden", "logits", "topk"):
            if dtype == torch.bfloat16 and teacher == "logits":
                continue
            d = make(n, h, v, dtype, dev, k=k, temperature=T)
            for div in REF:
                # reference
                xr, wr, br = (d[x].clone().requires_grad_() for x in ("xs", "w", "b"))
                z = xr @ wr.T + br
                kw = dict(labels=d["labels"], temperature=T, **({"beta": beta} if div == "jsd" else {}))
                if teacher == "topk":
                    kd = REF[div](z, None, teacher_topk=d["topk"], **kw)
                else:
                    kd = REF[div](z, d["zt"], **kw)
                valid = d["labels"] != -100
                ce_rows = F.cross_entropy(z.float(), d["labels"].clamp(min=0), reduction="none")
                ce = (ce_rows * valid).sum() / valid.sum()
                ref = kd + hw * ce
                ref.backward()
                for be in backends:
                    xs, w, b = (d[x].clone().requires_grad_() for x in ("xs", "w", "b"))
                    tk = (
                        dict(teacher_hidden=d["xt"], teacher_head_weight=d["wt"], teacher_head_bias=d["bt"])
                        if teacher == "hidden"
                        else (dict(teacher_logits=d["zt"]) if teacher == "logits" else dict(teacher_topk=d["topk"]))
                    )
                    loss = fused_linear_kd_loss(
                        xs,
                        w,
                        student_head_bias=b,
                        labels=d["labels"],
                        divergence=div,
                        beta=beta,
                        temperature=T,
                        hard_label_weight=hw,
                        backend=be,
                        chunk_size=128,
                        **tk,
                    )
                    loss.backward()
                    errs = (rel(loss, ref), rel(xs.grad, xr.grad), rel(w.grad, wr.grad), rel(b.grad, br.grad))
                    ok = errs[0] <= tol_l and max(errs[1:]) <= tol_g
                    rows.append((str(dtype).split(".")[-1], teacher, div, be) + errs + ("ok" if ok else "FAIL",))
        if quick and dev.type != "cuda":
            break
    print(
        f"\nParity vs reference (N={n}, H={h}, V={v}, T={T}, beta={beta}, hard_label_weight={hw}, "
        f"{'CUDA' if dev.type == 'cuda' else 'CPU interpreter'})"
    )
    print(f"{'dtype':9} {'teacher':7} {'div':10} {'backend':7} {'loss':>9} {'g_hidden':>9} {'g_W':>9} {'g_b':>9}")
    for r in rows:
        print(f"{r[0]:9} {r[1]:7} {r[2]:10} {r[3]:7} {r[4]:9.1e} {r[5]:9.1e} {r[6]:9.1e} {r[7]:9.1e}  {r[8]}")
    n_fail = sum(r[-1] == "FAIL" for r in rows)
    print(f"parity: {len(rows) - n_fail}/{len(rows)} ok")
    return n_fail


def timing(dev, quick: bool, budget_s: float):
    liger = None
    try:  # chunked-loss API: forward(student_input, student_weight, teacher_input, teacher_weight, true_labels)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # type: ignore

        try:
            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)
        except TypeError:
            liger = LigerFusedLinearJSDLoss()
    except Exception:  # noqa: BLE001
        try:  # Triton op API: forward(student_input, student_weight, teacher_input, teacher_weight, shift_labels)
            from liger_kernel.transformers import LigerFusedLinearJSD  # type: ignore

            liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)
        except Exception as e:  # noqa: BLE001
            print(f"\nliger_kernel not available ({type(e).__name__}: {str(e)[:80]}); skipping it")
    configs = [(4096, 576, 49152), (4096, 2048, 131072), (16384, 2048, 131072)]
    if quick:
        configs = configs[:1]
    dtype = torch.bfloat16
    print(f"\nTiming: forward+backward, {dtype}, divergence jsd beta=0.5 T=1, teacher hidden = student hidden size")
    print(f"{'N':>6} {'H':>5} {'V':>7} {'method':8} {'ms':>9} {'peak GiB':>9} {'loss':>9}")
    t_start = time.time()
    for n, h, v in configs:
        if time.time() - t_start > budget_s:
            print(f"(time budget {budget_s:.0f}s reached; skipping N={n} H={h} V={v})")
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        xs = torch.randn(n, h, generator=g).to(dev, dtype)
        w = (torch.randn(v, h, generator=g) * h**-0.5).to(dev, dtype)
        xt = torch.randn(n, h, generator=g).to(dev, dtype)
        wt = (torch.randn(v, h, generator=g) * h**-0.5).to(dev, dtype)
        labels = torch.randint(0, v, (n,), generator=g).to(dev)

        def naive(a, b):
            z = a @ b.T
            with torch.no_grad():
                zt = xt @ wt.T
            return L.generalized_jsd(z, zt, labels=labels, beta=0.5)

        methods = {
            "naive": naive,
            "chunked": lambda a, b: fused_linear_kd_loss(
                a, b, xt, wt, labels=labels, divergence="jsd", backend="torch", chunk_size=4096
            ),
            "triton": lambda a, b: fused_linear_kd_loss(
                a, b, xt, wt, labels=labels, divergence="jsd", backend="triton"
            ),
        }
        if liger is not None:
            methods["liger"] = lambda a, b: liger(a, b, xt, wt, labels)
        for name, fn in methods.items():
            a, b = xs.clone().requires_grad_(), w.clone().requires_grad_()
            try:
                fn(a, b).backward()  # warm-up / compile
                a.grad = b.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                reps = 3
                e0.record()
                for _ in range(reps):
                    loss = fn(a, b)
                    loss.backward()
                    a.grad = b.grad = None
                e1.record()
                torch.cuda.synchronize()
                ms = e0.elapsed_time(e1) / reps
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(f"{n:6d} {h:5d} {v:7d} {name:8} {ms:9.1f} {peak:9.2f} {float(loss):9.4f}", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{n:6d} {h:5d} {v:7d} {name:8} {'OOM':>9}")
            except Exception as e:  # noqa: BLE001
                print(f"{n:6d} {h:5d} {v:7d} {name:8} error: {type(e).__name__}: {str(e)[:120]}")
            finally:
                del a, b
                torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds allotted to the timing part")
    args = p.parse_args(argv)
    t0 = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"no CUDA: Triton interpreter (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), tiny shapes")
    n_fail = parity(dev, args.quick)
    if dev.type == "cuda":
        timing(dev, args.quick, args.time_budget)
    print(f"\ntotal {time.time() - t0:.0f}s; parity failures: {n_fail}")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
