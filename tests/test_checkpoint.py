"""The shared checkpoint module (kd_plugins._checkpoint) and loading of checkpoints in the old (v1) manifest layouts."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_plugins import _checkpoint as ck  # noqa: E402
from kd_plugins._config import resolve_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

SPEC = ck.CheckpointSpec(
    kind="demo",
    manifest_name="demo.json",
    tensor_file="demo.safetensors",
    description="a demo checkpoint",
    legacy_format="kd_plugins.demo",
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.bias": torch.arange(5, dtype=torch.int8),
        "empty": torch.zeros(0),
    }


def test_write_read_round_trip_and_manifest_schema(tmp_path):
    tensors = _tensors()
    out = ck.write_checkpoint(
        SPEC,
        tmp_path / "c",
        tensors,
        aliases={"tied": "a.weight"},
        architecture={"kind": "torch", "class": "x.Y"},
        metadata={"note": [1, 2]},
    )
    manifest = json.loads((out / "demo.json").read_text())
    assert manifest["format"] == ck.SCHEMA_FORMAT and manifest["schema_version"] == ck.SCHEMA_VERSION
    assert manifest["kind"] == "demo" and manifest["kd_plugins_version"]
    sha = ck.tensor_sha256(tensors["b.bias"])
    assert manifest["tensors"]["b.bias"] == {"dtype": "int8", "shape": [5], "sha256": sha}
    assert manifest["metadata"] == {"note": [1, 2]}
    assert manifest["tensor_file_bytes"] == (out / "demo.safetensors").stat().st_size
    got = ck.read_checkpoint(SPEC, out)
    sd = got.state_dict()
    assert set(sd) == {"a.weight", "b.bias", "empty", "tied"} and sd["tied"] is sd["a.weight"]
    assert all(torch.equal(sd[k], tensors[k]) for k in tensors)
    assert got.architecture == {"kind": "torch", "class": "x.Y"} and got.metadata == {"note": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_reader_errors_are_clear(tmp_path):
    good = ck.write_checkpoint(SPEC, tmp_path / "good", _tensors(), architecture=None, metadata={})
    with pytest.raises(FileNotFoundError, match="not a demo checkpoint"):
        ck.read_checkpoint(SPEC, tmp_path / "nothing")
    with pytest.raises(ck.MissingCheckpointFileError, match="has no demo.json"):
        ck.read_checkpoint(SPEC, tmp_path)

    def variant(name, edit_manifest=None, edit_bytes=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_manifest:
            m = json.loads((d / "demo.json").read_text())
            edit_manifest(m)
            (d / "demo.json").write_text(json.dumps(m))
        if edit_bytes:
            raw = bytearray((d / "demo.safetensors").read_bytes())
            edit_bytes(raw)
            (d / "demo.safetensors").write_bytes(bytes(raw))
        return d

    def flip_last(raw):
        raw[-1] ^= 1

    corrupt = variant("corrupt", edit_bytes=flip_last)
    with pytest.raises(ck.CheckpointError, match=r"checksum mismatch .*'b.bias'"):
        ck.read_checkpoint(SPEC, corrupt)
    assert ck.read_checkpoint(SPEC, corrupt, verify=False)  # verify=False skips only the checksums
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.read_checkpoint(SPEC, variant("short", edit_bytes=lambda raw: raw.__delitem__(slice(-4, None))))
    with pytest.raises(ck.CheckpointError, match="'acm' checkpoint, not a demo checkpoint"):
        ck.read_checkpoint(SPEC, variant("kind", lambda m: m.update(kind="acm")))
    with pytest.raises(ck.CheckpointError, match="newer than this kd_plugins"):
        ck.read_checkpoint(SPEC, variant("newer", lambda m: m.update(schema_version=ck.SCHEMA_VERSION + 1)))
    with pytest.raises(ck.CheckpointError, match="format is 'something.else'"):
        ck.read_checkpoint(SPEC, variant("fmt", lambda m: m.update(format="something.else")))
    with pytest.raises(ck.CheckpointError, match="shape/dtype mismatch"):
        ck.read_checkpoint(SPEC, variant("shape", lambda m: m["tensors"]["a.weight"].update(shape=[3, 4])))
    with pytest.raises(ck.CheckpointError, match="missing tensors"):
        ck.read_checkpoint(SPEC, variant("names", lambda m: m["tensors"].update(ghost=m["tensors"]["empty"])))
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "demo.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.read_checkpoint(SPEC, tmp_path / "bad_json")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ck.write_checkpoint(SPEC, good, _tensors(), architecture=None, metadata={})


def test_skillpack_style_v1_manifest_still_reads(tmp_path):
    """A version-1 manifest that only has per-tensor checksums (``checksums`` / ``version`` / ``file_bytes``)."""
    from safetensors.torch import save_file

    tensors = _tensors()
    d = tmp_path / "old"
    d.mkdir()
    save_file(tensors, str(d / "demo.safetensors"))
    (d / "demo.json").write_text(
        json.dumps(
            {
                "format": "kd_plugins.demo",
                "version": 1,
                "id": "abc",
                "entries": [],
                "checksums": {k: ck.tensor_sha256(t) for k, t in tensors.items()},
                "file_bytes": (d / "demo.safetensors").stat().st_size,
            }
        )
    )
    got = ck.read_checkpoint(SPEC, d)
    assert got.manifest["schema_version"] == 1 and got.metadata == {"id": "abc", "entries": []}
    raw = json.loads((d / "demo.json").read_text())
    raw["version"] = 7
    (d / "demo.json").write_text(json.dumps(raw))
    with pytest.raises(ck.CheckpointError, match="newer"):
        ck.read_checkpoint(SPEC, d)


def test_architecture_record_and_rebuild():
    class Plain(nn.Module):
        pass

    assert ck.architecture_record(Plain()) == {"kind": "torch", "class": f"{__name__}.{Plain.__qualname__}"}
    with pytest.raises(ck.CheckpointError, match="model="):
        ck.rebuild_model(ck.architecture_record(Plain()))
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    rec = ck.architecture_record(vit, {"img_size": 32})
    assert rec == {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"num_classes": 5, "img_size": 32}}
    assert sum(p.numel() for p in ck.rebuild_model(rec).parameters()) == sum(p.numel() for p in vit.parameters())


# ------------------------------------------------------------------------------------------------ old quant / ACM
def _to_v1(manifest: dict, fmt: str, arch_kind_rename=None) -> dict:
    """The manifest as the code before kd_plugins._checkpoint wrote it: method fields at the top level."""
    old = {"format": fmt, "format_version": 1, "architecture": dict(manifest["architecture"])}
    if arch_kind_rename:
        old["architecture"]["kind"] = arch_kind_rename.get(old["architecture"]["kind"], old["architecture"]["kind"])
    old.update(manifest["metadata"])
    old.update(aliases=manifest["aliases"], tensors=manifest["tensors"])
    return old


def test_quant_checkpoint_in_the_old_format_still_loads(tmp_path):
    from test_quant_core import llama_batches, mlp_and_data, tiny_llama

    from kd_plugins.quant import QuantizedCheckpointError, load_quantized, quantize, save_quantized

    m = tiny_llama()
    data = llama_batches()
    qm = quantize(copy.deepcopy(m), "crossquant", calibration_data=data)
    out = save_quantized(qm, tmp_path / "q")
    cfg_path = out / "quant_config.json"
    cfg_path.write_text(json.dumps(_to_v1(json.loads(cfg_path.read_text()), "kd_plugins.quant")))
    loaded = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(qm(**data[1]).logits, loaded(**data[1]).logits)
    assert loaded.kd_quantization["method"] == "crossquant"

    mlp, calib, x = mlp_and_data()
    q = quantize(copy.deepcopy(mlp), "per_token")
    out = save_quantized(q, tmp_path / "mlp")
    cfg_path = out / "quant_config.json"
    old = _to_v1(json.loads(cfg_path.read_text()), "kd_plugins.quant")
    cfg_path.write_text(json.dumps(old))
    assert torch.equal(load_quantized(out, model=copy.deepcopy(mlp))(x), q(x))
    old["format_version"] = 2
    cfg_path.write_text(json.dumps(old))
    with pytest.raises(QuantizedCheckpointError, match="newer"):
        load_quantized(out, model=copy.deepcopy(mlp))


def test_acm_checkpoint_in_the_old_format_still_loads(tmp_path):
    from tiny import tiny_bert

    from kd_plugins.acm import acmize, load_acm, save_acm

    model = tiny_bert().eval()
    acmize(model, "mlp", 4)
    out = save_acm(model, tmp_path / "acm")
    cfg_path = out / "acm_config.json"
    cfg_path.write_text(json.dumps(_to_v1(json.loads(cfg_path.read_text()), "kd_plugins.acm")))
    loaded = load_acm(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # plain torch models were recorded as kind "other" by the old ACM writer: still asks for model=
    old = json.loads(cfg_path.read_text())
    old["architecture"] = {"kind": "other", "class": "Thing"}
    cfg_path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="model="):
        load_acm(out)
    assert load_acm(out, model=tiny_bert(seed=3)).state_dict().keys() == model.state_dict().keys()


# ------------------------------------------------------------------------------------------------ resolve_config
def test_resolve_config_precedence_and_unknown_keys():
    from kd_plugins.quant import QuantConfig

    base = QuantConfig(method="smoothquant", alpha=0.6)
    assert resolve_config(QuantConfig, None, {}) == QuantConfig()
    got = resolve_config(QuantConfig, base, {"alpha": 0.7})
    assert (got.method, got.alpha) == ("smoothquant", 0.7) and base.alpha == 0.6
    with pytest.raises(TypeError, match="'alpah' \\(did you mean 'alpha'"):
        resolve_config(QuantConfig, base, {"alpah": 0.7})
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        resolve_config(QuantConfig, {"method": "per_token"}, {})
