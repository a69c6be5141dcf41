"""What a verification step costs on this CPU: the target's linear layers at 1, 2, 3, 5 and 8 rows.

Speculative decoding pays when verifying ``gamma + 1`` tokens in one target forward costs about as much as decoding
one token (a memory-bound matrix-vector product). This script times, for SmolLM2-135M-Instruct, the two kinds of
linear layer of a decode step at ``M`` rows (tokens): the tied LM head (49,152 x 576) and one MLP projection
(1,536 x 576), as ``F.linear`` under ``no_grad`` (fastest of ``--repeats`` loops), and prints the cost relative to one
row. Run it with the thread count of the speed measurement.

Each layer is timed twice: as ``nn.Linear`` (``F.linear``) and as :class:`kd_plugins.speculative.FewRowLinear`
(:func:`~kd_plugins.speculative.use_few_row_gemm`: ``torch.mm(W, x.T).T`` for 2 or more rows, and for one row of the
LM head through a duplicated row). The JSON's ``ms`` holds the first, ``ms_few_row_gemm`` the second.
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

from benchmarks.data.lm import load_smollm2  # noqa: E402
from kd_plugins.speculative import use_few_row_gemm  # noqa: E402


def linear_layer(weight: torch.Tensor, few_row_gemm: bool, head: bool) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if few_row_gemm:
        use_few_row_gemm(layer)
        layer.one_row_gemm = head  # as use_few_row_gemm sets it on a model's output embeddings
    return layer


def ms_per_call(layer: torch.nn.Module, rows: int, loops: int, repeats: int) -> float:
    x = torch.randn(rows, layer.in_features)
    best = float("inf")
    with torch.no_grad():
        layer(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                layer(x)
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
    tables = {"ms": {}, "ms_few_row_gemm": {}}
    for name, w in weights.items():
        loops = 10 if w.shape[0] > 10_000 else 200
        for key, few_row in (("ms", False), ("ms_few_row_gemm", True)):
            layer = linear_layer(w, few_row, head=name.startswith("lm_head"))
            table = tables[key][name] = {m: ms_per_call(layer, m, loops, args.repeats) for m in rows}
            one = table[rows[0]]
            log(
                f"{name} {'FewRowLinear' if few_row else 'nn.Linear'}: "
                + ", ".join(f"{m} rows {ms:.3f} ms ({ms / one:.2f}x)" for m, ms in table.items())
            )
    record = {"command": omp_prefix() + command_line(__file__, argv), "threads": torch.get_num_threads(), **tables}
    Path(args.out).write_text(json.dumps(record, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
