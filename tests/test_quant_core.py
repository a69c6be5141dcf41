"""Unit tests for kd_plugins.quant on tiny random models (CPU, fast)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_plugins.quant import (  # noqa: E402
    DEFAULT_ALPHA,
    QuantizedCheckpointError,
    QuantizedLinear,
    collect_activation_stats,
    find_quantizable,
    load_quantized,
    quantization_kernel_report,
    quantize,
    quantized_layers,
    save_quantized,
    sweep_alpha,
)
from kd_plugins.quant._core import (  # noqa: E402
    crossquant_inv_col,
    int8_mm,
    padded_int_mm,
    quantize_activations,
)

INT8_METHODS = ("per_token", "smoothquant", "crossquant")


def outlier_x(*shape, outliers=(3, 11), scale=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    for c in outliers:
        x[..., c] *= scale
    return x


class MLP(nn.Module):
    def __init__(self, k=32, h=48, n=16):
        super().__init__()
        self.fc1 = nn.Linear(k, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, n, bias=False)
        self.norm = nn.LayerNorm(n)
        self.classifier = nn.Linear(n, 3)

    def forward(self, x):
        return self.classifier(self.norm(self.fc2(self.act(self.fc1(x)))))


def mlp_and_data(seed=0):
    torch.manual_seed(seed)
    m = MLP().eval()
    calib = [outlier_x(4, 8, 32, seed=s) for s in range(3)]
    x = outlier_x(2, 8, 32, seed=10)
    return m, calib, x


def tiny_llama(tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outlier channels, as in real LLMs
        for layer in m.model.layers:
            layer.input_layernorm.weight[[5, 17]] = 30.0
            layer.post_attention_layernorm.weight[[9]] = 25.0
    return m


def llama_batches(n=3, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, seq), generator=g)} for _ in range(n)]


# ------------------------------------------------------------------------------------------------ int8 arithmetic
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 33), (17, 64, 9), (64, 48, 300)])
def test_int8_mm_exact(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ref = a.long() @ w.long().T
    assert torch.equal(int8_mm(a, w.t()).long(), ref)
    assert torch.equal(padded_int_mm(a, w.t()).long(), ref)  # the CUDA padding rule, checked on CPU


def test_int8_mm_rejects_float():
    with pytest.raises(TypeError):
        int8_mm(torch.zeros(2, 2), torch.zeros(2, 2))


def test_activation_quantizers_properties():
    x = outlier_x(50, 40)
    col = x.abs().amax(0)
    # per-token: |x - x_hat| <= step/2
    q, rs, _ = quantize_activations(x, "per_token", None, None)
    assert q.abs().max() <= 127
    assert ((x - q.float() * rs[:, None]).abs() <= rs[:, None] / 2 + 1e-6).all()
    # crossquant with alpha=1 is per-token
    q1, rs1, _ = quantize_activations(x, "crossquant", 1.0, crossquant_inv_col(col, 1.0))
    assert torch.equal(q1, q) and torch.allclose(rs1, rs)
    # dynamic crossquant never needs the clamp: |x_ij| <= t_i^a c_j^(1-a)
    for a in (0.0, 0.3, 0.7):
        inv = crossquant_inv_col(col, a)
        r = x.abs().amax(1).pow(a)
        v = x * inv * (127 / r)[:, None]
        assert v.abs().max() <= 127 * (1 + 1e-5)
        qd, _, _ = quantize_activations(x, "crossquant_dynamic", a, None)
        # smaller alpha -> smaller kernel than per-token on outlier data
        assert (qd == 0).sum() < (q == 0).sum()


def test_all_zero_rows_and_columns_are_safe():
    x = torch.zeros(4, 8)
    x[1, 2] = 3.0
    for method, alpha, inv in (
        ("per_token", None, None),
        ("crossquant", 0.5, crossquant_inv_col(torch.zeros(8), 0.5)),
        ("crossquant_dynamic", 0.5, None),
    ):
        q, rs, _ = quantize_activations(x, method, alpha, inv)
        assert torch.isfinite(rs).all() and q[0].abs().sum() == 0


# ------------------------------------------------------------------------------------------------ QuantizedLinear
@pytest.mark.parametrize("method", INT8_METHODS)
def test_quantized_linear_matches_integer_reference(method):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    x = outlier_x(30, 40)
    col = x.abs().amax(0)
    q = QuantizedLinear.from_float(lin, method=method, alpha=DEFAULT_ALPHA[method], col_max=col)
    y = q(x)
    codes, rs, _ = q.quantize_input(x)
    acc = codes.long() @ q.weight_int8.long().T  # exact integer GEMM
    ref = acc.double() * rs.double()[:, None] * q.weight_scale.double()[None, :] + q.bias.double()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and the layer approximates the float layer
    rel = (y - lin(x)).norm() / lin(x).norm()
    assert rel < 0.05


@pytest.mark.parametrize("method", INT8_METHODS)
def test_fake_quant_matches_int8_path(method):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    x = outlier_x(3, 10, 64)
    q = QuantizedLinear.from_float(lin, method=method, alpha=DEFAULT_ALPHA[method], col_max=x.abs().amax((0, 1)))
    y_int8 = q(x)
    y_fake = copy.deepcopy(q).set_mode("fake")(x)
    assert y_int8.shape == (3, 10, 32)
    assert torch.allclose(y_int8, y_fake, rtol=1e-4, atol=1e-4)


def test_dynamic_method_is_fake_only():
    lin = nn.Linear(8, 4)
    q = QuantizedLinear.from_float(lin, method="crossquant_dynamic", alpha=0.5)
    assert q.mode == "fake"
    with pytest.raises(ValueError, match="fake-quant"):
        q.set_mode("int8")
    x = outlier_x(5, 8, outliers=(1,))
    assert (q(x) - lin(x)).norm() / lin(x).norm() < 0.05


def test_pointwise_conv_layer():
    torch.manual_seed(0)
    for stride in (1, 2):
        conv = nn.Conv2d(16, 8, 1, stride=stride)
        x = torch.randn(2, 16, 7, 5)
        q = QuantizedLinear.from_float(conv, method="crossquant", alpha=0.5, col_max=x.abs().amax((0, 2, 3)))
        y, ref = q(x), conv(x)
        assert y.shape == ref.shape
        assert (y - ref).norm() / ref.norm() < 0.03
    with pytest.raises(TypeError, match="1x1"):
        QuantizedLinear.from_float(nn.Conv2d(4, 4, 3), method="per_token")


# ------------------------------------------------------------------------------------------------ quantize()
def test_quantize_hf_llama_default_skips_and_quality():
    m = tiny_llama()
    data = llama_batches()
    with torch.no_grad():
        ref = m(**data[0]).logits
    targets, skipped = find_quantizable(m)
    assert "lm_head" in skipped and not any("embed" in n or "lm_head" in n for n in targets)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down per layer
    results = {}
    for method in ("per_token", "smoothquant", "crossquant", "crossquant_dynamic"):
        qm = quantize(copy.deepcopy(m), method, calibration_data=data)
        layers = quantized_layers(qm)
        assert set(layers) == set(targets)
        assert isinstance(qm.lm_head, nn.Linear) and qm.lm_head.weight is qm.model.embed_tokens.weight
        with torch.no_grad():
            out = qm(**data[0]).logits
        results[method] = float((out - ref).norm() / ref.norm())
    assert all(v < 0.2 for v in results.values()), results
    assert qm.kd_quantization["method"] == "crossquant_dynamic"


def test_kernel_report_crossquant_below_per_token():
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", alpha=0.5, calibration_data=data)
    rep = quantization_kernel_report(qm, data[:1])
    s = rep.summary()
    assert s["layers"] == 14
    assert s["kernel"] < s["per_token_kernel"]
    assert rep.layers_not_above_per_token == 14
    assert "| **all** |" in rep.to_table() and len(rep.to_dict()["layers"]) == 14
    # per-token model: identical numbers for the method and the baseline
    pt = quantization_kernel_report(m, data[:1], method="per_token").summary()
    assert pt["kernel"] == pt["per_token_kernel"]
    assert not quantized_layers(m)  # float model untouched by method=


def test_kernel_report_excludes_padding():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    qm = quantize(copy.deepcopy(m), "per_token")
    rep = quantization_kernel_report(qm, [{"input_ids": ids, "attention_mask": mask}])
    q_proj = next(l for l in rep.layers if l.name.endswith("0.self_attn.q_proj"))
    assert q_proj.elements == 16 * 64


def test_timm_vit_and_cnn():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5).eval()
    imgs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    ref = vit(imgs[0])
    qv = quantize(copy.deepcopy(vit), "crossquant", calibration_data=imgs)
    names = set(quantized_layers(qv))
    assert "head" not in names and "blocks.0.attn.qkv" in names and "blocks.0.mlp.fc2" in names
    assert (qv(imgs[0]) - ref).norm() / ref.norm() < 0.1

    cnn = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5).eval()
    imgs = [torch.randn(8, 3, 32, 32) for _ in range(2)]  # squeeze-excite convs see one row per image
    qc = quantize(copy.deepcopy(cnn), "crossquant", calibration_data=imgs)
    layers = quantized_layers(qc)
    assert any(l.kind == "conv1x1" for l in layers.values())
    assert "classifier" not in layers
    with torch.no_grad():
        out, ref = qc(imgs[0]), cnn(imgs[0])
    assert out.shape == (8, 5) and (out - ref).norm() / ref.norm() < 0.2


def test_sweep_alpha_rows_and_alpha_one_equals_per_token():
    m = tiny_llama()
    data = llama_batches(n=2)
    sw = sweep_alpha(m, data, alphas=(0.25, 1.0))
    assert [r["alpha"] for r in sw.rows] == [0.25, 1.0]
    assert sw.loss_name == "relative output error"
    one = sw.rows[1]
    assert one["kernel"] == pytest.approx(one["per_token_kernel"])
    assert sw.rows[0]["kernel"] < sw.rows[0]["per_token_kernel"]
    assert "| alpha |" in sw.to_table() and sw.best_alpha in (0.25, 1.0)
    lm = sweep_alpha(m, [dict(b, labels=b["input_ids"]) for b in data], alphas=(0.5,), method="smoothquant")
    assert lm.loss_name == "model loss" and lm.reference_loss > 0
    assert not quantized_layers(m)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_and_leave_model_untouched():
    m, calib, x = mlp_and_data()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="matches no module"):
        quantize(m, "crossquant", calibration_data=calib, skip=["fc9"])
    with pytest.raises(TypeError, match="never quantizes"):
        quantize(m, "crossquant", calibration_data=calib, skip=["norm"])
    with pytest.raises(ValueError, match="empty"):
        quantize(m, "crossquant", calibration_data=[])
    with pytest.raises(ValueError, match="too short"):
        quantize(m, "crossquant", calibration_data=[torch.randn(1, 32)])
    with pytest.raises(ValueError, match="needs calibration_data"):
        quantize(m, "smoothquant")
    with pytest.raises(ValueError, match="method"):
        quantize(m, "awq", calibration_data=calib)
    with pytest.raises(ValueError, match="alpha"):
        quantize(m, "crossquant", alpha=1.5, calibration_data=calib)
    with pytest.raises(TypeError):
        quantize("not a model")
    with pytest.raises(TypeError, match="batch"):
        quantize(m, "crossquant", calibration_data=[1, 2, 3])
    assert not quantized_layers(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), "per_token")
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize(nn.Sequential(nn.Conv2d(3, 3, 3)), "per_token")
    q = quantize(m, "per_token", skip=["classifier"])
    with pytest.raises(ValueError, match="already"):
        quantize(q, "per_token")


def test_layer_never_reached_in_calibration():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(ValueError, match="never ran"):
        quantize(Two(), "crossquant", calibration_data=[torch.randn(32, 8)])
    q = quantize(Two(), "crossquant", calibration_data=[torch.randn(32, 8)], skip=["unused"])
    assert set(quantized_layers(q)) == {"a"}


def test_collect_stats_ignores_padding():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    st = collect_activation_stats(m, [{"input_ids": ids, "attention_mask": mask}], min_rows=4)
    assert st["model.layers.0.self_attn.q_proj"].rows == 13


# ------------------------------------------------------------------------------------------------ save / load
def _file_tensor_bytes(path, prefix_filter):
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            if prefix_filter(k):
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


def test_save_load_bit_identical_hf(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", calibration_data=data)
    out = save_quantized(qm, tmp_path / "ckpt")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model.safetensors", "quant_config.json"]
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["metadata"]["method"] == "crossquant" and cfg["aliases"] == {
        "lm_head.weight": "model.embed_tokens.weight"
    }
    loaded = load_quantized(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    for b in data:
        assert torch.equal(qm(**b).logits, loaded(**b).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # on-disk size of the quantized layers is ~1/4 of their fp32 weights
    names = set(cfg["metadata"]["layers"])
    q_bytes = _file_tensor_bytes(out / "model.safetensors", lambda k: k.rsplit(".", 1)[0] in names)
    fp_bytes = sum(
        (mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)) * 4
        for n, mod in m.named_modules()
        if n in names
    )
    assert 0.25 <= q_bytes / fp_bytes < 0.30
    # no temporary directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_load_timm_and_plain_module(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5).eval()
    imgs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    qv = quantize(vit, "smoothquant", calibration_data=imgs)
    save_quantized(qv, tmp_path / "vit", build_kwargs={"img_size": 32})
    lv = load_quantized(tmp_path / "vit")
    assert torch.equal(qv(imgs[1]), lv(imgs[1]))

    m, calib, x = mlp_and_data()
    q = quantize(copy.deepcopy(m), "crossquant", calibration_data=calib)
    save_quantized(q, tmp_path / "mlp")
    with pytest.raises(QuantizedCheckpointError, match="model="):
        load_quantized(tmp_path / "mlp")
    l2 = load_quantized(tmp_path / "mlp", model=copy.deepcopy(m))
    assert torch.equal(q(x), l2(x))


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    m, calib, x = mlp_and_data()
    q = quantize(copy.deepcopy(m), "per_token")
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        save_quantized(m, tmp_path / "x")
    # failure half-way: nothing left, not even a temp dir
    import safetensors.torch as st

    def boom(*a, **k):
        with open(a[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(q, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # existing non-empty dir: refused unless overwrite, old content replaced atomically
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_quantized(q, tmp_path / "ck")
    assert (tmp_path / "ck" / "old.txt").read_text() == "keep me"
    save_quantized(q, tmp_path / "ck", overwrite=True)
    assert not (tmp_path / "ck" / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(load_quantized(tmp_path / "ck", model=copy.deepcopy(m))(x), q(x))


def test_load_rejects_bad_checkpoints(tmp_path):
    m, calib, x = mlp_and_data()
    q = quantize(copy.deepcopy(m), "crossquant", calibration_data=calib)
    good = save_quantized(q, tmp_path / "good")
    with pytest.raises(QuantizedCheckpointError, match="quant_config.json"):
        load_quantized(tmp_path)  # directory without a quantization config
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing")

    import shutil

    # checksum mismatch: flip one byte of the tensor data (the file stays parseable)
    bad = tmp_path / "bad_sum"
    shutil.copytree(good, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(QuantizedCheckpointError, match="checksum"):
        load_quantized(bad, model=copy.deepcopy(m))

    # shape mismatch between config and file
    bad = tmp_path / "bad_shape"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "quant_config.json").read_text())
    cfg["tensors"]["fc1.weight_int8"]["shape"] = [48, 31]
    (bad / "quant_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizedCheckpointError, match="shape"):
        load_quantized(bad, model=copy.deepcopy(m))

    # architecture does not fit: the skeleton is left unchanged
    other = MLP(k=32, h=40)
    with pytest.raises(QuantizedCheckpointError):
        load_quantized(good, model=other)
    assert not quantized_layers(other)


# ------------------------------------------------------------------------------------------------ per-layer alpha
def test_calibrate_layer_alphas_picks_lowest_error_with_kernel_below_per_token():
    from kd_plugins.quant import calibrate_layer_alphas

    m = tiny_llama()
    data = llama_batches()
    grid = (0.2, 0.5, 0.8)
    search = calibrate_layer_alphas(m, data, grid=grid)
    assert set(search) == set(find_quantizable(m)[0])
    for r in search.values():
        assert r.alphas == list(grid) and len(r.errors) == len(r.kernels) == 3
        ok = [i for i, k in enumerate(r.kernels) if k < r.per_token_kernel]
        assert r.kernel_below_per_token == bool(ok)
        pool = ok or range(3)
        assert r.chosen == grid[min(pool, key=lambda i: r.errors[i])]
    # the search score is the error quantize() actually produces for that layer (same quantizer, same rows)
    name = "model.layers.0.mlp.gate_proj"
    r = search[name]
    stats = collect_activation_stats(m, data)
    rows = []
    h = m.get_submodule(name).register_forward_pre_hook(lambda mod, a: rows.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in data:
            m(**b)
    h.remove()
    x = torch.cat(rows)
    for i, a in enumerate(grid):
        q = QuantizedLinear.from_float(
            m.get_submodule(name), method="crossquant", alpha=a, col_max=stats[name].col_max, mode="fake"
        )
        with torch.no_grad():
            y, ref = q(x), x @ m.get_submodule(name).weight.T
        assert float((y - ref).pow(2).sum() / ref.pow(2).sum()) == pytest.approx(r.errors[i], rel=1e-3)


def test_quantize_alpha_auto_and_mapping_round_trip(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", alpha="auto", calibration_data=data, alpha_grid=(0.3, 0.6, 0.9))
    la = qm.kd_quantization["layer_alpha"]
    assert qm.kd_quantization["alpha"] == "auto" and set(la) == set(quantized_layers(qm))
    assert all(quantized_layers(qm)[n].alpha == a for n, a in la.items())
    rep = quantization_kernel_report(qm, data)
    assert rep.layers_below_per_token == len(rep.layers)  # the constraint holds on the calibration data itself
    # an explicit mapping reproduces the same model bit for bit
    qm2 = quantize(copy.deepcopy(m), "crossquant", alpha=la, calibration_data=data)
    assert qm2.kd_quantization["alpha"] == "per_layer"
    with torch.no_grad():
        assert torch.equal(qm(**data[0]).logits, qm2(**data[0]).logits)
    loaded = load_quantized(save_quantized(qm, tmp_path / "auto"))
    assert loaded.kd_quantization["layer_alpha"] == la
    with torch.no_grad():
        assert torch.equal(qm(**data[1]).logits, loaded(**data[1]).logits)


def test_alpha_auto_bad_inputs():
    m = tiny_llama()
    data = llama_batches()
    with pytest.raises(ValueError, match="applies to"):
        quantize(copy.deepcopy(m), "per_token", alpha="auto")
    with pytest.raises(ValueError, match="'auto'"):
        quantize(copy.deepcopy(m), "crossquant", alpha="best", calibration_data=data)
    with pytest.raises(ValueError, match="missing"):
        quantize(copy.deepcopy(m), "crossquant", alpha={"model.layers.0.mlp.up_proj": 0.5}, calibration_data=data)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        quantize(copy.deepcopy(m), "crossquant", alpha={n: 2.0 for n in find_quantizable(m)[0]}, calibration_data=data)


def test_cli_alpha_argument_accepts_auto():
    from kd_plugins.quant.cli import build_parser

    p = build_parser()
    assert p.parse_args(["a", "b", "--alpha", "auto"]).alpha == "auto"
    assert p.parse_args(["a", "b", "--alpha", "0.4"]).alpha == 0.4
    with pytest.raises(SystemExit):
        p.parse_args(["a", "b", "--alpha", "best"])


@pytest.mark.parametrize("method", INT8_METHODS)
def test_row_blocking_is_bit_identical(method, monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    x = outlier_x(165, 24, seed=3)
    q = QuantizedLinear.from_float(lin, method=method, alpha=DEFAULT_ALPHA[method], col_max=x.abs().amax(0))
    full = q(x)
    # 3 blocks, the last one ragged. Blocks are multiples of 64 rows so torch's vectorised exp2/log2 (row factor
    # t_i^alpha) sees the same vector / scalar-tail split as on the whole tensor, as with the default 1024.
    monkeypatch.setattr(QuantizedLinear, "ROW_BLOCK", 64)
    assert torch.equal(q(x), full)


def test_atomic_dir_keeps_old_content_on_failure_and_replaces_on_success(tmp_path):
    from kd_plugins._checkpoint import atomic_dir

    out = tmp_path / "ck"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # temp dir removed
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the swapped-out old dir removed
