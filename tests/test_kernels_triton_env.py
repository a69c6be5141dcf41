"""kd_plugins.kernels._triton: the single reader of TRITON_INTERPRET follows Triton's own rule.

Triton turns its interpreter on when the value, lower-cased and not stripped, is one of 1/y/yes/on/true
(``triton._C.libtriton.getenv_bool``); kernel wrappers must agree with it, or they pick launch sizes for the wrong
mode. Anything that imports triton runs in a subprocess: triton fixes some of its state at import time and the other
test modules expect this process never to have imported it under the interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from kd_plugins.kernels import interpreter_enabled
from kd_plugins.kernels._triton import INTERPRET_ENV, TRUTHY_VALUES

ROOT = pathlib.Path(__file__).resolve().parents[1]
VALUES = [
    "1",
    "true",
    "TRUE",
    "True",
    "yes",
    "YES",
    "on",
    "On",
    "y",
    "Y",
    "0",
    "false",
    "False",
    "off",
    "no",
    "n",
    "",
    " 1",
    "1 ",
    "2",
    "enable",
    "t",
]
ON = {"1", "true", "TRUE", "True", "yes", "YES", "on", "On", "y", "Y"}


@pytest.mark.parametrize("value", VALUES)
def test_interpreter_rule(monkeypatch, value):
    monkeypatch.setenv(INTERPRET_ENV, value)
    assert interpreter_enabled() is (value in ON)


def test_interpreter_off_when_unset(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    assert interpreter_enabled() is False
    assert TRUTHY_VALUES == {"1", "y", "yes", "on", "true"}


def test_no_other_reader_of_the_variable():
    # Every kernel (and the rest of the package) asks kernels._triton instead of reading the environment itself.
    reader = re.compile(r"(os\.environ|getenv\()[^\n]*TRITON_INTERPRET")
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "kd_plugins").rglob("*.py")
        if reader.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    from kd_plugins.kernels import triton_available
    from kd_plugins.kernels._triton import interpreter_enabled
    os.environ.pop("TRITON_INTERPRET", None)
    out = {"lookup_imports_triton": (triton_available(), "triton" in sys.modules)}
    from triton._C.libtriton import getenv_bool
    rows = []
    for value in json.loads(sys.argv[1]):
        os.environ["TRITON_INTERPRET"] = value
        rows.append([value, bool(getenv_bool("TRITON_INTERPRET", False)), interpreter_enabled(),
                     triton_available("cpu")])
    out["rows"] = rows
    print("RESULT" + json.dumps(out))
    """
)


def test_matches_triton_and_device_check():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(VALUES)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    if "cannot import name 'getenv_bool'" in proc.stderr:
        pytest.skip("this triton version has no getenv_bool")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT") :])
    assert out["lookup_imports_triton"] == [True, False]  # triton_available() looks the package up only
    for value, triton_says, ours, cpu_ok in out["rows"]:
        assert ours == triton_says, value
        assert cpu_ok == ours, value  # with a device: CPU tensors only under the interpreter
