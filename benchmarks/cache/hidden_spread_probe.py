"""How much of an output row's gradient noise could a per-token balanced tail draw remove? A probe, no training.

A drawn tail token ``v`` adds ``tau * h_pos`` to row ``v``'s gradient (``h_pos``: the hidden state fed to the head at
the drawn position). Fixing each token's number of draws removes the noise along the mean state, a share
``|mean h|^2 / mean |h|^2`` of it; the spread of ``h`` across positions stays. This prints that share for the
teacher and the inherited student of ``teacher_cache_smollm2.py`` on Austen training windows. Figures:
``benchmarks/cache/RESULTS_cache.md`` (section "Where the sampled cache's gap sits: the output rows").

    python benchmarks/cache/hidden_spread_probe.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import set_threads_and_seed  # noqa: E402  (also puts the repository root on sys.path)

# isort: split
import torch  # noqa: E402

from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2  # noqa: E402


def mean_share(h: torch.Tensor) -> float:
    """``|mean h|^2 / mean |h|^2`` over the rows of ``h`` ``[n, d]``."""
    h = h.double()
    return float(h.mean(0).pow(2).sum() / h.pow(2).sum(-1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads_and_seed(args.threads, 0)
    import kd_plugins

    teacher, tok = load_smollm2()
    teacher.eval()
    text = "\n\n".join(t for _, t in sorted(jane_austen_texts().items()))[:400_000]
    windows = lm_windows(tok, text, args.seq_len, args.windows)
    student = kd_plugins.inherit_student(teacher, num_layers=args.num_layers, strategy="uniform").eval()
    with torch.no_grad():
        for name, model in (("teacher", teacher), (f"student ({args.num_layers} layers)", student)):
            h = model(windows, output_hidden_states=True).hidden_states[-1]  # after the final norm: the head's input
            print(f"{name}: |mean h|^2 / mean |h|^2 = {mean_share(h.reshape(-1, h.shape[-1])):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
