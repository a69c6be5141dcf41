"""``benchmarks/gpu_check.py --smoke``: the prepared GPU check runs end to end on CPU (tiny shapes, Triton interpreter
where triton is installed) and writes its JSON + markdown with every correctness check passing.

The GPU figures themselves come only from a device machine (BENCHMARKS.md, "GPU check"); this catches a broken script
before a rare GPU lease is spent on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_and_passes(tmp_path):
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    env.pop("OUT", None)
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--timeout-s", "120", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["failures"] == 0
    assert results["environment"]["smoke"] is True
    assert results["environment"]["command"].startswith("python benchmarks/gpu_check.py --smoke")
    sections = results["sections"]
    assert set(sections) == {
        "fused_kd_parity",
        "int8_gemm_parity",
        "fused_kd_timing",
        "int8_gemm_timing",
        "acm_grouped_parity",
        "acm_grouped_timing",
        "smollm2_distill",
    }
    parity = sections["fused_kd_parity"]
    assert {r["divergence"] for r in parity} == {"kl", "reverse_kl", "jsd", "tvd"}
    assert {r["dtype"] for r in parity} == {"float32", "bfloat16"}
    assert all(r["status"] == "ok" for r in parity)
    assert sections["smollm2_distill"]["status"].startswith("skipped")
    assert "| divergence |" in (tmp_path / "gpu_check.md").read_text()
