"""Triton int8 kernels checked on CPU under TRITON_INTERPRET=1 against an exact integer reference.

Triton fixes interpreter mode when it is first imported, so the kernel checks run in one subprocess that sets
TRITON_INTERPRET=1 before any import; this process (and other test modules) never sees the variable. Shapes are small
and ragged (not multiples of the block sizes) so masking is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from kd_plugins.kernels.int8_gemm import int8_gemm, int8_gemm_reference, quantize_rows
    from kd_plugins.quant._core import quantize_activations, crossquant_inv_col, smoothquant_inv_scale
    from kd_plugins.quant import QuantizedLinear

    out = {}
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1), (5, 7, 33), (37, 100, 45), (64, 48, 70)]
    exact, epi = [], []
    for m, k, n in shapes:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        c = int8_gemm(a, w.t())                       # strided B view, as QuantizedLinear calls it
        exact.append(c.dtype == torch.int32 and torch.equal(c.long(), int8_gemm_reference(a, w.t())))
        rs, cs, b = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g), torch.randn(n, generator=g)
        y = int8_gemm(a, w.t(), rs, cs, b)
        ref = int8_gemm_reference(a, w.t(), rs, cs, b)
        epi.append(float(((y.double() - ref).abs() / (ref.abs() + 1)).max()))
    # extreme values: every product 127*127 (or -127*127), K large enough to need int32 accumulation
    a = torch.full((20, 300), -127, dtype=torch.int8); w = torch.full((300, 19), 127, dtype=torch.int8)
    exact.append(torch.equal(int8_gemm(a, w).long(), int8_gemm_reference(a, w)))
    out["gemm_exact"] = exact
    out["epilogue_max_rel_err"] = max(epi)

    x = torch.randn(23, 90, generator=g); x[:, 4] *= 50; x[3] = 0
    col = x.abs().amax(0)
    w = torch.randn(16, 90, generator=g)
    codes = {}
    for method, alpha, inv, kw in [
        ("per_token", None, None, dict(alpha=1.0, rowmax_after_col=True)),
        ("smoothquant", 0.5, smoothquant_inv_scale(col, w, 0.5), dict(alpha=1.0, rowmax_after_col=True)),
        ("crossquant", 0.3, crossquant_inv_col(col, 0.3), dict(alpha=0.3, rowmax_after_col=False)),
    ]:
        q_ref, rs_ref, _ = quantize_activations(x, method, alpha, inv)
        q, rs = quantize_rows(x, inv, **kw)
        diff = (q.int() - q_ref.int()).abs()
        codes[method] = {"max_code_diff": int(diff.max()), "n_diff": int((diff > 0).sum()),
                         "rs_rel": float(((rs - rs_ref).abs() / rs_ref).max())}
    out["quantizer"] = codes

    torch.manual_seed(0)
    lin = torch.nn.Linear(90, 40)
    ql = QuantizedLinear.from_float(lin, method="crossquant", alpha=0.3, col_max=col)
    y_torch = ql.set_backend("torch")(x)
    y_triton = ql.set_backend("triton")(x)
    out["layer_max_abs_diff"] = float((y_torch - y_triton).abs().max())
    out["layer_scale"] = float(y_torch.abs().max())

    # dynamic CrossQuant: the per-call weight requantization is the row quantizer on the int8 weight
    from kd_plugins.quant import dynamic
    dl = QuantizedLinear.from_float(lin, method="crossquant_dynamic_int8", alpha=0.3, fallback_rows=0)
    plan = dynamic.plan_call(x, 0.3, dl.outlier_threshold, block=1024)
    out["dyn_outliers"] = plan.outliers.tolist()
    wq_ref, ws_ref = dynamic.requantize_weight(dl.weight_int8, dl.weight_scale, plan.g)
    wq, wr = quantize_rows(dl.weight_int8, plan.g, alpha=1.0, rowmax_after_col=True)
    out["requant_equal"] = bool(torch.equal(wq, wq_ref)) and bool(torch.equal(dl.weight_scale * wr, ws_ref))
    xm = x.index_fill(1, plan.outliers, 0.0)
    r_ref = dynamic.row_factors(dynamic.row_absmax(x, plan.outliers, 1024), 0.3)
    q_ref, _ = dynamic.quantize_rows_dynamic(x, r_ref, plan.inv)
    q_tr, _ = quantize_rows(xm, plan.inv, alpha=0.3, rowmax_after_col=False)
    out["dyn_code_diff"] = int((q_tr.int() - q_ref.int()).abs().max())
    out["dyn_gemm_exact"] = bool(torch.equal(int8_gemm(q_tr, wq.t()).long(), q_tr.long() @ wq.long().T))
    y_torch = dl.set_backend("torch")(x)
    y_triton = dl.set_backend("triton")(x)
    out["dyn_layer_max_abs_diff"] = float((y_torch - y_triton).abs().max())
    out["dyn_layer_scale"] = float(y_torch.abs().max())
    print("RESULT" + json.dumps(out))
    """
)

NO_INTERPRETER = textwrap.dedent(
    r"""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from kd_plugins.kernels.int8_gemm import int8_gemm, TritonUnavailableError
    from kd_plugins.quant import QuantizedLinear
    a = torch.zeros(4, 8, dtype=torch.int8)
    for call in (lambda: int8_gemm(a, a.t()),
                 lambda: QuantizedLinear.from_float(torch.nn.Linear(8, 4), method="per_token").set_backend("triton")(
                     torch.randn(3, 8))):
        try:
            call()
        except TritonUnavailableError as e:
            print("ERR:" + str(e).replace("\n", " "))
    """
)


def _run(script: str, interpret: bool) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def interp_results():
    out = _run(SCRIPT, interpret=True)
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_int8_gemm_matches_integer_reference_exactly(interp_results):
    assert interp_results["gemm_exact"] == [True] * 5


def test_int8_gemm_epilogue(interp_results):
    assert interp_results["epilogue_max_rel_err"] < 1e-5


def test_row_quantizer_matches_torch(interp_results):
    for method, r in interp_results["quantizer"].items():
        # identical codes except, at most, rare ties flipped by a last-ulp difference of the fp32 scale
        assert r["max_code_diff"] <= 1, (method, r)
        assert r["n_diff"] <= 2, (method, r)
        assert r["rs_rel"] < 1e-6, (method, r)


def test_quantized_linear_triton_backend_matches_torch_backend(interp_results):
    assert interp_results["layer_max_abs_diff"] <= 1e-5 * max(1.0, interp_results["layer_scale"])


def test_dynamic_crossquant_triton_path(interp_results):
    r = interp_results
    assert r["dyn_outliers"] == [4]  # the x50 column of the test input runs in float
    assert r["requant_equal"] and r["dyn_gemm_exact"]
    assert r["dyn_code_diff"] <= 1
    assert r["dyn_layer_max_abs_diff"] <= 1e-5 * max(1.0, r["dyn_layer_scale"])


def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    out = _run(NO_INTERPRETER, interpret=False)
    errs = [l for l in out.splitlines() if l.startswith("ERR:")]
    assert len(errs) == 2
    assert all("TRITON_INTERPRET=1" in e and "GPU" in e for e in errs)
