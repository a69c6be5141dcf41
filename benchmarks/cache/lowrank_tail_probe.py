"""Could a cache store the teacher's *hidden state* instead of sampled tail tokens? A reconstruction probe.

SmolLM2-135M's next-token distribution is ``softmax(W h)`` (``h``: the final hidden state, width 576; ``W``: the
tied head). A cache could keep ``h`` compressed (PCA to ``r`` dimensions fitted on training text, int8 per token,
``r + 2`` bytes) plus the exact top-``head`` tokens (4 bytes each), and rebuild a full, deterministic tail: the
exact head, and the tail mass ``1 - sum(head)`` spread in proportion to ``softmax(W h_hat)``. This script measures
how far that reconstruction is from the teacher (``KL(p || p_hat)`` per token, nats), beside the top-32 cache with a
uniformly spread tail, on held-out Austen windows (same domain as the PCA fit) and BBC windows (another domain).
No training: it decides whether the format is worth building. A second table measures the variance of two unbiased
sparse tails: the sampled cache (a sample of p, 32 or 48 index slots) and a control variate (the low-rank rebuild
plus a signed sample of the residual p - rebuild, 32 index slots in all). Figures: ``benchmarks/cache/RESULTS_cache.md``
(section "Low-rank caches").

    python benchmarks/cache/lowrank_tail_probe.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT  # noqa: E402,F401  (puts the repository root on sys.path)

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data import split_articles  # noqa: E402
from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2  # noqa: E402
from kd_plugins.distill.cache_select import inclusion_threshold  # noqa: E402


def int8_rows(z: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 round trip (the stored coefficients)."""
    scale = z.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return (z / scale).round().clamp(-127, 127) * scale


def head_plus_tail(p: torch.Tensor, tail_logprobs: torch.Tensor, head: int) -> torch.Tensor:
    """The exact top-``head`` probabilities of ``p``, and its remaining mass spread like ``exp(tail_logprobs)``."""
    top = p.topk(head, -1)
    mass = 1 - top.values.sum(-1, keepdim=True)
    tail = tail_logprobs.exp().scatter(1, top.indices, 0.0)
    return (tail / tail.sum(-1, keepdim=True) * mass).scatter(1, top.indices, top.values)


def kl(p: torch.Tensor, logp: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (logp - q.clamp_min(1e-30).log())).sum(-1).mean())


def sample_mse(mass: torch.Tensor, k: int) -> float:
    """``E ||estimate - mass||^2`` per row (summed over the vocabulary, averaged over rows) of the sampled cache's
    design on the non-negative ``mass`` ``[n, V]`` with ``k`` slots: the exact head that ``inclusion_threshold``
    picks, every other token drawn with probability ``m / tau`` and weighted ``tau`` (variance ``m (tau - m)``)."""
    m = mass.double()
    top, top_idx = m.topk(k, -1)
    count, tau = inclusion_threshold(top, m.sum(-1), k)
    in_head = torch.arange(k)[None, :] < count[:, None]
    tail = m.scatter(1, torch.where(in_head, top_idx, top_idx[:, :1]), 0.0)
    return float((tail * (tau[:, None] - tail)).clamp_min(0).sum(-1).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--fit-windows", type=int, default=32, help="Austen training windows the PCA is fitted on")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    model.eval()
    books = jane_austen_texts()
    train_text = "\n\n".join(t for name, t in sorted(books.items()) if name != "prideprejudice")
    bbc = "\n\n".join(f"{a.title}\n\n{a.body}" for a in split_articles(seed=0).test)
    windows = lm_windows(tok, train_text, args.seq_len, args.fit_windows + args.eval_windows)
    sets = {
        "Austen (held-out windows)": windows[args.fit_windows :],
        "BBC (another domain)": lm_windows(tok, bbc, args.seq_len, args.eval_windows),
    }
    head_w = model.get_output_embeddings().weight.detach()

    def hidden_and_logits(w):
        with torch.no_grad():
            out = model(w, output_hidden_states=True)
        return out.hidden_states[-1].reshape(-1, head_w.shape[1]), out.logits.reshape(-1, head_w.shape[0])

    h_fit, _ = hidden_and_logits(windows[: args.fit_windows])
    mean = h_fit.mean(0)
    _, s, basis = torch.linalg.svd(h_fit - mean, full_matrices=False)
    explained = (s**2).cumsum(0) / (s**2).sum()
    print(
        "PCA of the final hidden state: variance explained "
        + ", ".join(f"r={r}: {explained[r - 1]:.3f}" for r in (32, 64, 128, 256))
    )
    print("| text | cache form | bytes/token | KL(teacher || reconstruction), nats/token |")
    print("|---|---|---|---|")
    variance = []
    for name, w in sets.items():
        h, logits = hidden_and_logits(w)
        logp = F.log_softmax(logits, -1)
        p = logp.exp()
        variance.append(f"| {name} | sampled, 32 slots on p | 128 | {sample_mse(p, 32):.2e} |")
        variance.append(f"| {name} | sampled, 48 slots on p | 192 | {sample_mse(p, 48):.2e} |")
        uniform = torch.zeros_like(p)
        print(f"| {name} | top-32 + uniform tail | 128 | {kl(p, logp, head_plus_tail(p, uniform, 32)):.3f} |")
        for r in (32, 64, 128):
            z = int8_rows((h - mean) @ basis[:r].T)
            rec = F.log_softmax((mean + z @ basis[:r]) @ head_w.T, -1)
            print(f"| {name} | PCA r={r} int8 only | {r + 2} | {kl(p, logp, rec.exp()):.3f} |")
            for head in (8, 16):
                form = f"top-{head} exact + PCA r={r} tail"
                print(f"| {name} | {form} | {r + 2 + 4 * head} | {kl(p, logp, head_plus_tail(p, rec, head)):.3f} |")
                if r == 64:  # the same rebuild as a control variate: 32 - head slots sample the residual
                    residual = (p - head_plus_tail(p, rec, head)).abs()
                    variance.append(
                        f"| {name} | top-{head} + PCA r=64 + {32 - head} slots on the residual (L1 "
                        f"{float(residual.sum(-1).mean()):.3f}) | {66 + 128} | {sample_mse(residual, 32 - head):.2e} |"
                    )
    print("\nUnbiased sparse tails: E||estimate - teacher||^2 per token (summed over the vocabulary)")
    print("| text | form | bytes/token | variance |\n|---|---|---|---|")
    print("\n".join(variance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
