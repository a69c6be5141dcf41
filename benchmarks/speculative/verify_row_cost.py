"""What a verification step costs on this CPU: the target's linear layers at 1, 2, 3, 5 and 8 rows.

Speculative decoding pays when verifying ``gamma + 1`` tokens in one target forward costs about as much as decoding
one token (a memory-bound matrix-vector product). This script times, for SmolLM2-135M-Instruct, the two kinds of
linear layer of a decode step at ``M`` rows (tokens): the tied LM head (49,152 x 576) and one MLP projection
(1,536 x 576), as ``F.linear`` under ``no_grad`` (fastest of ``--repeats`` loops), and prints the cost relative to one
row. Run it with the thread count of the speed measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, command_line, log, omp_prefix, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data.lm import load_smollm2  # noqa: E402


def ms_per_call(weight: torch.Tensor, rows: int, loops: int, repeats: int) -> float:
    x = torch.randn(rows, weight.shape[1])
    best = float("inf")
    with torch.no_grad():
        F.linear(x, weight)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                F.linear(x, weight)
            best = min(best, (time.perf_counter() - t0) / loops)
    return best * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,5,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(BENCHMARKS / "speculative" / "results" / "verify_row_cost.json"))
    args = p.parse_args(argv)
    set_threads_and_seed(args.threads, 0)
    target, _ = load_smollm2()
    weights = {
        "lm_head 49152x576": target.get_output_embeddings().weight.detach(),
        "mlp up_proj 1536x576": target.model.layers[0].mlp.up_proj.weight.detach(),
    }
    rows = [int(r) for r in args.rows.split(",")]
    table = {}
    for name, w in weights.items():
        loops = 10 if w.shape[0] > 10_000 else 200
        table[name] = {m: ms_per_call(w, m, loops, args.repeats) for m in rows}
        one = table[name][rows[0]]
        log(f"{name}: " + ", ".join(f"{m} rows {ms:.3f} ms ({ms / one:.2f}x)" for m, ms in table[name].items()))
    record = {"command": omp_prefix() + command_line(__file__, argv), "threads": torch.get_num_threads(), "ms": table}
    Path(args.out).write_text(json.dumps(record, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
