"""SkillPack API conventions: SkillPackConfig (HfArgumentParser, validation, precedence), save/load functions, the
version-1 file format, and the import graph of the package."""

from __future__ import annotations

import ast
import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama
from torch import nn

from kd_plugins.skillpack import (
    BudgetTooSmallError,
    IntegrityError,
    SkillPack,
    SkillPackConfig,
    SkillPackError,
    load_skillpack,
    model_fingerprint,
    save_skillpack,
)
from kd_plugins.skillpack.cli import skillpack_main
from kd_plugins.skillpack.config import DEFAULT_BUDGET

FIXTURES = Path(__file__).parent / "fixtures"
SKILLPACK_DIR = Path(__file__).parents[1] / "kd_plugins" / "skillpack"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    base = tiny_llama(hidden=32, layers=1)
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return base, ft


def _same_pack(a: SkillPack, b: SkillPack) -> bool:
    if list(a.entries) != list(b.entries):
        return False
    return all(
        e.meta() == b.entries[n].meta() and all(torch.equal(t, b.entries[n].tensors[r]) for r, t in e.tensors.items())
        for n, e in a.entries.items()
    )


# -------------------------------------------------------------------------------------------------------- config
def test_config_parses_with_hf_argument_parser():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(SkillPackConfig).parse_args_into_dataclasses(
        [
            "--budget",
            "5%",
            "--policy",
            "uniform",
            "--bits",
            "8,4",
            "--bit-split",
            "8:0.1,4:0.9",
            "--group-size",
            "32",
            "--no-progress",
        ]
    )
    assert cfg.budget == "5%" and cfg.policy == "uniform" and cfg.bits == (8, 4) and cfg.group_size == 32
    assert cfg.bit_split == ((8, 0.1), (4, 0.9)) and cfg.progress is False
    (default,) = HfArgumentParser(SkillPackConfig).parse_args_into_dataclasses([])
    assert default == SkillPackConfig()
    assert all(f.metadata.get("help") for f in SkillPackConfig.__dataclass_fields__.values())


def test_config_python_forms_and_idempotence():
    cfg = SkillPackConfig(energy=0.9, bits=8, bit_split={8: 0.5, 2: 0.5})
    assert cfg.bits == (8,) and cfg.bit_split == ((8, 0.5), (2, 0.5))
    assert SkillPackConfig(bit_split="[[8, 0.5], [2, 0.5]]").bit_split == cfg.bit_split
    import dataclasses

    assert dataclasses.replace(cfg) == cfg  # __post_init__ accepts its own parsed values


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="global"), "policy"),
        (dict(embeddings="dense"), "embeddings"),
        (dict(bits="8,3"), "bits"),
        (dict(bits="eight"), "bits"),
        (dict(bit_split="8-0.5"), "bit_split"),
        (dict(bit_split="3:1.0"), "bit_split"),
        (dict(group_size=30), "group_size"),
        (dict(sparse_density=0.0), "sparse_density"),
        (dict(exact_max_dim=-1), "exact_max_dim"),
        (dict(energy=1.5), "energy"),
        (dict(budget="lots"), "budget"),
        (dict(budget=1.5), "fraction"),
        (dict(budget="5%", energy=0.9), "only one of budget"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(SkillPackError, match=match):
        SkillPackConfig(**kwargs)


def test_extract_precedence_and_keyword_calls(pair, caplog):
    base, ft = pair
    by_keywords = SkillPack.extract(base, ft, budget="30%", bits=(8, 4), progress=False, name="k")
    cfg = SkillPackConfig(budget="5%", bits="8,4", progress=False, name="cfg")
    by_config = SkillPack.extract(base, ft, cfg, budget="30%", name="k")  # overrides replace the config's fields
    assert cfg.budget == "5%" and cfg.name == "cfg"  # the caller's config is not modified
    assert by_config.name == "k" and by_config.info == {**by_keywords.info, "extract_s": by_config.info["extract_s"]}
    assert _same_pack(by_config, by_keywords)
    with pytest.raises(TypeError, match="bits"):  # a typo names the close match
        SkillPack.extract(base, ft, budget="10%", bit=8)
    with pytest.raises(TypeError, match="SkillPackConfig"):
        SkillPack.extract(base, ft, {"budget": "10%"})
    assert DEFAULT_BUDGET == "5%"
    with pytest.raises(BudgetTooSmallError, match="smallest budget that works") as err:  # too small for this tiny pair
        SkillPack.extract(base, ft, budget="5%", progress=False)
    with caplog.at_level(logging.WARNING, logger="kd_plugins.skillpack"):
        default = SkillPack.extract(base, ft, progress=False)  # neither budget nor energy: 5%, raised to what works
    assert "default budget 5%" in caplog.text and default.info["budget_bytes"] == err.value.smallest_budget
    assert _same_pack(default, SkillPack.extract(base, ft, budget=err.value.smallest_budget, progress=False))
    assert SkillPack.extract(base, ft, energy=0.9, progress=False).info["budget_bytes"] is None
    with pytest.raises(SkillPackError, match="only one of budget"):
        SkillPack.extract(base, ft, budget="5%", energy=0.9)


def test_cli_builds_config(pair, tmp_path, capsys):
    base, ft = pair
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    assert (
        skillpack_main(
            [
                "extract",
                str(tmp_path / "base"),
                str(tmp_path / "ft"),
                str(tmp_path / "p"),
                "--energy",
                "0.9",
                "--bit-split",
                "8:0.5,4:0.5",
                "--name",
                "cli",
            ]
        )
        == 0
    )
    pack = load_skillpack(tmp_path / "p")
    assert pack.name == "cli" and pack.info["energy"] == 0.9
    assert {b for e in pack.entries.values() for b, _ in e.groups} <= {8, 4}
    assert (
        skillpack_main(
            [
                "extract",
                str(tmp_path / "base"),
                str(tmp_path / "ft"),
                str(tmp_path / "p2"),
                "--budget",
                "30%",
                "--bits",
                "8,3",
            ]
        )
        == 1
    )
    assert "bits must be widths" in capsys.readouterr().err and not (tmp_path / "p2").exists()


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_functions(pair, tmp_path):
    base, ft = pair
    pack = SkillPack.extract(base, ft, budget="30%", progress=False, name="fn")
    out = save_skillpack(pack, tmp_path / "a")
    pack.save(tmp_path / "b")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "skillpack" and manifest["metadata"]["base_fingerprint"] == pack.base_fingerprint
    a, b = load_skillpack(out), SkillPack.load(tmp_path / "b")
    assert isinstance(a, SkillPack) and a.id == pack.id and a.name == "fn" and a.info == pack.info
    assert _same_pack(a, pack) and _same_pack(b, pack)
    with pytest.raises(FileExistsError):
        save_skillpack(pack, out)


def _v1_models() -> tuple[nn.Module, nn.Module]:
    """The base and fine-tuned models of the version-1 fixture pack."""
    g = torch.Generator().manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24), nn.LayerNorm(24))
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return base, ft


def _v1_pack_dir(directory: Path) -> Path:
    """A copy of the version-1 pack in tests/fixtures (written by the pre-refactor SkillPack.save from
    :func:`_v1_models`), under the file names a pack directory has."""
    directory.mkdir()
    shutil.copy(FIXTURES / "skillpack_v1.safetensors", directory / "skillpack.safetensors")
    shutil.copy(FIXTURES / "skillpack_v1_manifest.json", directory / "manifest.json")
    return directory


def test_version1_pack_still_loads(tmp_path):
    v1 = _v1_pack_dir(tmp_path / "v1")
    assert json.loads((v1 / "manifest.json").read_text())["format"] == "kd_plugins.skillpack"
    pack = load_skillpack(v1)
    base, ft = _v1_models()
    assert pack.name == "v1-fixture" and pack.base_fingerprint == model_fingerprint(base)
    assert {e.kind for e in pack.entries.values()} == {"exact", "lowrank"}
    m = copy.deepcopy(base)
    pack.apply(m)  # the fingerprint check passes: the pack still fits its base
    for (n, a), b in zip(m.named_parameters(), ft.parameters()):
        assert torch.allclose(a, b, atol=2e-3), n
    exact = pack.entries["1.weight"]
    assert torch.equal(exact.delta(), ft[1].weight.detach() - base[1].weight.detach())
    # a re-save writes the current format; both load to the same pack
    resaved = load_skillpack(save_skillpack(pack, tmp_path / "resaved"))
    assert _same_pack(resaved, pack) and resaved.id == pack.id
    # version-1 integrity checks still apply
    bad = _v1_pack_dir(tmp_path / "bad")
    raw = bytearray((bad / "skillpack.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (bad / "skillpack.safetensors").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_skillpack(bad)


# ---------------------------------------------------------------------------------------------------- structure
def _imports(path: Path) -> set[str]:
    """Sibling modules of kd_plugins.skillpack imported by ``path`` anywhere in the file (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_no_import_cycles_inside_skillpack():
    graph = {
        p.stem: _imports(p) & {q.stem for q in SKILLPACK_DIR.glob("*.py")}
        for p in SKILLPACK_DIR.glob("*.py")
        if p.stem != "__init__"
    }
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node) :] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in graph:
        visit(node)
    assert "core" not in graph
