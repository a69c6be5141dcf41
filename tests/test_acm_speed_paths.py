"""ACM execution paths (issue #28): every path computes what the first grouped path computes.

``prefix`` / ``dense_masked`` / ``grouped`` on CPU (random gates, all-zero and all-max ``k``, padding masks, GLU
learners, projections, bfloat16), gradients where training runs the path (``straight_through=False``), the ``auto``
choice, the config switch, the wall-clock fields of ``acm_stats``, and the Triton kernels under the interpreter
(a subprocess with ``TRITON_INTERPRET=1`` set before triton is imported, like tests/test_quant_triton.py). Speed is
not asserted here: ``benchmarks/acm/acm_speed.py`` measures it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tiny import tiny_bert

from kd_plugins.acm import (
    ACMBlock,
    ACMConfig,
    acm_blocks,
    acm_stats,
    acmize,
    reset_acm_stats,
    set_acm_execution,
    set_acm_mode,
)
from kd_plugins.acm.execution import activation_kind, resolve_execution

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("prefix", "dense_masked", "grouped")


def _block(glu=False, output_bias=True, hidden_bias=True, act=None, min_choice=0, n=4, width=8, seed=0):
    torch.manual_seed(seed)
    blk = ACMBlock(
        16,
        12,
        n,
        width,
        act or nn.GELU(),
        glu=glu,
        output_bias=output_bias,
        hidden_bias=hidden_bias,
        min_choice=min_choice,
    )
    with torch.no_grad():
        if blk.b2 is not None:
            blk.b2.normal_()
        if blk.b1 is not None:
            blk.b1.normal_()
    return blk.eval()


def _ks(shape, n, min_choice=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "random": torch.randint(min_choice, n + 1, shape, generator=g),
        "all_zero": torch.full(shape, min_choice, dtype=torch.long),
        "all_max": torch.full(shape, n, dtype=torch.long),
        "zero_or_max": torch.randint(0, 2, shape, generator=g) * n if min_choice == 0 else torch.full(shape, n),
        "one_token_runs": torch.zeros(shape, dtype=torch.long).index_fill_(-1, torch.tensor([2]), n),
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"glu": True},
        {"output_bias": False},
        {"hidden_bias": False, "act": nn.ReLU()},
        {"act": nn.Identity(), "min_choice": 1, "output_bias": False},  # attention-projection learners
    ],
    ids=["mlp", "glu", "no_out_bias", "relu_no_hidden_bias", "proj"],
)
def test_every_path_matches_grouped(kw):
    blk = _block(**kw)
    x = torch.randn(3, 7, 16)
    for name, k in _ks((3, 7), blk.num_learners, blk.min_choice).items():
        with torch.no_grad():
            ref = blk.grouped_forward(x, k)
            for path in PATHS:
                out = blk.sparse_forward(x, k, path)
                assert out.shape == (3, 7, 12)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{path} / {name}")
                if name == "all_max" and path != "dense_masked":  # the same single dense GEMM pair: bitwise
                    assert torch.equal(out, ref), (path, name)
                zero = k == 0
                if zero.any():  # k = 0 tokens are exactly zero in every path
                    assert torch.equal(out[zero], torch.zeros_like(out[zero])), (path, name)


def test_edge_shapes():
    blk = _block()
    for x, k in (
        (torch.randn(0, 16), torch.zeros(0, dtype=torch.long)),
        (torch.randn(1, 16), torch.tensor([3])),
        (torch.randn(5, 16), torch.tensor([0, 0, 0, 0, 1])),
        (torch.randn(2, 3, 4, 16), torch.randint(0, 5, (2, 3, 4))),
    ):
        with torch.no_grad():
            ref = blk.reference_forward(x, k)
            for path in PATHS:
                torch.testing.assert_close(blk.sparse_forward(x, k, path), ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_paths_agree():
    blk = _block(glu=False).to(torch.bfloat16)
    x = torch.randn(4, 33, 16).to(torch.bfloat16)
    k = torch.randint(0, 5, (4, 33))
    with torch.no_grad():
        ref = blk.to(torch.float32).grouped_forward(x.float(), k)
        blk.to(torch.bfloat16)
        for path in PATHS:
            out = blk.sparse_forward(x, k, path)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("glu", [False, True])
def test_training_gradients_equal_masked_loop(glu):
    """straight_through=False trains through the sparse path: same outputs and gradients as the masked loop."""
    torch.manual_seed(1)
    base = _block(glu=glu).train()
    base.straight_through, base.gate_noise = False, False
    x0 = torch.randn(2, 9, 16)
    r = torch.randn(2, 9, 12)
    results = {}
    for path in ("dense_masked", "prefix", "grouped"):
        base.zero_grad()
        base.execution = path
        x = x0.clone().requires_grad_()
        out = base(x)
        (out * r).sum().backward()
        grads = {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}
        results[path] = (out.detach(), x.grad.clone(), grads)
    ref_out, ref_gx, ref_grads = results["dense_masked"]
    assert not any(n.startswith("gate.") for n in ref_grads)  # the released behaviour: no task gradient to the gate
    for path in ("prefix", "grouped"):
        out, gx, grads = results[path]
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5)
        assert set(grads) <= set(ref_grads)
        for n, g in ref_grads.items():  # a learner no token ran has no gradient (= zeros in the masked loop)
            torch.testing.assert_close(grads.get(n, torch.zeros_like(g)), g, atol=1e-5, rtol=1e-5, msg=n)


def test_auto_resolution_and_triton_needs_no_grad(caplog):
    cpu = torch.device("cpu")
    assert resolve_execution("auto", cpu, training=False, needs_grad=False) == "prefix"
    assert resolve_execution("auto", torch.device("cuda"), training=False, needs_grad=False) == "prefix"
    assert resolve_execution("auto", cpu, training=True, needs_grad=True) == "dense_masked"  # unchanged training
    assert resolve_execution("grouped", cpu, training=True, needs_grad=True) == "grouped"
    with caplog.at_level(logging.WARNING, logger="kd_plugins.acm.execution"):
        assert resolve_execution("triton", cpu, training=False, needs_grad=True) == "prefix"
    with pytest.raises(ValueError, match="execution must be one of"):
        resolve_execution("fast", cpu, training=False, needs_grad=False)


def test_config_and_switch():
    with pytest.raises(ValueError, match="execution must be one of .* got 'fastest'"):
        ACMConfig(execution="fastest")
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(ACMConfig).parse_args_into_dataclasses(["--execution", "grouped"])
    assert cfg.execution == "grouped"
    bert = acmize(tiny_bert(), "mlp", 4, config=ACMConfig(execution="prefix"))
    assert {b.execution for b in acm_blocks(bert).values()} == {"prefix"}
    bert = acmize(tiny_bert(), "mlp", 4, config=ACMConfig(execution="prefix"), execution="grouped")  # override wins
    assert {b.execution for b in acm_blocks(bert).values()} == {"grouped"}
    set_acm_execution(bert, "dense_masked")
    assert {b.execution for b in acm_blocks(bert).values()} == {"dense_masked"}
    with pytest.raises(ValueError, match="execution must be one of"):
        set_acm_execution(bert, "cuda")
    with pytest.raises(ValueError, match="no ACM blocks"):
        set_acm_execution(nn.Linear(2, 2), "prefix")


def _padded_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 96, (4, 13), generator=g)
    am = torch.ones_like(ids)
    am[1, -5:] = 0
    am[3, -9:] = 0
    return {"input_ids": ids.masked_fill(am == 0, 0), "attention_mask": am}


def test_whole_model_paths_with_padding_and_stats():
    bert = acmize(tiny_bert().eval(), "mlp", 4)
    with torch.no_grad():  # gates that spread k over 0..N
        for b in acm_blocks(bert).values():
            b.gate.l3.weight.normal_(0, 5.0, generator=torch.Generator().manual_seed(0))
    inputs = _padded_inputs()
    real = int(inputs["attention_mask"].sum())
    outs = {}
    for path in PATHS + ("auto",):
        set_acm_execution(bert, path)
        reset_acm_stats(bert, True)
        with torch.no_grad():
            outs[path] = bert(**inputs).last_hidden_state
        st = acm_stats(bert)
        resolved = "prefix" if path == "auto" else path
        assert st["executions"] == {resolved: len(acm_blocks(bert))}
        assert st["threads"] == torch.get_num_threads()
        assert st["wall_s"] > 0 and st["us_per_token"] > 0 and st["gflops_per_s"] > 0
        for v in st["blocks"].values():
            assert v["tokens"] == real  # real tokens only
            assert v["us_per_token"] == pytest.approx(1e6 * v["wall_s"] / real)
        ks = torch.stack([b.last_k for b in acm_blocks(bert).values()])
        assert torch.all(ks[:, inputs["attention_mask"] == 0] == 0)  # padding runs no learner
        assert len(set(ks[:, inputs["attention_mask"] == 1].flatten().tolist())) > 2
    for path in PATHS + ("auto",):
        torch.testing.assert_close(outs[path], outs["grouped"], atol=1e-5, rtol=1e-5)
    set_acm_mode(bert, "fixed", k=4)  # fixed / full modes run the dense GEMM pair, whatever the execution
    set_acm_execution(bert, "prefix")
    reset_acm_stats(bert, True)
    with torch.no_grad():
        bert(**inputs)
    assert acm_stats(bert)["executions"] == {}


def test_activation_kind_probe():
    from transformers.activations import ACT2FN

    assert activation_kind(nn.GELU()) == "gelu"
    assert activation_kind(ACT2FN["gelu"]) == "gelu"
    assert activation_kind(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_kind(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert activation_kind(nn.SiLU()) == "silu"
    assert activation_kind(nn.ReLU()) == "relu"
    assert activation_kind(nn.Identity()) == "identity"
    assert activation_kind(nn.Tanh()) is None


def test_triton_off_device_is_a_clear_error():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET"):
        pytest.skip("this process runs the Triton interpreter")
    blk = _block()
    blk.execution = "triton"
    with torch.no_grad(), pytest.raises(RuntimeError, match="execution='prefix'"):
        blk.sparse_forward(torch.randn(3, 16), torch.tensor([0, 2, 4]))


INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch, torch.nn as nn
    from kd_plugins.acm import ACMBlock
    from kd_plugins.kernels.acm_grouped import acm_grouped_mlp, acm_grouped_mlp_reference
    rows = []
    torch.manual_seed(0)
    # ragged: T=37 tokens, d_in=24, learner width 12 (hidden 36, not a multiple of the 16-wide tiles), d_out=20
    for act_name, act, glu, bias in [("gelu", nn.GELU(), False, True), ("gelu_tanh", nn.GELU("tanh"), False, True),
                                     ("relu", nn.ReLU(), False, False), ("silu", nn.SiLU(), True, True),
                                     ("identity", nn.Identity(), False, False)]:
        blk = ACMBlock(24, 20, 3, 12, act, glu=glu, hidden_bias=bias, output_bias=bias).eval()
        with torch.no_grad():
            for p in blk.parameters():
                p.normal_(0, 0.3)
        x = torch.randn(37, 24)
        g = torch.Generator().manual_seed(1)
        cases = [("random", torch.randint(0, 4, (37,), generator=g)), ("all_zero", torch.zeros(37, dtype=torch.long)),
                 ("all_max", torch.full((37,), 3)), ("sorted_runs", torch.arange(37) % 4)]
        for kname, k in cases:
            with torch.no_grad():
                out = blk.sparse_forward(x, k, "triton")
                pre = blk.sparse_forward(x, k, "prefix")
                ref = acm_grouped_mlp_reference(x, k, blk.w1, blk.b1, blk.w2, blk.b2, num_learners=3, width=12,
                                                act=act_name, w3=blk.w3, b3=blk.b3)
            rows.append(dict(case=f"{act_name}/{kname}", vs_prefix=float((out - pre).abs().max()),
                             vs_ref=float((out - ref).abs().max()), zeros_exact=bool((out[k == 0] == 0).all())))
    blk = ACMBlock(24, 20, 3, 12, nn.GELU(), output_bias=True).eval().to(torch.bfloat16)
    x = torch.randn(2, 19, 24).to(torch.bfloat16)
    k = torch.randint(0, 4, (2, 19))
    with torch.no_grad():
        out = blk.sparse_forward(x, k, "triton")
        pre = blk.float().sparse_forward(x.float(), k, "prefix")
    rows.append(dict(case="bf16", dtype=str(out.dtype), shape=list(out.shape),
                     vs_prefix=float((out.float() - pre).abs().max()), vs_ref=0.0, zeros_exact=True))
    print("RESULT" + json.dumps(rows))
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :])
    assert len(rows) == 5 * 4 + 1
    for r in rows[:-1]:
        assert r["vs_prefix"] <= 1e-4 and r["vs_ref"] <= 1e-4 and r["zeros_exact"], r
    bf16 = rows[-1]
    assert bf16["dtype"] == "torch.bfloat16" and bf16["shape"] == [2, 19, 20] and bf16["vs_prefix"] <= 5e-2, bf16


def test_gpu_check_smoke_acm_sections(tmp_path):
    """``benchmarks/gpu_check.py --smoke --only acm``: the ACM kernel sections run on CPU (interpreter) and pass."""
    pytest.importorskip("triton")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OUT", None)
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--only", "acm", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert set(sections) == {"acm_grouped_parity", "acm_grouped_timing"}
    parity = sections["acm_grouped_parity"]
    assert {r["dtype"] for r in parity} == {"float32", "bfloat16"} and {r["glu"] for r in parity} == {False, True}
    assert all(r["status"] == "ok" for r in parity), [r for r in parity if r["status"] != "ok"]
    methods = {r["method"] for r in sections["acm_grouped_timing"] if r["status"] == "ok"}
    assert methods == {"dense", "grouped", "prefix", "triton"}
