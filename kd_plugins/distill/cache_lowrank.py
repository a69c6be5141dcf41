"""Low-rank teacher caches: the exact head of each distribution plus a tail rebuilt from the teacher's hidden state.

A causal LM's next-token distribution is ``softmax(W h / T)``: ``h`` the final hidden state (after the final norm),
``W`` the output head. A top-k cache keeps the K likeliest tokens and loses the tail's shape; a sampled cache keeps
it in expectation but with variance. This format keeps, per position, the exact top-``h`` log-probs and ``h``
projected on a PCA basis of rank ``r`` fitted on the cached text (int8 coefficients, one fp32 scale), so the loss
sees a full, deterministic distribution:

* head tokens: their exact teacher probability;
* every other token: the head's remaining mass ``1 - sum(head)`` spread in proportion to
  ``softmax(W h_hat / T)`` over the non-head tokens, ``h_hat = mean + coefficients @ basis``.

The cache stores the head and the coefficients per token and, once, ``tail_bias = W mean / T`` (``[V]``) and
``tail_weight = W basis^T / T`` (``[V, r]``), so rebuilding a row costs an ``r``-wide matmul over the vocabulary
(the teacher's own head is ``hidden``-wide). Built in memory by ``build_teacher_cache(kind="lowrank")`` or on disk,
sharded and streamed, by ``cache_teacher(kind="lowrank")``; the callback reads it on the plain or the fused path.
With ``r`` equal to the hidden width the tail is the teacher's up to int8 rounding.

Measured (benchmarks/cache/RESULTS_cache.md, "Low-rank caches"): SmolLM2-135M, ``h = 16``, ``r = 64``:
``KL(teacher || rebuilt) = 0.17`` nats per token on held-out text of the training domain, where a top-32 row with a
uniformly spread tail is 0.76 away; a student trained on it tracks the live teacher's early (80 steps: BBC
perplexity +1.9%, the sampled cache +12.6%) and keeps the rebuilt tail's bias later (320 steps, two seeds: +9.5%,
sampled +7.3%). The idea is ours (a PCA code of the final hidden state as a teacher cache); DistillKit's "exact
head + fitted tail" fits a curve to the sorted tail values instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import spread_tail

__all__ = ["LowRankCoder", "fit_hidden_basis", "encode_hidden", "rebuild_log_probs", "code_rows", "output_head"]


def output_head(teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, D], bias [V] or None)`` of the teacher's output head (``get_output_embeddings``)."""
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            "kind='lowrank' rebuilds the teacher's distribution from its final hidden state through its output "
            f"head, but {type(teacher).__name__} has no get_output_embeddings() weight; use kind='topk' for it"
        )
    bias = getattr(head, "bias", None)
    return head.weight.detach(), None if bias is None else bias.detach()


def fit_hidden_basis(hidden: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [D], basis [rank, D])``: the principal directions of ``hidden`` (``[N, D]`` final hidden states)."""
    if hidden.dim() != 2 or hidden.shape[0] < 2:
        raise ValueError(f"fit_hidden_basis needs [N >= 2, D] hidden states, got {tuple(hidden.shape)}")
    if not 1 <= rank <= hidden.shape[1]:
        raise ValueError(f"rank must lie in [1, {hidden.shape[1]}] (the teacher's hidden width), got {rank}")
    if rank > hidden.shape[0]:
        raise ValueError(
            f"rank {rank} needs at least {rank} fitting tokens, got {hidden.shape[0]}; raise fit_tokens or use "
            "more data"
        )
    h = hidden.double()
    mean = h.mean(0)
    _, _, vh = torch.linalg.svd(h - mean, full_matrices=False)
    return mean.float(), vh[:rank].float()


def encode_hidden(hidden: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coefficients int8 [N, r], scale fp32 [N])``: each row's PCA coefficients, symmetric int8 per row."""
    z = (hidden.float() - mean) @ basis.T
    scale = z.abs().amax(-1).clamp_min(1e-12) / 127.0
    return (z / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def rebuild_log_probs(
    head_indices: torch.Tensor,
    head_log_probs: torch.Tensor,
    coefficients: torch.Tensor,
    scale: torch.Tensor,
    tail_bias: torch.Tensor,
    tail_weight: torch.Tensor,
) -> torch.Tensor:
    """Full ``[N, V]`` log-probs: the exact head, and the rest of the mass spread like the rebuilt tail logits."""
    logits = torch.addmm(tail_bias.float(), code_rows(coefficients, scale), tail_weight.float().T)
    return spread_tail(logits, head_indices.long(), head_log_probs.float())


def code_rows(coefficients: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float PCA coefficients ``[N, r]`` of int8 codes and their per-row scales."""
    return coefficients.float() * scale.float()[:, None]


class LowRankCoder:
    """Per-token PCA codes of a teacher's final hidden states, example by example.

    Buffers the first ``fit_tokens`` hidden states, fits the basis on them, then encodes every example (the
    buffered ones and later ones, in the order given). :meth:`ready` hands out the codes finished so far (a
    streaming writer), :meth:`all_codes` all of them (an in-memory cache); :meth:`once` is the ``[V]`` / ``[V, r]``
    map that rebuilds logits from a code. The first rows also check that the head reproduces the model's logits.
    """

    def __init__(self, teacher: nn.Module, rank: int, fit_tokens: int, temperature: float):
        self.weight, self.bias = output_head(teacher)
        self.rank, self.fit_tokens, self.temperature = rank, fit_tokens, temperature
        self.pending: list[torch.Tensor] = []
        self.codes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.basis: tuple[torch.Tensor, torch.Tensor] | None = None
        self.checked = False

    def check_head(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Once: the last hidden state must give the model's logits through its head (no soft-capping, scaling)."""
        if self.checked:
            return
        w = self.weight.to(hidden.device).float()
        rebuilt = hidden @ w.T + (0 if self.bias is None else self.bias.to(hidden.device).float())
        err, size = float((rebuilt - logits).abs().max()), float(logits.abs().max())
        if err > 1e-2 * size + 1e-3:
            raise ValueError(
                f"kind='lowrank': the teacher's last hidden state times its output head differs from its logits by "
                f"up to {err:.3g} (logits up to {size:.3g}); the model transforms its logits after the head "
                "(soft-capping, scaling), so a rebuilt tail would be another distribution. Use kind='topk'."
            )
        self.checked = True

    def add(self, hidden: torch.Tensor) -> None:
        """The ``[rows, D]`` final hidden states of one example."""
        if self.basis is not None:
            self.codes.append(encode_hidden(hidden, *self.basis))
            return
        self.pending.append(hidden)
        if sum(len(h) for h in self.pending) >= self.fit_tokens:
            self._fit()

    def _fit(self) -> None:
        self.basis = fit_hidden_basis(torch.cat(self.pending)[: self.fit_tokens], self.rank)
        self.codes += [encode_hidden(h, *self.basis) for h in self.pending]
        self.pending = []

    def finish(self) -> None:
        """Fit on what was buffered when the data held fewer than ``fit_tokens`` tokens."""
        if self.basis is None:
            self._fit()

    def ready(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(coefficients, scale)`` of the examples encoded since the last call, in order."""
        out, self.codes = self.codes, []
        return out

    def all_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.finish()
        codes = self.ready()
        return torch.cat([c for c, _ in codes]), torch.cat([s for _, s in codes])

    def once(self) -> dict[str, torch.Tensor]:
        """``tail_bias`` ``[V]`` (fp32) and ``tail_weight`` ``[V, r]`` (fp16: half the bytes of fp32)."""
        self.finish()
        mean, basis = self.basis
        w = self.weight.float().cpu()
        bias = w @ mean + (0 if self.bias is None else self.bias.float().cpu())
        return {"tail_bias": bias / self.temperature, "tail_weight": ((w @ basis.T) / self.temperature).half()}
