"""The API convention of docs/conventions.md, checked over the whole package."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
from transformers import HfArgumentParser

import kd_plugins
from kd_plugins._config import resolve_config

CONFIGS = [
    ("kd_plugins.distill", "DistillationConfig"),
    ("kd_plugins.acm", "ACMConfig"),
    ("kd_plugins.multiexit", "MultiExitConfig"),
    ("kd_plugins.quant", "QuantConfig"),
    ("kd_plugins.skillpack", "SkillPackConfig"),
    ("kd_plugins.moe", "MoEConfig"),
    ("kd_plugins.moe", "PreferenceDistillationConfig"),
    ("kd_plugins.speculative", "SpeculativeConfig"),
    ("kd_plugins.sparseft", "SparseFTConfig"),
    ("kd_plugins.crosstok", "TokenizerTransferConfig"),
    ("kd_plugins.distill.mst", "MSTConfig"),
    ("kd_plugins.distill.wad_config", "WADConfig"),
    ("kd_plugins.vision.prockd", "ProCKDConfig"),
    ("kd_plugins.distill.had_config", "HADConfig"),
]
#: One valid non-default value per config, for the precedence test.
OVERRIDE = {
    "DistillationConfig": ("temperature", 3.0),
    "ACMConfig": ("budget", 0.25),
    "MultiExitConfig": ("temperature", 2.0),
    "QuantConfig": ("min_calibration_rows", 32),
    "SkillPackConfig": ("group_size", 128),
    "MoEConfig": ("num_experts", 8),
    "PreferenceDistillationConfig": ("beta", 0.2),
    "SpeculativeConfig": ("num_draft_tokens", 6),
    "SparseFTConfig": ("density", 0.1),
    "TokenizerTransferConfig": ("steps", 7),
    "MSTConfig": ("balance_weight", 0.5),
    "WADConfig": ("wad_weight", 0.5),
    "ProCKDConfig": ("num_prototypes", 16),
    "HADConfig": ("group_size", 5),
}
CALLBACKS = [
    "DistillationCallback",
    "ACMCallback",
    "MultiExitCallback",
    "MoEBalanceCallback",
    "PreferenceDistillationCallback",
    "DraftEvalCallback",
    "HADCallback",
]


def _config(module: str, name: str):
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module,name", CONFIGS)
def test_every_config_parses_with_hf_argument_parser(module, name):
    cls = _config(module, name)
    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(args=[])
    assert parsed == cls()
    for f in dataclasses.fields(cls):
        if f.init:
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_configs_round_trip_command_line_values():
    (d,) = HfArgumentParser(_config("kd_plugins.distill", "DistillationConfig")).parse_args_into_dataclasses(
        args=["--loss_terms", "kl:0.7,hidden_mse:0.3", "--feature_pairs", "a=b", "--temperature", "2"]
    )
    assert d.loss_terms == {"kl": 0.7, "hidden_mse": 0.3} and d.feature_pairs == {"a": "b"} and d.temperature == 2
    (m,) = HfArgumentParser(_config("kd_plugins.multiexit", "MultiExitConfig")).parse_args_into_dataclasses(
        args=["--weights", "0.2,0.5,1.0", "--distill_kwargs", '{"normalize": true}']
    )
    assert m.weights == [0.2, 0.5, 1.0] and m.distill_kwargs == {"normalize": True}
    (m,) = HfArgumentParser(_config("kd_plugins.multiexit", "MultiExitConfig")).parse_args_into_dataclasses(
        args=["--weights", "uniform"]
    )
    assert m.weights == "uniform"


@pytest.mark.parametrize("module,name", CONFIGS)
def test_resolve_config_precedence(module, name):
    cls = _config(module, name)
    base = cls()
    assert resolve_config(cls, None, {}) == base
    field, value = OVERRIDE[name]
    changed = resolve_config(cls, base, {field: value})
    assert getattr(changed, field) == value  # the override wins
    assert getattr(base, field) != value  # the given config is not mutated
    with pytest.raises(TypeError, match="unknown"):
        resolve_config(cls, None, {field + "x": 1})
    with pytest.raises(TypeError, match=f"must be a {name}"):
        resolve_config(cls, object(), {})


@pytest.mark.parametrize("name", CALLBACKS)
def test_one_callback_signature(name):
    cls = getattr(kd_plugins, name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["teacher", "config"]
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD


def test_callbacks_reject_a_config_in_the_teacher_slot():
    from kd_plugins.acm import ACMConfig
    from kd_plugins.multiexit import MultiExitConfig

    with pytest.raises(TypeError, match="teacher comes first"):
        kd_plugins.ACMCallback(ACMConfig())
    with pytest.raises(TypeError, match="teacher comes first"):
        kd_plugins.MultiExitCallback(MultiExitConfig())


def test_callback_overrides_replace_config_fields():
    from kd_plugins.multiexit import MultiExitConfig

    cb = kd_plugins.MultiExitCallback(config=MultiExitConfig(temperature=2.0), task_weight=0.5)
    assert (cb.config.temperature, cb.config.task_weight) == (2.0, 0.5)


def _public_names() -> dict[str, list[tuple[str, object]]]:
    found: dict[str, list[tuple[str, object]]] = {}
    for info in pkgutil.walk_packages(kd_plugins.__path__, "kd_plugins."):
        if info.name.split(".")[-1].startswith("_") or not info.ispkg:
            continue
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if callable(obj):
                found.setdefault(name, []).append((info.name, obj))
    return found


def test_no_two_public_functions_share_a_name():
    clashes = {
        name: [m for m, _ in entries]
        for name, entries in _public_names().items()
        if len({id(o) for _, o in entries}) > 1
    }
    assert not clashes, f"same public name, different objects: {clashes}"


def test_top_level_reaches_every_capability():
    for name in (
        "quantize",
        "QuantConfig",
        "acmize",
        "add_exits",
        "truncate",
        "SkillPack",
        "SkillPackConfig",
        "DistillationCallback",
        "ACMCallback",
        "MultiExitCallback",
        "KDTask",
        "ACMTask",
        "MultiExitTask",
        "save_quantized",
        "load_quantized",
        "save_acm",
        "load_acm",
        "save_skillpack",
        "load_skillpack",
    ):
        assert getattr(kd_plugins, name) is not None, name


def test_overrides_apply_to_what_the_user_wrote():
    """An override of feature_loss / feature_weight re-derives the implicit feature term."""
    from kd_plugins.distill import DistillationConfig

    base = DistillationConfig(loss_terms="kl", feature_pairs="a=b")
    assert base.loss_terms == {"kl": 1.0, "hidden_mse": 1.0}
    changed = resolve_config(DistillationConfig, base, {"feature_loss": "cosine", "feature_weight": 0.5})
    assert changed.loss_terms == {"kl": 1.0, "hidden_cosine": 0.5}
    assert base.loss_terms == {"kl": 1.0, "hidden_mse": 1.0}


def test_loss_scaling_follows_the_trainer_rule():
    """Token sums divide by the accumulated batch's items (times the world size) when the task loss does, else by
    this micro-batch's count; mean-type terms divide by the accumulation steps only in the items case."""
    import torch

    from kd_plugins.distill import LossScaling

    s = torch.tensor(12.0)
    assert float(LossScaling().token_sum(s, 4)) == 3.0
    assert float(LossScaling().mean(s)) == 12.0
    by_items = LossScaling(by_items=True, num_items_in_batch=8, items_scale=2.0, grad_accum_steps=4)
    assert float(by_items.token_sum(s, 4)) == 3.0  # 12 / 8 * 2
    assert float(by_items.mean(s)) == 3.0  # 12 / 4
    assert by_items.unscale_task_loss(1.0) == 2.0  # 1 * 4 / 2
    no_count = LossScaling(by_items=True, num_items_in_batch=None, grad_accum_steps=4)
    assert float(no_count.token_sum(s, 4)) == 0.75  # per-batch mean, then / 4 like every mean-type term
