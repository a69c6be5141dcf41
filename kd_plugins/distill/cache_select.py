"""Which teacher tokens a logit cache keeps per position: the top-k, or a sample whose weights are unbiased.

``topk`` keeps the K most likely tokens with their exact probabilities; the loss then sees the rest of the
vocabulary as one tail bucket, which drops the *shape* of the teacher's tail. Every tail token's gradient is then
driven by the student alone, and a student trained long on a top-k cache specialises to the tokens the teacher
found likely on the training text (measured in benchmarks/cache/RESULTS_cache.md).

``sampled`` fills the K slots with a probability-proportional sample of the vocabulary and weights each kept token
by the inverse of its inclusion probability (Horvitz-Thompson), so every token's stored weight is an unbiased
estimate of its teacher probability. The forward KL's gradient with respect to the student's logits is ``q - p``,
linear in ``p``, so with these targets it is an unbiased estimate of the full-vocabulary gradient (the idea of
random-sampling KD: Anshumann et al., "Sparse Logit Sampling", ACL 2025). Divergences that are not linear in ``p``
(reverse KL, JSD, ...) have no such estimate, and the cache refuses them.

The sample (ours; classic survey sampling): the teacher's top-1 and every token with ``p_i >= tau`` are kept with
their exact probability (an adaptive head: no head size to tune); ``tau`` is set so the other tokens' inclusion
probabilities ``pi_i = p_i / tau`` (all < 1) sum to the free slots. Those slots are filled by systematic sampling
(one uniform start, points one apart over the cumulated ``pi`` of the tail in a random order of the vocabulary),
which draws exactly that many *distinct* tokens, each with probability ``pi_i``, each stored with weight ``tau``.
The weights then sum to exactly 1 (``tau`` times the number of drawn tokens is the tail mass), so no tail bucket is
left over, and no slot is wasted on a repeated draw as with sampling with replacement. Slot 0 holds the teacher's
top-1, as in a top-k row.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = [
    "SELECTIONS",
    "example_generator",
    "inclusion_threshold",
    "sampled_support",
    "select_support",
    "cache_rows",
]

SELECTIONS = ("topk", "sampled")


def inclusion_threshold(top_probs: torch.Tensor, total: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, tau)`` per row from the ``k`` largest probabilities (decreasing) and the row's total mass: the ``c``
    (>= 1) leading tokens are kept exactly and the rest are drawn with probability ``p / tau``, where
    ``tau = (mass after c) / (k - c)`` and ``c`` is the smallest count whose next token has ``p < tau`` (so every
    drawn token has inclusion probability < 1). A row where no count fits keeps its top k exactly (``tau = 0``)."""
    head = top_probs.double()
    rest = (total.double()[:, None] - head.cumsum(-1)).clamp(min=0.0)  # mass after the first j + 1 tokens
    c = torch.arange(1, k, dtype=torch.long)  # candidates c = 1..k-1 (the top-1 is always kept)
    tau = rest[:, :-1] / (k - c).double()
    fits = head[:, 1:] < tau  # the (c + 1)-th token falls below tau: c tokens are exact
    found = fits.any(-1)
    first = fits.long().argmax(-1)
    count = torch.where(found, first + 1, torch.full_like(first, k))
    tau_c = torch.where(found, tau.gather(-1, first[:, None]).squeeze(-1), torch.zeros_like(tau[:, 0]))
    return count, tau_c


def sampled_support(
    log_probs: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [n, k], log_weights [n, k])`` of a ``sampled`` row (module docstring): the exact head in
    decreasing order, then the drawn tokens, each with weight ``tau``; every row has k distinct indices."""
    n, vocab = log_probs.shape
    top_lp, top_idx = log_probs.topk(k, dim=-1)
    probs = log_probs.double().exp()
    count, tau = inclusion_threshold(top_lp.exp(), probs.sum(-1), k)
    slot = torch.arange(k)
    in_head = slot[None, :] < count[:, None]
    head_ids = torch.where(in_head, top_idx, top_idx[:, :1])  # slots past the head repeat the top-1 (already in)
    head_mask = torch.zeros(n, vocab, dtype=torch.bool).scatter_(-1, head_ids, True)
    # Systematic sampling over the tail's inclusion probabilities, in one random order of the vocabulary per call
    # (only each token's own inclusion probability matters for unbiasedness; the order decorrelates neighbours).
    tail_pi = torch.where(head_mask, 0.0, probs / tau.clamp(min=1e-300)[:, None])
    perm = torch.randperm(vocab, generator=generator)
    cum = tail_pi[:, perm].cumsum(-1)
    free = (k - count).double()
    cum = cum * (free / cum[:, -1].clamp(min=1e-300))[:, None]  # exact total: the last point lands inside
    start = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    points = (start + (slot[None, :] - count[:, None]).double()).clamp(min=0.0)  # point j - c for slot j >= c
    drawn = perm[torch.searchsorted(cum, points).clamp(max=vocab - 1)]
    idx = torch.where(in_head, top_idx, drawn)
    lw = torch.where(in_head, top_lp, tau.log().to(top_lp.dtype)[:, None].expand(n, k))
    return idx, lw


def example_generator(seed: int, key: bytes) -> torch.Generator:
    """The generator of one example's draws, a function of ``seed`` and the example's cache key only: a sampled
    cache is the same whatever batch size, example order or device built it."""
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True) + key, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def select_support(
    log_probs: torch.Tensor, k: int, selection: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, log_values)`` ``[n, k]`` of one example's rows for ``selection`` in :data:`SELECTIONS`."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "sampled" and 1 < k < log_probs.shape[-1]:
        return sampled_support(log_probs, k, generator)
    lp, idx = log_probs.topk(k, dim=-1)  # top-k; also k = 1 (the top-1 is always exact) and k = V (everything)
    return idx, lp


def cache_rows(
    logits: torch.Tensor, k: int, temperature: float, selection: str, seed: int, key: bytes
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, log_values)`` ``[n, k]`` of one example's teacher logits ``[n, V]`` at ``temperature``: what both
    cache builders store. Sampled draws run on the CPU, seeded by ``(seed, key)``: the same cache on any device."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    generator = None
    if selection == "sampled":
        log_probs, generator = log_probs.cpu(), example_generator(seed, key)
    return select_support(log_probs, k, selection, generator)
