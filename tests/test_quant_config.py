"""QuantConfig (HfArgumentParser, validation), quantize()'s config / override precedence, re-entrant calibration."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kd_plugins.quant import (  # noqa: E402
    DEFAULT_ALPHA,
    DEFAULT_ALPHA_GRID,
    DEFAULT_METHOD,
    QuantConfig,
    collect_activation_stats,
    quantize,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_quant_core import mlp_and_data  # noqa: E402


def test_quant_config_parses_with_hf_argument_parser():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(QuantConfig)
    (cfg,) = parser.parse_args_into_dataclasses(
        [
            "--method",
            "smoothquant",
            "--alpha",
            "0.6",
            "--skip",
            "fc1,classifier",
            "--default_skip",
            "false",
            "--alpha_grid",
            "0.2,0.4",
            "--min_calibration_rows",
            "4",
        ]
    )
    assert cfg == QuantConfig(
        method="smoothquant",
        alpha=0.6,
        skip=["fc1", "classifier"],
        default_skip=False,
        alpha_grid=(0.2, 0.4),
        min_calibration_rows=4,
    )
    (cfg,) = parser.parse_args_into_dataclasses(["--alpha", "auto"])
    assert cfg.alpha == "auto" and cfg.method == DEFAULT_METHOD and cfg.alpha_grid == DEFAULT_ALPHA_GRID
    (cfg,) = parser.parse_args_into_dataclasses(["--alpha", "fc1=0.3,fc2=0.5"])
    assert cfg.alpha == {"fc1": 0.3, "fc2": 0.5}
    assert QuantConfig(alpha='{"fc1": 0.25}').alpha == {"fc1": 0.25}


def test_quant_config_validates():
    with pytest.raises(ValueError, match="method must be one of"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="applies to"):
        QuantConfig(method="per_token", alpha="auto")
    with pytest.raises(ValueError, match="'auto'"):
        QuantConfig(alpha="best")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        QuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="per_token has no alpha"):
        QuantConfig(method="per_token", alpha={"fc1": 0.3})
    with pytest.raises(ValueError, match="mode"):
        QuantConfig(mode="int4")
    with pytest.raises(ValueError, match="backend"):
        QuantConfig(backend="cuda")
    with pytest.raises(ValueError, match="alpha_grid"):
        QuantConfig(alpha_grid="0.2,2")
    assert QuantConfig(skip="classifier").skip == ["classifier"]
    # alpha=None stays None: the default follows the method, also after a replace
    assert QuantConfig(method="smoothquant").resolved_alpha == DEFAULT_ALPHA["smoothquant"]


def _same(a: nn.Module, b: nn.Module, x) -> bool:
    return torch.equal(a(x), b(x)) and a.kd_quantization == b.kd_quantization


def test_quantize_config_overrides_and_legacy_positional_forms_agree():
    m, calib, x = mlp_and_data()
    ref = quantize(copy.deepcopy(m), method="smoothquant", alpha=0.6, calibration_data=calib)
    assert ref.kd_quantization["method"] == "smoothquant" and ref.kd_quantization["alpha"] == 0.6
    cfg = QuantConfig(method="smoothquant", alpha=0.6)
    assert _same(ref, quantize(copy.deepcopy(m), cfg, calibration_data=calib), x)
    assert _same(ref, quantize(copy.deepcopy(m), "smoothquant", 0.6, calib), x)  # original positional signature
    # overrides win over the config, and the config object is not modified
    other = quantize(copy.deepcopy(m), QuantConfig(method="smoothquant", alpha=0.2), alpha=0.6, calibration_data=calib)
    assert _same(ref, other, x)
    assert cfg == QuantConfig(method="smoothquant", alpha=0.6)
    with pytest.raises(TypeError, match="did you mean 'alpha'"):
        quantize(copy.deepcopy(m), cfg, alpah=0.5, calibration_data=calib)
    with pytest.raises(TypeError, match="multiple values for 'alpha'"):
        quantize(copy.deepcopy(m), "smoothquant", 0.6, alpha=0.5, calibration_data=calib)
    with pytest.raises(TypeError, match="method twice"):
        quantize(copy.deepcopy(m), "smoothquant", method="per_token")


def test_cli_builds_a_quant_config():
    from kd_plugins.quant.cli import build_parser, quant_config_from_args

    args = build_parser().parse_args(
        ["a", "b", "--method", "smoothquant", "--alpha", "0.4", "--skip", "fc1", "--no-default-skip", "--quiet"]
    )
    assert quant_config_from_args(args) == QuantConfig(
        method="smoothquant", alpha=0.4, skip=["fc1"], default_skip=False, progress=False
    )


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, attention_mask=None):
        return self.fc(x)


class _CalibratesInside(nn.Module):
    """Runs a whole calibration of another model inside its own forward (nested calibration runs)."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()
        self.fc = nn.Linear(8, 8)
        self.inner_rows = None

    def forward(self, x, attention_mask=None):
        inner_batch = {"x": torch.randn(1, 6, 8), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
        self.inner_rows = collect_activation_stats(self.inner, [inner_batch], min_rows=1)["fc"].rows
        return self.fc(x)


def test_padding_mask_is_per_calibration_run():
    model = _CalibratesInside()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    stats = collect_activation_stats(
        model, [{"x": torch.randn(2, 5, 8), "attention_mask": mask}], min_rows=1, skip=["inner"]
    )
    assert model.inner_rows == 6
    assert stats["fc"].rows == int(mask.sum())  # the nested run did not clear the outer run's padding mask
