"""The package's layers, enforced over the import graph (every import, lazy ones inside functions included).

bottom   losses, kernels, private helpers (kd_plugins/_*.py)
middle   framework-agnostic method packages: distill, quant, acm, multiexit, skillpack, vision, ranking
top      integrations.hf, integrations.timm: the only adapters to a training framework
cli      kd_plugins/cli.py

No module imports from a higher layer. The package root (kd_plugins/__init__.py) is the public facade and may re-export
from any layer. Inside the middle layer packages may use each other, but without file-level cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kd_plugins"
MIDDLE = (
    "distill",
    "quant",
    "acm",
    "multiexit",
    "skillpack",
    "vision",
    "ranking",
    "crosstok",
    "speculative",
    "moe",
    "sparseft",
)
FRAMEWORK_BASES = ("TrainerCallback", "Trainer", "TrainingTask")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 99  # the package root: facade
    head = parts[1]
    if head in ("losses", "kernels") or head.startswith("_"):
        return 0
    if head in MIDDLE:
        return 1
    if head == "integrations":
        return 2
    if head == "cli":
        return 3
    raise AssertionError(f"{module} is in no layer: add it to tests/test_architecture.py")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported kd_plugins module, line, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from pkg.mod import Name`` imports pkg.mod
            names = [existing(f"{target}.{a.name}") or existing(target) or target for a in node.names]
        elif isinstance(node, ast.Import):
            names = [existing(a.name) or a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "kd_plugins":
                found.append((name, node.lineno, id(node) in top_level))
    return found


def existing(name: str) -> str | None:
    """The module a dotted import name refers to (``pkg.mod.Name`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts:
        p = ROOT.parent.joinpath(*parts)
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return None


def is_package(module: str) -> bool:
    return (ROOT.parent.joinpath(*module.split(".")) / "__init__.py").exists()


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in FILES:
        layer(module_name(path))


def test_no_import_goes_upward():
    bad = []
    for path in FILES:
        me = module_name(path)
        for name, line, _ in imports(path):
            target = existing(name)
            if target is not None and layer(target) > layer(me):
                bad.append(
                    f"{path.relative_to(ROOT.parent)}:{line} imports {target} (layer {layer(target)} > {layer(me)})"
                )
    assert not bad, "upward imports:\n" + "\n".join(sorted(set(bad)))


def test_no_file_level_import_cycles():
    """Imports between plain files (lazy ones included; package ``__init__`` re-exports aside) form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in FILES:
        me = module_name(path)
        if is_package(me):
            continue
        graph[me] = {t for n, _, _ in imports(path) if (t := existing(n)) and t != me and not is_package(t)}
    cycles, done = set(), set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.add(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, "file-level import cycles:\n" + "\n".join(sorted(cycles))


def test_the_package_imports_nothing_from_the_repository():
    """Benchmark data loaders (``benchmarks.data``) and test helpers are not installed with kd_plugins."""
    bad = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            bad += [f"{where} imports {n}" for n in names if n.split(".")[0] in ("benchmarks", "tests", "examples")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", MIDDLE)
def test_method_packages_define_no_framework_adapters(package):
    """Trainer callbacks, Trainer subclasses and timm tasks live in kd_plugins.integrations only."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & set(FRAMEWORK_BASES), f"{path}: class {node.name} is a framework adapter"
