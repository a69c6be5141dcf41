"""Setup shared by the benchmark scripts under ``benchmarks/<capability>/``.

A script reaches this module with two lines placed before its first ``torch`` / ``transformers`` / ``kd_plugins``
import (the environment variables below must be set before those libraries read them)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
    from _harness import ROOT, ...  # noqa: E402

    # isort: split
    import torch  # noqa: E402

(``# isort: split`` stops ruff's import sorting from moving those libraries above the harness). Importing it:

* sets ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``TOKENIZERS_PARALLELISM=false`` unless already set (every
  model and data set comes from a local registry package; nothing is downloaded);
* puts the repository root on ``sys.path`` so that ``kd_plugins`` imports from this checkout even when it is not
  installed.

The helpers below are the pieces the scripts used to copy between each other: the reproducible command line written
into the RESULTS files, the two progress loggers, thread count + seed, and the replacement of one ``## `` section of a
RESULTS file that several scripts share.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def use_benchmark(capability: str) -> Path:
    """Make the scripts of ``benchmarks/<capability>/`` importable (e.g. the ACM ViT benchmark reuses the timm one's
    data loader and teacher); returns that folder."""
    folder = BENCHMARKS / capability
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder


def script_path(script: str | os.PathLike | None = None) -> str:
    """The script's path relative to the repository root (``benchmarks/quant/quant_speed.py``); default: the running
    script (``sys.argv[0]``)."""
    path = Path(script if script is not None else sys.argv[0]).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # a copy outside the checkout: keep its absolute path
        return path.as_posix()


def command_line(
    script: str | os.PathLike | None = None, argv: Sequence[str] | None = None, *, quote: bool = True
) -> str:
    """``python benchmarks/<capability>/<script>.py ARGS`` as run from the repository root, for the RESULTS files.

    ``argv`` defaults to ``sys.argv[1:]``; ``quote=False`` joins the arguments unquoted (the older scripts' format).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    joined = "".join(f" {shlex.quote(a) if quote else a}" for a in args)
    return f"python {script_path(script)}{joined}"


def omp_prefix() -> str:
    """``"OMP_NUM_THREADS=n "`` when that variable is set, else ``""``: the command prefix the RESULTS files show."""
    return f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""


def log(msg: str) -> None:
    """Print ``[HH:MM:SS] msg`` (wall clock) and flush."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def elapsed_logger(t0: float | None = None) -> Callable[..., None]:
    """A ``print``-like function that prefixes ``[   12s]``, the seconds since ``t0`` (default: now)."""
    start = time.time() if t0 is None else t0

    def log_elapsed(*parts) -> None:
        print(f"[{time.time() - start:6.0f}s]", *parts, flush=True)

    return log_elapsed


def set_threads_and_seed(threads: int | None, seed: int | None = None) -> None:
    """``torch.set_num_threads(threads)`` (skipped when None) then ``torch.manual_seed(seed)`` (skipped when None).

    Only torch's global generator is seeded: the scripts seed ``random`` / numpy themselves where they use them, so
    their results stay what they reported.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)


def seed_table(results: dict[str, list[float]], metric: str = "test accuracy") -> list[str]:
    """Markdown rows ``| arm | metric (mean ± std) | per seed |`` of ``{arm: [value per seed]}``."""
    import statistics

    lines = [f"| arm | {metric} (mean ± std) | per seed |", "|---|---|---|"]
    for arm, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {arm} | {statistics.mean(values):.4f} ± {std:.4f} | {per_seed} |")
    return lines


def replace_section(path: Path, marker: str, section: str, title: str) -> None:
    """Write ``section`` into the markdown file ``path`` in place of the ``## `` section that starts with ``marker``
    (appended when absent; a missing file starts with ``title``). Other sections are kept as they are."""
    text = path.read_text() if path.is_file() else title
    if marker in text:
        start = text.index(marker)
        nxt = text.find("\n## ", start + 5)
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}")
