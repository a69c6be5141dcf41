"""README.md stays true: its Python blocks run, in order, on tiny random models, and the kd_plugins names it cites
exist.

Every ```python block runs in one namespace (a block may use what an earlier one defined), prepared with what the
README assumes the reader already has: ``teacher``, ``student``, ``args``, ``ds``, ``Trainer``, ``TrainingArguments``,
``HfArgumentParser``. A block that reads the command line gets the flags of its ``# --flag value`` comment line. A
fragment that cannot run gets ``<!-- readme-test: skip: <reason> -->`` on the line before its fence; keep those few.
"""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
from tiny import TokenDataset, tiny_llama, training_args
from transformers import HfArgumentParser, Trainer, TrainingArguments

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b(.*?)-->")
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
#: Log keys the README promises for a causal-LM student trained with a `kl` term and a task loss.
PROMISED_LOGS = {"kd_loss", "task_loss", "kd_kl", "agreement"}


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for every ```python block of ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((line, match.group(1), skip.group(1).strip(" :") if skip else None))
    return blocks


def command_line(code: str, output_dir: str) -> list[str]:
    """``sys.argv`` for a block: the flags of its ``# --...`` comment line, after an output directory."""
    flags = [line.strip()[1:] for line in code.splitlines() if line.strip().startswith("# --")]
    return ["train.py", "--output_dir", output_dir, *(a for f in flags for a in shlex.split(f))]


def test_readme_has_python_blocks_and_few_justified_exceptions():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    skipped = [(line, reason) for line, _, reason in blocks if reason is not None]
    assert len(skipped) <= 2, f"too many README blocks excluded from this test: {skipped}"
    assert all(reason for _, reason in skipped), "every <!-- readme-test: skip --> needs a reason"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    namespace = {
        "__name__": "readme",
        "teacher": tiny_llama(seed=1, layers=4),
        "student": tiny_llama(seed=2),
        "args": training_args(out, max_steps=2, logging_steps=1),
        "ds": TokenDataset(n=8),
        "Trainer": Trainer,
        "TrainingArguments": TrainingArguments,
        "HfArgumentParser": HfArgumentParser,
    }
    checked_logs = False
    for line, code, skip in python_blocks(README.read_text()):
        if skip is not None:
            continue
        monkeypatch.setattr(sys, "argv", command_line(code, out))
        trainer_before = namespace.get("trainer")
        exec(compile(code, f"{README.name}:{line}", "exec"), namespace)
        trainer = namespace.get("trainer")
        if trainer is not trainer_before and trainer is not None and trainer.state.log_history:
            logged = set().union(*map(set, trainer.state.log_history))
            assert PROMISED_LOGS <= logged, f"README.md:{line}: logs lack {PROMISED_LOGS - logged}"
            checked_logs = True
    assert checked_logs, "no README block trained a Trainer, so the promised logs were not checked"
    assert (Path(out) / "config.json").is_file()  # trainer.save_model(): a plain checkpoint


def _cited_names(text: str) -> set[str]:
    dotted = set(re.findall(r"\bkd_plugins(?:\.\w+)+", text))
    for module, names in re.findall(r"from (kd_plugins[\w.]*) import ((?:\w+,\s*)*\w+)", text):
        dotted |= {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
    return dotted


@pytest.mark.parametrize("name", sorted(_cited_names(README.read_text())))
def test_names_the_readme_cites_exist(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README cites {name}, but {obj.__name__} has no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"README cites {name}, which does not import")
