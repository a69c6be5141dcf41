"""Dynamic CrossQuant on real int8 GEMMs (method ``crossquant_dynamic_int8``, kd_plugins.quant.dynamic).

Integer reference of the GEMM path, equality with the fake-quant reference where the math is the same, the decode
fallback, the default method, save/load, old and foreign checkpoints and bad inputs. Tiny models, CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_plugins.quant import (
    DEFAULT_METHOD,
    QuantConfig,
    QuantizedCheckpointError,
    QuantizedLinear,
    dynamic,
    load_quantized,
    quantization_kernel_report,
    quantize,
    quantized_layers,
    save_quantized,
)
from kd_plugins.quant._core import quantize_activations

sys.path.insert(0, str(Path(__file__).parent))
from test_quant_core import MLP, llama_batches, mlp_and_data, outlier_x, tiny_llama  # noqa: E402

METHOD = "crossquant_dynamic_int8"


def dyn_layer(k=64, n=40, alpha=0.35, seed=0, **kw) -> tuple[nn.Linear, QuantizedLinear]:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return lin, QuantizedLinear.from_float(lin, method=METHOD, alpha=alpha, **kw)


# ------------------------------------------------------------------------------------------------ integer reference
@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.8])
def test_int8_path_equals_pure_integer_reference(alpha):
    lin, q = dyn_layer(alpha=alpha, fallback_rows=0, outlier_threshold=0)
    x = outlier_x(70, 64)
    y = q(x)
    # the per-call quantities, recomputed independently in float64
    c = x.abs().amax(0).double().clamp_min(float(x.abs().max()) * 1e-5)
    t = x.abs().amax(1).double()
    g = c.pow(1 - alpha)
    codes_ref = torch.round(127 * x.double() / (t[:, None] ** alpha * g[None, :]))
    v = q.weight_int8.double() * g
    m = v.abs().amax(1)
    w_ref = torch.round(127 * v / m[:, None])
    # the layer's own codes (same functions as its forward)
    plan = dynamic.plan_call(x, alpha, 0.0, block=1024)
    assert plan.outliers.numel() == 0
    wq, ws = dynamic.requantize_weight(q.weight_int8, q.weight_scale, plan.g)
    codes, rs = dynamic.quantize_rows_dynamic(
        x, dynamic.row_factors(dynamic.row_absmax(x, plan.outliers, 1024), alpha), plan.inv
    )
    assert codes.abs().max() <= 127 and wq.abs().max() <= 127  # no clamp needed
    # float32 vs float64 rounding may flip exact ties only
    assert (codes.double() - codes_ref).abs().max() <= 1 and (codes.double() != codes_ref).float().mean() < 1e-3
    assert (wq.double() - w_ref).abs().max() <= 1 and (wq.double() != w_ref).float().mean() < 1e-3
    # exact int32 accumulation vs int64 integer reference, then the rank-1 epilogue
    acc = torch._int_mm(codes, wq.t())
    acc_ref = codes.long() @ wq.long().T
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), acc_ref)
    ref = acc_ref.double() * rs.double()[:, None] * ws.double()[None, :] + q.bias.double()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ws.double(), q.weight_scale.double() * m / 127, rtol=1e-6)
    with torch.no_grad():
        assert float((y - lin(x)).norm() / lin(x).norm()) < (0.1 if alpha == 0 else 0.03)


def test_outlier_columns_run_in_float_and_the_rest_is_exact_integer():
    lin, q = dyn_layer(fallback_rows=0)  # default outlier_threshold
    x = outlier_x(70, 64, outliers=(3, 11), scale=40.0)
    plan = dynamic.plan_call(x, 0.35, q.outlier_threshold, block=1024)
    o = int(x.abs().amax(0).argmax())
    assert plan.outliers.tolist() == [o]  # at most 64 // 64 = 1 column, the largest one
    assert plan.inv[o] == 0 and plan.g[o] == 0
    wq, ws = dynamic.requantize_weight(q.weight_int8, q.weight_scale, plan.g)
    assert (wq[:, o] == 0).all()
    codes, rs = dynamic.quantize_rows_dynamic(
        x, dynamic.row_factors(dynamic.row_absmax(x, plan.outliers, 1024), 0.35), plan.inv
    )
    assert (codes[:, o] == 0).all() and codes.abs().max() <= 127
    t = x.abs().index_fill(1, plan.outliers, 0).amax(1)  # row maxima without the outlier column
    assert torch.allclose(rs, t.pow(0.35) / 127, rtol=1e-5)
    acc = codes.long() @ wq.long().T
    w_out = q.weight_int8[:, o].double() * q.weight_scale.double()
    ref = acc.double() * rs.double()[:, None] * ws.double() + q.bias.double() + x[:, o : o + 1].double() * w_out
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-4)
    # more columns allowed for wider layers; none when no column stands out
    assert dynamic.select_outliers(torch.ones(640), 8.0).numel() == 0
    wide = torch.ones(640)
    wide[[5, 9, 100, 300]] = torch.tensor([50.0, 60.0, 70.0, 9.0])
    assert dynamic.select_outliers(wide, 8.0).tolist() == [5, 9, 100, 300]
    assert dynamic.select_outliers(wide, 0.0).numel() == 0


def test_codes_are_the_fake_reference_codes_and_fake_mode_matches_int8():
    lin, q = dyn_layer(fallback_rows=0, outlier_threshold=0)
    x = outlier_x(3, 20, 64)
    x2 = x.reshape(-1, 64)
    # without outlier columns the forward's codes are the fake-quant crossquant_dynamic codes, bit for bit
    plan = dynamic.plan_call(x2, 0.35, 0.0, block=1024)
    codes, rs = dynamic.quantize_rows_dynamic(
        x2, dynamic.row_factors(dynamic.row_absmax(x2, plan.outliers, 1024), 0.35), plan.inv
    )
    ref_codes, ref_rs, ref_inv = quantize_activations(x2, "crossquant_dynamic", 0.35, None)
    assert torch.equal(codes, ref_codes) and torch.equal(rs, ref_rs) and torch.equal(plan.inv, ref_inv)
    assert torch.equal(q.quantize_input(x2)[0], ref_codes)
    for layer in (q, dyn_layer(fallback_rows=0)[1]):  # with and without outlier columns
        y_int8 = layer(x)
        y_fake = copy.deepcopy(layer).set_mode("fake")(x)
        assert y_int8.shape == (3, 20, 40)
        assert torch.allclose(y_int8, y_fake, rtol=1e-4, atol=1e-4)
    # the paper-form reference (static weights, no fold) is close but not the same computation
    paper = QuantizedLinear.from_float(lin, method="crossquant_dynamic", alpha=0.35)
    assert paper.mode == "fake" and torch.equal(paper.weight_int8, q.weight_int8)
    assert float((paper(x) - q(x)).norm() / q(x).norm()) < 0.05


def test_per_call_statistics_and_row_blocking(monkeypatch):
    _, q = dyn_layer(fallback_rows=0)
    x = outlier_x(4, 30, 64)
    # "per call" = every row of the flattened input: [4, 30, K] is the same call as [120, K]
    assert torch.equal(q(x), q(x.reshape(120, 64)).reshape(4, 30, 40))
    # a row's output depends on the other rows of the call (column maxima are shared)
    assert not torch.equal(q(x[0]), q(x)[0])
    # CPU row blocks (cache-sized pieces) do not change a bit
    ref = q(x)
    monkeypatch.setattr(QuantizedLinear, "ROW_BLOCK", 16)
    assert torch.equal(q(x), ref)


def test_layers_reading_one_input_share_its_codes_exactly(monkeypatch):
    """q/k/v (gate/up) read one tensor: its codes are computed once and every layer's output is unchanged."""
    layers = [dyn_layer(seed=s, fallback_rows=0)[1] for s in range(3)]
    x = outlier_x(50, 64)
    dynamic.clear_shared_call()
    alone = []
    for q in layers:
        dynamic.clear_shared_call()
        alone.append(q(x))
    computed = []
    real = dynamic.call_codes
    monkeypatch.setattr(dynamic, "call_codes", lambda *a: computed.append(1) or real(*a))
    dynamic.clear_shared_call()
    with torch.no_grad():
        shared = [q(x) for q in layers]
    assert len(computed) == 1 and all(torch.equal(a, b) for a, b in zip(alone, shared))
    x.mul_(2.0)  # an in-place write bumps the version counter: no stale codes
    with torch.no_grad():
        again = layers[0](x)
    assert len(computed) == 2 and not torch.equal(again, shared[0])
    y = x.clone().requires_grad_()  # inputs that require grad are never cached
    layers[0](y), layers[1](y)
    assert len(computed) == 4
    dynamic.clear_shared_call()


def test_all_zero_rows_and_columns_are_safe():
    _, q = dyn_layer(k=8, n=4, fallback_rows=0)
    x = torch.zeros(5, 8)
    x[1, 2] = 3.0
    y = q(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[0], q.bias) and torch.isfinite(q(torch.zeros(3, 8))).all()


def test_pointwise_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1)
    q = QuantizedLinear.from_float(conv, method=METHOD, alpha=0.35, fallback_rows=0)
    x = torch.randn(2, 16, 5, 5)
    x[:, 3] *= 30
    with torch.no_grad():
        assert float((q(x) - conv(x)).norm() / conv(x).norm()) < 0.03


# ------------------------------------------------------------------------------------------------ decode fallback
def test_decode_fallback_weight_only_and_per_token():
    lin, q = dyn_layer(fallback="weight_only", fallback_rows=8)
    few, many = outlier_x(7, 64), outlier_x(8, 64)
    w = q.weight_int8.float() * q.weight_scale[:, None]
    # weight-only: float activations x the stored int8 weight
    assert torch.allclose(q(few), F.linear(few, w, q.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q(many), F.linear(many, w, q.bias), rtol=1e-5, atol=1e-5)  # 8 rows: dynamic path
    assert torch.equal(q(many), copy.deepcopy(q).set_fallback("weight_only", 0)(many))
    # per-token W8A8 on the stored weight: exactly the per_token method
    q.set_fallback("per_token", 8)
    per_token = QuantizedLinear.from_float(lin, method="per_token")
    assert torch.equal(q(few), per_token(few))
    q.set_fallback("per_token", 0)
    assert not torch.equal(q(few[:1]), per_token(few[:1]))  # fallback_rows=0: one row runs the dynamic path
    with pytest.raises(ValueError, match="fallback must be one of"):
        q.set_fallback("fp16", 8)
    with pytest.raises(ValueError, match="fallback_rows"):
        q.set_fallback("per_token", -1)


def test_llama_prefill_and_cached_decode():
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), fallback_rows=4)
    assert qm.kd_quantization["method"] == METHOD == DEFAULT_METHOD
    ids = data[0]["input_ids"][:1]
    with torch.no_grad():
        out = qm(input_ids=ids, use_cache=True)
        ref = m(input_ids=ids, use_cache=True)
        step = qm(input_ids=ids[:, -1:], cache=out.cache)  # 1 row: per-token fallback
        step_ref = m(input_ids=ids[:, -1:], cache=ref.cache)
    assert float((out.logits - ref.logits).norm() / ref.logits.norm()) < 0.1
    assert float((step.logits - step_ref.logits).norm() / step_ref.logits.norm()) < 0.1


# ------------------------------------------------------------------------------------------------ quantize()
def test_default_method_needs_no_calibration_and_validates_what_it_gets(caplog):
    m, calib, x = mlp_and_data()
    assert QuantConfig().method == DEFAULT_METHOD == METHOD
    q = quantize(copy.deepcopy(m))
    assert q.kd_quantization["method"] == METHOD and q.kd_quantization["alpha"] == 0.35
    assert set(quantized_layers(q)) == {"fc1", "fc2"}  # classifier and norm skipped by default
    with caplog.at_level("INFO", logger="kd_plugins.quant"):
        q2 = quantize(copy.deepcopy(m), calibration_data=calib)
    assert "calibration_data is not used" in caplog.text
    assert torch.equal(q(x), q2(x))
    with pytest.raises(ValueError, match="empty"):
        quantize(copy.deepcopy(m), calibration_data=[])
    with pytest.raises(TypeError, match="iterable of batches"):
        quantize(copy.deepcopy(m), calibration_data=3)
    with pytest.raises(ValueError, match="alpha='auto' needs calibration_data"):
        quantize(copy.deepcopy(m), alpha="auto")
    with pytest.raises(ValueError, match="alpha='auto' is calibrated per layer"):
        quantize(copy.deepcopy(m), method="crossquant_dynamic", alpha="auto", calibration_data=calib)
    with pytest.raises(ValueError, match="matches no module"):
        quantize(copy.deepcopy(m), skip=["fc9"])
    with pytest.raises(ValueError, match="fallback must be one of"):
        QuantConfig(fallback="fp16")
    with pytest.raises(ValueError, match="fallback_rows"):
        QuantConfig(fallback_rows=-2)
    with pytest.raises(ValueError, match="outlier_threshold"):
        QuantConfig(outlier_threshold=-1.0)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize(convs)
    rep = quantization_kernel_report(q, [x]).summary()
    assert rep["kernel"] < rep["per_token_kernel"]


def test_alpha_auto_per_layer_round_trip(tmp_path):
    m, calib, x = mlp_and_data()
    q = quantize(copy.deepcopy(m), alpha="auto", calibration_data=calib, alpha_grid="0.2,0.5,0.8")
    chosen = q.kd_quantization["layer_alpha"]
    assert set(chosen) == {"fc1", "fc2"} and set(chosen.values()) <= {0.2, 0.5, 0.8}
    assert {n: l.alpha for n, l in quantized_layers(q).items()} == chosen
    out = save_quantized(q, tmp_path / "auto")
    assert torch.equal(load_quantized(out, model=copy.deepcopy(m))(x), q(x))


def test_other_methods_stay_selectable():
    m, calib, x = mlp_and_data()
    for method in ("crossquant", "smoothquant", "per_token", "crossquant_dynamic"):
        q = quantize(copy.deepcopy(m), method=method, calibration_data=calib)
        assert {l.method for l in quantized_layers(q).values()} == {method}


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_load_bit_identical_prefill_and_decode(tmp_path):
    from transformers import AutoModelForCausalLM

    import kd_plugins  # noqa: F401  (registers the from_pretrained quantizer)

    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), fallback="per_token", fallback_rows=4)
    out = save_quantized(qm, tmp_path / "ck")
    meta = json.loads((out / "quant_config.json").read_text())["metadata"]
    entry = meta["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["method"] == METHOD and entry["fallback"] == "per_token" and entry["fallback_rows"] == 4
    assert entry["outlier_threshold"] == 8.0 and entry["compile_quantizer"] is False
    assert meta["activations"]["strategy"] == "token_and_channel_per_call"
    for loaded in (load_quantized(out), AutoModelForCausalLM.from_pretrained(out)):
        lq = quantized_layers(loaded)["model.layers.1.self_attn.q_proj"]
        assert (lq.method, lq.fallback, lq.fallback_rows) == (METHOD, "per_token", 4)
        assert lq.weight_int8.dtype == torch.int8
        with torch.no_grad():
            for b in data:
                assert torch.equal(qm(**b).logits, loaded(**b).logits)
            ids = data[0]["input_ids"][:, :3]  # 2 x 3 = 6 rows: dynamic; 2 x 1 decode rows: fallback
            assert torch.equal(qm(input_ids=ids).logits, loaded(input_ids=ids).logits)
            assert torch.equal(qm(input_ids=ids[:, :1]).logits, loaded(input_ids=ids[:, :1]).logits)


def test_old_static_checkpoint_loads_exactly_and_fake_reference_is_refused_as_int8(tmp_path):
    m, calib, x = mlp_and_data()
    # a checkpoint of the static form, as earlier versions wrote it (no dynamic-option keys in the layer entries)
    static = quantize(copy.deepcopy(m), "crossquant", calibration_data=calib)
    out = save_quantized(static, tmp_path / "static")
    entry = json.loads((out / "quant_config.json").read_text())["metadata"]["layers"]["fc1"]
    assert "fallback" not in entry
    assert torch.equal(load_quantized(out, model=copy.deepcopy(m))(x), static(x))
    # the fake-quant paper form has no int8 GEMM: asking for one says how to re-quantize
    paper = save_quantized(quantize(copy.deepcopy(m), "crossquant_dynamic"), tmp_path / "paper")
    with pytest.raises(QuantizedCheckpointError, match="re-quantize.*crossquant_dynamic_int8"):
        load_quantized(paper, model=copy.deepcopy(m), mode="int8")
    assert load_quantized(paper, model=copy.deepcopy(m)).fc1.mode == "fake"


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "quant_config.json").read_text())
    edit(manifest["metadata"]["layers"]["fc1"])
    (dst / "quant_config.json").write_text(json.dumps(manifest))
    return dst


def test_foreign_and_corrupt_checkpoints_are_refused(tmp_path):
    m, _, x = mlp_and_data()
    good = save_quantized(quantize(copy.deepcopy(m)), tmp_path / "good")
    assert torch.equal(load_quantized(good, model=copy.deepcopy(m))(x), quantize(copy.deepcopy(m))(x))
    for name, edit, match in (
        ("method", lambda l: l.update(method="crossquant_dynamic_int4"), "does not know.*upgrade kd_plugins"),
        ("fallback", lambda l: l.update(fallback="fp8"), "fallback 'fp8'.*upgrade kd_plugins"),
        ("rows", lambda l: l.update(fallback_rows="many"), "malformed fallback_rows"),
        ("tau", lambda l: l.update(outlier_threshold=-1), "malformed outlier_threshold"),
    ):
        bad = _edit_manifest(good, tmp_path / name, edit)
        with pytest.raises(QuantizedCheckpointError, match=match):
            load_quantized(bad, model=copy.deepcopy(m))
    bad = tmp_path / "flipped"
    shutil.copytree(good, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(QuantizedCheckpointError, match="checksum"):
        load_quantized(bad, model=copy.deepcopy(m))
    (bad / "model.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(QuantizedCheckpointError):
        load_quantized(bad, model=copy.deepcopy(m))
    with pytest.raises(QuantizedCheckpointError):
        load_quantized(good, model=MLP(k=32, h=40))
