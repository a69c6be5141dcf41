"""Distiller's MI-alpha: a mutual-information lower bound between student and teacher hidden states, as a loss.

Distiller (He et al., SustaiNLP 2021) finds intermediate-representation distillation to be the most important KD
factor, unifies the common intermediate objectives under a mutual-information view, and reports that a family of
MI-alpha objectives, which trade bias for variance, works best. No official code is public and only the abstract
could be read, so MI-alpha is implemented here as the alpha-interpolated bound ``I_alpha`` of Poole et al. (2019)
with a learned critic and in-batch negatives (``alpha=1``: InfoNCE-like, low variance and biased; ``alpha=0``:
NWJ/TUBA, unbiased and high variance).

Unverified: the critic form, the alpha grid, the baseline ``q`` and whether the paper uses exactly Poole et al.'s
``I_alpha``. The choices made are listed in :func:`mi_alpha_loss` and pinned in ``tests/test_seed_losses.py``.
Definitions, defaults and open questions: ``docs/losses.md`` (MI-α).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import IGNORE_INDEX, compute_dtype, rows, valid_mask
from .feature import FeatureProjector, _project
from .registry import register_loss

__all__ = [
    "mi_alpha_loss",
    "MIAlphaLoss",
]


def mi_alpha_loss(
    student_hidden,
    teacher_hidden,
    *,
    alpha: float = 0.5,
    temperature: float = 0.1,
    projector=None,
    log_baseline=0.0,
    mask=None,
    labels=None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Negative interpolated MI lower bound ``-I_alpha`` (Poole et al. 2019) between student and teacher features.

    Used by Distiller (He et al. 2021) for intermediate-representation KD; the critic form and the baseline are not
    published (the paper has no public code; see the module docstring). Choices made here:

    * rows are the valid positions (tokens or pooled samples); ``x_k`` = (projected) student row ``k``, ``y_j`` =
      teacher row ``j``; positives are ``(x_j, y_j)``, the other rows of the batch are the negatives;
    * critic ``f(x, y) = cos(P x, y) / temperature`` (``P`` the learned projector when widths differ);
    * ``m(y_j) = mean_k exp f(x_k, y_j)`` over *all* rows (positive included, as InfoNCE), baseline
      ``q(y) = exp(log_baseline)`` (a learnable scalar in the module form, 1 by default);
    * ``I_alpha = 1 + mean_j log(e^{f_jj} / d_j) - mean_{k != j} e^{f_kj} / d_j`` with
      ``d_j = alpha m(y_j) + (1 - alpha) q``.

    ``alpha=1`` is the InfoNCE-like (low variance, biased) end, ``alpha=0`` NWJ/TUBA with baseline ``q``
    (unbiased, high variance). Needs at least 2 rows.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = _project(student_hidden, teacher_hidden, projector)
    valid = valid_mask(s.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index, device=s.device)
    sr = F.normalize(rows(s, valid).to(compute_dtype(s)), dim=-1)
    tr = F.normalize(rows(teacher_hidden, valid).to(sr.device, sr.dtype), dim=-1)
    n = sr.shape[0]
    if n < 2:
        raise ValueError("mi_alpha_loss needs at least 2 valid rows (the other rows are the negatives)")
    f = sr @ tr.T / temperature  # f[k, j] = critic(x_k, y_j)
    log_q = torch.as_tensor(log_baseline, dtype=f.dtype, device=f.device)
    log_m = torch.logsumexp(f, dim=0) - math.log(n)
    if alpha == 1.0:
        log_d = log_m
    elif alpha == 0.0:
        log_d = log_q.expand_as(log_m)
    else:
        log_d = torch.logaddexp(math.log(alpha) + log_m, math.log1p(-alpha) + log_q)
    pos = (f.diagonal() - log_d).mean()
    off = ~torch.eye(n, dtype=torch.bool, device=f.device)
    neg = torch.where(off, (f - log_d.unsqueeze(0)).exp(), torch.zeros_like(f)).sum() / (n * (n - 1))
    return -(1.0 + pos - neg)


@register_loss("mi_alpha", kind="hidden", function=mi_alpha_loss, aliases=("distiller_mi",))
class MIAlphaLoss(nn.Module):
    """Distiller's MI-alpha: negative interpolated MI bound with a learned critic projection and baseline."""

    def __init__(
        self,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        alpha: float = 0.5,
        temperature: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.alpha, self.temperature, self.ignore_index = alpha, temperature, ignore_index
        self.projector = (
            FeatureProjector(student_dim, teacher_dim)
            if student_dim and teacher_dim and student_dim != teacher_dim
            else None
        )
        self.log_baseline = nn.Parameter(torch.zeros(()))

    def forward(self, student_hidden, teacher_hidden, *, mask=None, labels=None, **_):
        return mi_alpha_loss(
            student_hidden,
            teacher_hidden,
            alpha=self.alpha,
            temperature=self.temperature,
            projector=self.projector,
            log_baseline=self.log_baseline,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
        )
