"""The benchmarks/ layout (benchmarks/README.md): one folder per capability, the shared harness, and no stale paths.

Cheap checks only; ``--help`` of every script (imports torch and kd_plugins in a fresh process) is marked slow.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# Folders that are packages (benchmarks/data: the shared data loaders) hold library code, not scripts.
PACKAGES = sorted(p.parent for p in BENCH.glob("*/__init__.py"))
SCRIPTS = sorted(p for p in BENCH.glob("*/*.py") if p.name != "quant_common.py" and p.parent not in PACKAGES)
SCRIPTS.append(BENCH / "gpu_check.py")  # the one top-level script: the prepared GPU check of every kernel
# Output folders of scripts (no RESULTS_*.md of their own).
OUTPUT_FOLDERS = {"results_gpu"}
# Files whose `benchmarks/...` mentions must point at files or folders that exist.
DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "Makefile",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(BENCH.rglob("*.md")),
    *sorted(BENCH.rglob("*.sh")),
]
SOURCES = [
    *sorted(BENCH.rglob("*.py")),
    *sorted((ROOT / "kd_plugins").rglob("*.py")),
    *sorted((ROOT / "examples").glob("*.py")),
    *sorted((ROOT / "tests").glob("*.py")),
]
PATH_RE = re.compile(r"benchmarks/[\w./-]+")


def _harness():
    sys.path.insert(0, str(BENCH))
    try:
        import _harness
    finally:
        sys.path.remove(str(BENCH))
    return _harness


def test_scripts_live_in_capability_folders():
    assert sorted(p.name for p in BENCH.glob("*.py")) == ["_harness.py", "gpu_check.py"]
    assert not (BENCH / "results").exists() and not (BENCH / "figures").exists()
    assert [p.name for p in PACKAGES] == ["data"]
    folders = [
        p
        for p in BENCH.iterdir()
        if p.is_dir() and not p.name.startswith((".", "_")) and p not in PACKAGES and p.name not in OUTPUT_FOLDERS
    ]
    for folder in folders:
        assert list(folder.glob("RESULTS_*.md")), f"{folder.name}/ has no RESULTS_*.md"
    assert len(SCRIPTS) >= 17


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(BENCH).as_posix())
def test_script_uses_the_harness(script):
    text = script.read_text()
    assert re.search(r"^(from _harness import|import _harness)", text, re.M), "import the shared harness"
    assert "parents[1]" not in text.replace("sys.path.insert(0, str(Path(__file__).resolve().parents[1]))", ""), (
        "ROOT comes from _harness (scripts are two levels below the repository root)"
    )


def _missing_paths(text: str) -> list[str]:
    missing = []
    for match in PATH_RE.findall(text):
        path = match.rstrip(".,:;")
        if any(c in path for c in "*<"):  # globs, placeholders
            continue
        if path.endswith("_"):  # a brace list such as results/x_{A,B}.json: its folder must exist
            path = path.rsplit("/", 1)[0]
        if not (ROOT / path).exists():
            missing.append(path)
    return sorted(set(missing))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_benchmark_paths_in_docs_exist(doc):
    missing = _missing_paths(doc.read_text())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_benchmark_paths_in_sources_exist():
    missing = {p.relative_to(ROOT).as_posix(): m for p in SOURCES if (m := _missing_paths(p.read_text()))}
    assert not missing, f"docstrings / comments name benchmark paths that do not exist: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(BENCH).as_posix())
def test_script_imports_from_kd_plugins_resolve(script):
    """The benchmarks are not run in CI: catch a moved or renamed kd_plugins / benchmarks.data name here (lazy imports
    included)."""
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("kd_plugins", "benchmarks.")):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name}")
    assert not missing, f"{script.name} imports names kd_plugins does not have: {missing}"


def test_command_line_is_relative_to_the_repository_root():
    h = _harness()
    script = BENCH / "quant" / "quant_speed.py"
    expected = "python benchmarks/quant/quant_speed.py --threads 1 'a b'"
    assert h.command_line(script, ["--threads", "1", "a b"]) == expected
    assert h.command_line(script, ["a b"], quote=False) == "python benchmarks/quant/quant_speed.py a b"
    assert h.command_line(script, []) == "python benchmarks/quant/quant_speed.py"


def test_replace_section_keeps_the_other_sections(tmp_path):
    h = _harness()
    path = tmp_path / "RESULTS.md"
    h.replace_section(path, "## A", "## A\n\nfirst\n", title="# T\n\n")
    h.replace_section(path, "## B", "## B\n\nsecond\n", title="# T\n\n")
    h.replace_section(path, "## A", "## A\n\nnew\n", title="# T\n\n")
    assert path.read_text() == "# T\n\n## A\n\nnew\n## B\n\nsecond\n"  # as the scripts always wrote it


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(BENCH).as_posix())
def test_script_help_runs_from_the_repository_root(script):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, script.relative_to(ROOT).as_posix(), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout
