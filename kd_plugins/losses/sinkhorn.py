"""SinKD: batch-wise Sinkhorn (entropic optimal-transport) distance between student and teacher distributions.

Cui et al., LREC-COLING 2024 / TNNLS 2024; reference code ``2018cx/SinKD`` (``loss.py``, class ``Sinkhorn``). KL,
reverse KL and JS suffer from mode averaging, mode collapse and mode under-estimation when the two distributions
overlap little; SinKD uses the Sinkhorn distance instead, solved once over the whole batch (an ``N x N`` cost between
every student row and every teacher row) rather than per student/teacher pair.

Kept from the reference code: temperature 2 (hard-coded there: its constructor argument is ignored), ``epsilon=0.1``,
20 iterations of row then column normalisation (uniform marginals of mass 1 per row and column), the loss
``sum_ij Pi_ij W_ij`` without debiasing (so it is not 0 when student == teacher). Left to the caller: the repo's
scale 0.001 (GLUE) or 0.0008 (GPT-Neo / T0), to be given as the loss weight. Changed: for 3-D LM logits the repo's
softmax runs over the sequence axis; here every row (token) is normalised over its own vocabulary.

Unverified: in the released GLUE script the Sinkhorn term is added to the loss only inside a branch taken when the
loss name contains ``"saliency"``, so the shipped ``kd+sinkhorn`` runs seem to optimise KD + CE only.

Conventions as in :mod:`kd_plugins.losses.logit`: tensors first, keyword-only hyper-parameters, ``labels``/``mask``
select valid rows, float64 in -> float64 compute, ``ValueError`` naming the problem and the fix. Golden values are
pinned in ``tests/test_seed_losses.py``; definitions, defaults and open questions: ``docs/losses.md`` (SinKD).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._common import IGNORE_INDEX, _pair_rows
from .registry import register_loss

__all__ = [
    "sinkhorn_loss",
    "SinkhornLoss",
]


def sinkhorn_loss(
    student_logits,
    teacher_logits,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iters: int = 20,
    labels=None,
    mask=None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Batch-wise Sinkhorn distance (SinKD, Cui et al. 2024), as in the reference repo's ``Sinkhorn`` module.

    The ``N`` valid rows (samples, or tokens of an LM batch: each row is softmax-normalised over its own vocabulary,
    not over the sequence as the repo's 3-D path does) give ``P_S = softmax(s/T)`` and ``P_T = softmax(t/T)``.
    Cost ``W_ij = ||P_S_i - P_T_j||_1`` (``N x N``), kernel ``exp(-W/epsilon)``, ``n_iters`` alternating row and column
    normalisations (uniform unit marginals; done in log space, so small ``epsilon`` cannot underflow) give the plan
    ``Pi``; the loss is ``sum_ij Pi_ij W_ij`` (a sum over the batch, as in the repo: it grows with ``N``).

    Repo defaults: ``T=2``, ``epsilon=0.1``, 20 iterations; the repo multiplies by ``0.001`` (GLUE) or ``0.0008``
    (GPT-Neo / T0): use that as the loss weight. Entropic OT is *not* 0 at identity (not debiased, like the repo).
    Gradients flow through both the cost and the plan.
    """
    if temperature <= 0 or epsilon <= 0 or n_iters < 1:
        raise ValueError("sinkhorn_loss needs temperature > 0, epsilon > 0 and n_iters >= 1")
    s, t, _ = _pair_rows(student_logits, teacher_logits, labels, mask, ignore_index)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    ps, pt = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    w = (ps.unsqueeze(1) - pt.unsqueeze(0)).abs().sum(-1)  # cdist(p=1), with well-defined gradients at 0
    log_k = -w / epsilon
    for _ in range(n_iters):
        log_k = log_k - torch.logsumexp(log_k, dim=1, keepdim=True)
        log_k = log_k - torch.logsumexp(log_k, dim=0, keepdim=True)
    return (log_k.exp() * w).sum()


@register_loss("sinkhorn", kind="logits", function=sinkhorn_loss, aliases=("sinkd",))
class SinkhornLoss(nn.Module):
    """SinKD batch-wise Sinkhorn (entropic OT) distance between student and teacher class distributions."""

    def __init__(
        self, temperature: float = 2.0, epsilon: float = 0.1, n_iters: int = 20, ignore_index: int = IGNORE_INDEX
    ):
        super().__init__()
        self.kw = dict(temperature=temperature, epsilon=epsilon, n_iters=n_iters, ignore_index=ignore_index)

    def forward(self, student_logits, teacher_logits, *, labels=None, mask=None, **_):
        return sinkhorn_loss(student_logits, teacher_logits, labels=labels, mask=mask, **self.kw)
