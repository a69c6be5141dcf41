"""save_quantized checkpoints load bit-identically with plain ``AutoModel*.from_pretrained`` (quant.hf_quantizer)."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kd_plugins  # noqa: E402,F401  (registers the quantizer)
from kd_plugins.quant import (  # noqa: E402
    QuantizedCheckpointError,
    QuantizedLinear,
    load_quantized,
    quantize,
    quantized_layers,
    save_quantized,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

hfq = pytest.importorskip("kd_plugins.quant.hf_quantizer")

sys.path.insert(0, str(Path(__file__).parent))
from test_quant_core import llama_batches, tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    m = BertModel(cfg).eval()
    with torch.no_grad():  # outlier channels
        for layer in m.encoder.layer:
            layer.attention.output.LayerNorm.weight[[3, 7]] = 20.0
    return m


def bert_batches(n=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):  # 4 x 4 [CLS] rows: enough calibration rows for the pooler
        mask = torch.ones(4, seq, dtype=torch.long)
        mask[1, seq - 3 :] = 0
        out.append({"input_ids": torch.randint(0, 100, (4, seq), generator=g), "attention_mask": mask})
    return out


def _logits_equal(a, b, data):
    with torch.no_grad():
        return all(torch.equal(a(**x).logits, b(**x).logits) for x in data)


def _bert_equal(a, b, data):
    with torch.no_grad():
        for x in data:
            oa, ob = a(**x), b(**x)
            if not (
                torch.equal(oa.last_hidden_state, ob.last_hidden_state)
                and torch.equal(oa.pooler_output, ob.pooler_output)
            ):
                return False
    return True


def _check_quantized_like(loaded, ref):
    ql, qr = quantized_layers(loaded), quantized_layers(ref)
    assert sorted(ql) == sorted(qr)
    for name, q in ql.items():
        r = qr[name]
        assert isinstance(q, QuantizedLinear)
        assert q.weight_int8.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
        assert (q.method, q.alpha, q.mode, q.kind) == (r.method, r.alpha, r.mode, r.kind)
        assert torch.equal(q.weight_int8, r.weight_int8) and torch.equal(q.weight_scale, r.weight_scale)
    assert not any(isinstance(m, torch.nn.Linear) and n in qr for n, m in loaded.named_modules())


def test_registered_on_import():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["kd_plugins_w8a8"] is hfq.KDQuantConfig
    assert AUTO_QUANTIZER_MAPPING["kd_plugins_w8a8"] is hfq.KDQuantHfQuantizer
    assert hfq.register() is True and hfq.register() is True  # idempotent
    assert hfq.KDQuantHfQuantizer.requires_calibration
    with pytest.raises(ValueError, match="pre-quantized"):
        hfq.KDQuantHfQuantizer(
            hfq.KDQuantConfig(
                method="per_token",
                layers={
                    "a": {"kind": "linear", "in_features": 2, "out_features": 2, "bias": False, "method": "per_token"}
                },
            ),
            pre_quantized=False,
        )


@pytest.mark.parametrize("method", ["crossquant", "per_token"])
def test_llama_from_pretrained_bit_identical(tmp_path, method):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), method, calibration_data=data if method == "crossquant" else None)
    out = save_quantized(qm, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "quant_config.json"]
    assert not hasattr(qm.config, "quantization_config")  # save_quantized does not touch the model's config
    hf_cfg = json.loads((out / "config.json").read_text())
    qc = hf_cfg["quantization_config"]
    assert qc["quant_method"] == "kd_plugins_w8a8" and qc["method"] == method
    assert qc["layers"] == json.loads((out / "quant_config.json").read_text())["metadata"]["layers"]

    hm = AutoModelForCausalLM.from_pretrained(out)
    lm = load_quantized(out)
    assert type(hm).__name__ == "LlamaForCausalLM" and not hm.training
    _check_quantized_like(hm, qm)
    assert isinstance(hm.config.quantization_config, hfq.KDQuantConfig)
    assert hm.kd_quantization["method"] == method and hm.kd_quantization["layers"] == qm.kd_quantization["layers"]
    assert _logits_equal(hm, qm, data) and _logits_equal(hm, lm, data)
    assert hm.lm_head.weight is hm.model.embed_tokens.weight  # tied lm_head still tied (float, skipped by default)
    # AutoModel on the causal-LM checkpoint: the base model, names mapped through base_model_prefix
    base = AutoModel.from_pretrained(out)
    assert type(base).__name__ == "LlamaModel"
    assert isinstance(base.layers[0].self_attn.q_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(base(**data[0]).last_hidden_state, qm.model(**data[0]).last_hidden_state)


@pytest.mark.parametrize("method", ["crossquant", "per_token"])
def test_bert_automodel_bit_identical(tmp_path, method):
    m = tiny_bert()
    data = bert_batches()
    qm = quantize(copy.deepcopy(m), method, calibration_data=data if method == "crossquant" else None)
    assert any(q.bias is not None for q in quantized_layers(qm).values())
    out = save_quantized(qm, tmp_path / "bert")
    hm = AutoModel.from_pretrained(out)
    assert type(hm).__name__ == "BertModel"
    _check_quantized_like(hm, qm)
    assert _bert_equal(hm, qm, data) and _bert_equal(hm, load_quantized(out), data)
    # a class with a new head: names mapped under base_model_prefix ("bert."), the new head is a float nn.Linear
    from transformers import AutoModelForSequenceClassification

    sc = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert sorted(quantized_layers(sc)) == sorted(f"bert.{n}" for n in quantized_layers(qm))
    assert type(sc.classifier) is torch.nn.Linear
    assert _bert_equal(sc.bert, qm, data)


def test_per_layer_alpha_round_trips(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    names = sorted(quantized_layers(quantize(copy.deepcopy(m), "per_token")))
    alphas = {n: round(0.1 + 0.05 * i, 2) for i, n in enumerate(names)}
    qm = quantize(copy.deepcopy(m), "crossquant", alpha=alphas, calibration_data=data)
    out = save_quantized(qm, tmp_path / "pl")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["layer_alpha"] == alphas and {n: e["alpha"] for n, e in qc["layers"].items()} == alphas
    hm = AutoModelForCausalLM.from_pretrained(out)
    assert {n: q.alpha for n, q in quantized_layers(hm).items()} == alphas
    assert hm.kd_quantization["layer_alpha"] == alphas
    assert _logits_equal(hm, qm, data) and _logits_equal(hm, load_quantized(out), data)


def test_bf16_both_ways_of_making_the_model(tmp_path):
    """`.to(bf16)` rounds RoPE's non-persistent inv_freq, `from_pretrained(dtype=bf16)` keeps it float32: both
    loaders must reproduce whichever the saved model had (recorded as buffer_dtypes)."""
    m = tiny_llama()
    data = llama_batches()
    m.save_pretrained(tmp_path / "float")
    made = {
        "to": copy.deepcopy(m).to(torch.bfloat16),
        "from_pretrained": AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16),
    }
    for how, fm in made.items():
        qm = quantize(fm, "crossquant", calibration_data=data)
        out = save_quantized(qm, tmp_path / how)
        hm = AutoModelForCausalLM.from_pretrained(out)
        assert hm.model.norm.weight.dtype == torch.bfloat16
        assert hm.model.rotary_emb.inv_freq.dtype == qm.model.rotary_emb.inv_freq.dtype
        assert _logits_equal(hm, qm, data), how
        assert _logits_equal(load_quantized(out), qm, data), how


def test_quantized_tied_lm_head(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "per_token", default_skip=False)
    assert isinstance(qm.lm_head, QuantizedLinear)
    out = save_quantized(qm, tmp_path / "head")
    hm = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hm.lm_head, QuantizedLinear) and not hasattr(hm.lm_head, "weight")
    assert _logits_equal(hm, qm, data)


def test_checksums_verified_and_bad_checkpoints_refused(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "smoothquant", calibration_data=data)
    good = save_quantized(qm, tmp_path / "good")
    tensors = load_file(str(good / "model.safetensors"))

    def variant(name, edit):
        d = tmp_path / name
        save_quantized(qm, d)
        t = {k: v.clone() for k, v in tensors.items()}
        edit(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    flipped = variant("flip", lambda t: t["model.layers.0.mlp.up_proj.weight_int8"].view(-1)[0].add_(1))
    with pytest.raises(QuantizedCheckpointError, match="up_proj.weight_int8: checksum"):
        AutoModelForCausalLM.from_pretrained(flipped)
    norm = variant("norm", lambda t: t["model.norm.weight"].view(-1)[0].add_(1.0))
    with pytest.raises(QuantizedCheckpointError, match="model.norm.weight: checksum"):
        AutoModelForCausalLM.from_pretrained(norm)
    missing = variant("missing", lambda t: t.pop("model.layers.1.self_attn.q_proj.act_inv_col"))
    with pytest.raises(QuantizedCheckpointError, match="act_inv_col"):
        AutoModelForCausalLM.from_pretrained(missing)
    # the two descriptions of the layers must agree
    edited = tmp_path / "edited"
    save_quantized(qm, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["alpha"] = 0.9
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizedCheckpointError, match="different quantized layers"):
        AutoModelForCausalLM.from_pretrained(edited)
    # a module that does not match the saved shape
    wrong = tmp_path / "wrong"
    save_quantized(qm, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    for d in (cfg["quantization_config"]["layers"],):
        d["model.layers.0.mlp.up_proj"]["in_features"] = 65
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "quant_config.json").unlink()
    with pytest.raises(QuantizedCheckpointError, match="does not match the saved linear"):
        AutoModelForCausalLM.from_pretrained(wrong)
    # without quant_config.json: loads (bit-identical here) but warns that nothing was verified
    bare = tmp_path / "bare"
    save_quantized(qm, bare)
    (bare / "quant_config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="kd_plugins.quant"):
        hm = AutoModelForCausalLM.from_pretrained(bare)
    assert "NOT checked" in caplog.text
    assert _logits_equal(hm, qm, data)


def test_dtype_override_warns_and_keeps_quantized_buffers(tmp_path, caplog):
    m = tiny_llama()
    qm = quantize(copy.deepcopy(m), "per_token")
    out = save_quantized(qm, tmp_path / "ck")
    with caplog.at_level(logging.WARNING, logger="kd_plugins.quant"):
        hm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert "not be bit-identical" in caplog.text
    assert hm.model.norm.weight.dtype == torch.bfloat16
    q = hm.model.layers[0].mlp.up_proj
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="disk"):
        AutoModelForCausalLM.from_pretrained(out, device_map={"": "disk"})


def test_save_pretrained_and_resave(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", calibration_data=data)
    hm = AutoModelForCausalLM.from_pretrained(save_quantized(qm, tmp_path / "a"))
    # save_quantized of a from_pretrained-loaded model: same tensors, both loaders still bit-identical
    again = save_quantized(hm, tmp_path / "b")
    ta = json.loads((tmp_path / "a" / "quant_config.json").read_text())
    tb = json.loads((again / "quant_config.json").read_text())
    assert ta["tensors"] == tb["tensors"] and ta["metadata"]["layers"] == tb["metadata"]["layers"]
    assert _logits_equal(load_quantized(again), qm, data)
    # model.save_pretrained (is_serializable): loads back, without checksum verification (no quant_config.json)
    hm.save_pretrained(tmp_path / "sp")
    assert _logits_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "sp"), qm, data)


def test_load_quantized_old_checkpoint_without_new_keys(tmp_path):
    """Checkpoints written before config.json carried quantization_config / buffer_dtypes / the load guard, and
    before the manifest recorded quant_format_version, still load as before."""
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "per_token")
    out = save_quantized(qm, tmp_path / "old")
    cfg = json.loads((out / "quant_config.json").read_text())
    del cfg["metadata"]["buffer_dtypes"], cfg["metadata"]["quant_format_version"]
    (out / "quant_config.json").write_text(json.dumps(cfg))
    hf = json.loads((out / "config.json").read_text())
    del hf["transformers_weights"]
    (out / "config.json").write_text(json.dumps(hf))
    assert _logits_equal(AutoModelForCausalLM.from_pretrained(out), qm, data)  # no guard to drop: loads as before
    del hf["quantization_config"]
    (out / "config.json").write_text(json.dumps(hf))
    assert _logits_equal(load_quantized(out), qm, data)


def test_checkpoint_of_a_newer_kd_plugins_is_refused(tmp_path):
    """A newer quantized-layer format or an unknown method: refused by both loaders with a message to upgrade."""
    qm = quantize(tiny_llama(), "per_token")
    for name, edit in (
        ("format", lambda meta: meta.update(quant_format_version=2)),
        ("method", lambda meta: meta["layers"]["model.layers.0.mlp.up_proj"].update(method="crossquant_v2")),
    ):
        out = save_quantized(qm, tmp_path / name)
        manifest = json.loads((out / "quant_config.json").read_text())
        edit(manifest["metadata"])
        (out / "quant_config.json").write_text(json.dumps(manifest))
        with pytest.raises(QuantizedCheckpointError, match="upgrade kd_plugins"):
            load_quantized(out)
        with pytest.raises(QuantizedCheckpointError, match="upgrade kd_plugins"):
            AutoModelForCausalLM.from_pretrained(out)
    hf = json.loads((out / "config.json").read_text())  # config.json's own description, without quant_config.json
    hf["quantization_config"]["format_version"] = 2
    (out / "config.json").write_text(json.dumps(hf))
    (out / "quant_config.json").unlink()
    with pytest.raises(QuantizedCheckpointError, match="format 2.*upgrade kd_plugins"):
        AutoModelForCausalLM.from_pretrained(out)


_PLAIN_TRANSFORMERS = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        try:
            cls.from_pretrained(sys.argv[1])
        except ValueError as e:
            print(cls.__name__, "refused:", e)
        else:
            print(cls.__name__, "LOADED")
    assert "kd_plugins" not in sys.modules
""")


def test_plain_transformers_refuses_a_quantized_checkpoint(tmp_path):
    """Without ``import kd_plugins``, from_pretrained raises (instead of initialising the quantized layers at random)
    and the error says what to do."""
    out = save_quantized(quantize(tiny_llama(), "per_token"), tmp_path / "ck")
    r = subprocess.run(
        [sys.executable, "-c", _PLAIN_TRANSFORMERS, str(out)],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("refused:" in line for line in lines), r.stdout
    assert all("import kd_plugins" in line and "load_quantized" in line for line in lines), r.stdout


_SUBPROCESS = textwrap.dedent("""
    import sys, torch
    PRELUDE
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    from kd_plugins.quant import QuantizedLinear
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantizedLinear)
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        assert torch.equal(m(input_ids=x["ids"]).logits, x["logits"])
    print("OK")
""")
_PRELUDES = (
    # the post-import hook: kd_plugins must not import transformers itself, from_pretrained must still work
    'import kd_plugins; assert "transformers" not in sys.modules, "import kd_plugins imported transformers"',
    # transformers' quantizer registry already loaded: registration on import
    "import transformers.modeling_utils; import kd_plugins",
)


def test_from_pretrained_after_plain_import_kd_plugins(tmp_path):
    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", calibration_data=data)
    out = save_quantized(qm, tmp_path / "ck")
    with torch.no_grad():
        torch.save({"ids": data[0]["input_ids"], "logits": qm(**data[0]).logits}, tmp_path / "ref.pt")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    for prelude in _PRELUDES:
        script = _SUBPROCESS.replace("PRELUDE", prelude)
        r = subprocess.run(
            [sys.executable, "-c", script, str(out), str(tmp_path / "ref.pt")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (prelude, r.stderr[-3000:])
