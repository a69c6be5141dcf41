"""Sparse (top-k) teacher math shared by the PyTorch and Triton backends of the fused KD loss.

Both backends reduce a sparse teacher to a small ``[rows, K]`` problem (the student log-probabilities at the teacher's
top-k tokens) and evaluate it here with the reference helpers of :mod:`kd_plugins.losses`, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_plugins.losses._common import kl_rows, log1mexp, log_mix

__all__ = ["RowFn", "divergence_row_fn", "topk_rows_and_grad"]

#: ``row_fn(log_p_teacher, log_q_student) -> [rows]`` divergence per row.
RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def divergence_row_fn(name: str, beta: float) -> RowFn:
    """Per-row divergence on log-probabilities (same helpers and conventions as ``kd_plugins.losses.logit``)."""
    if name == "kl":
        return kl_rows
    if name == "reverse_kl":
        return lambda lp, lq: kl_rows(lq, lp)
    if name == "jsd":

        def jsd(lp, lq):
            lm = log_mix(lp, lq, beta)
            return beta * kl_rows(lp, lm) + (1.0 - beta) * kl_rows(lq, lm)

        return jsd
    if name == "tvd":
        return lambda lp, lq: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise AssertionError(name)


def _support(lq: torch.Tensor, lpf: torch.Tensor, topk_tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the K tokens (+ one tail bucket, or renormalised over the K)."""
    if topk_tail == "bucket":
        p_tail = log1mexp(torch.logsumexp(lpf, dim=-1, keepdim=True).clamp(max=-1e-7))
        q_tail = log1mexp(torch.logsumexp(lq, dim=-1, keepdim=True).clamp(max=-1e-7))
        return torch.cat([lpf, p_tail], -1), torch.cat([lq, q_tail], -1)
    return lpf - torch.logsumexp(lpf, -1, keepdim=True), lq - torch.logsumexp(lq, -1, keepdim=True)


def topk_rows_and_grad(log_q_k: torch.Tensor, lp: torch.Tensor, row_fn: RowFn, topk_tail: str, need_grad: bool):
    """Sparse-teacher divergence per row on the ``[n, K]`` student log-probs at the teacher's top-k tokens.

    Builds the same ``K (+1 tail bucket)`` support as :func:`kd_plugins.losses._common.log_prob_pair` and returns
    ``(rows, G)`` with ``G = d sum(rows) / d log_q_k`` (via autograd on the small ``[n, K]`` tensors; None when
    ``need_grad`` is False or there are no rows).
    """
    with torch.enable_grad():
        lq = log_q_k.detach().requires_grad_(need_grad)
        log_p, log_q = _support(lq, lp.to(lq.dtype), topk_tail)
        per_row = row_fn(log_p, log_q)
        grad = torch.autograd.grad(per_row.sum(), lq)[0] if need_grad and per_row.numel() else None
    return per_row.detach(), grad
