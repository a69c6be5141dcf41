"""MDCS (Zhao et al., ICCV 2023): more diverse experts with consistency self-distillation, for long-tailed data.

As the reference code (``fistyee/MDCS``, ``model/loss.py:MDCSLoss``) does, with 3 experts:

* diversity by logit adjustment: expert ``e``'s logits get ``+ lambda_e * log(n_c)`` (raw class counts ``n_c``),
  ``lambda`` = -0.5 (head expert), 1 (medium), 2.5 (few-shot / tail);
* cross-entropy on all samples for each adjusted expert, summed over the experts without weights;
* consistency self-distillation: the batch holds two views of each image, the standard augmentation (weak, the
  teacher) and RandAugment (strong, the student); per expert ``KL(sg[p_weak] || q_strong)``, batch mean;
* confident instance sampling: only instances whose weak-view argmax equals the label enter that KL;
* consistency weight ``0.6 * min(epoch / 20, 1)``, a linear warm-up over 20 epochs (:func:`mdcs_cs_weight`).

The repo's configs store ``tau=2`` but the code overwrites it: the distillation temperature actually used is 1, the
default here. (Definitions and defaults: ``docs/losses.md``, MDCS.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import compute_dtype, kl_rows
from .registry import register_loss

__all__ = [
    "mdcs_logit_adjust",
    "mdcs_consistency_loss",
    "mdcs_loss",
    "mdcs_cs_weight",
    "MDCSLoss",
]


def mdcs_logit_adjust(logits: torch.Tensor, class_counts, lam: float) -> torch.Tensor:
    """MDCS expert diversity: ``logits + lam * log(n_c)`` (class counts; frequencies give the same softmax)."""
    counts = torch.as_tensor(class_counts, dtype=logits.dtype, device=logits.device)
    if counts.shape != logits.shape[-1:] or bool((counts <= 0).any()):
        raise ValueError(f"class_counts must hold {logits.shape[-1]} positive counts")
    return logits + lam * counts.log()


def _experts(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [batch, classes] or [experts, batch, classes], got {tuple(x.shape)}")
    return x


def mdcs_consistency_loss(
    weak_logits, strong_logits, labels=None, *, temperature: float = 1.0, confident_only: bool = True
) -> torch.Tensor:
    """MDCS consistency self-distillation with confident-instance sampling (Zhao et al. ICCV 2023).

    Per expert: ``T^2 KL(sg[softmax(weak/T)] || softmax(strong/T))`` averaged over the selected instances
    (``batchmean`` on them), summed over experts. Inputs are ``[B, C]`` or ``[E, B, C]``; the weak (standard
    augmentation) view is the teacher, the strong (RandAugment) view the student. With ``confident_only`` only
    instances whose weak-view argmax equals the label enter (per expert); an expert with none contributes 0.
    The repo uses ``T=1``.
    """
    w, s = _experts(weak_logits, "weak_logits"), _experts(strong_logits, "strong_logits")
    if w.shape != s.shape:
        raise ValueError(f"weak {tuple(w.shape)} and strong {tuple(s.shape)} views must have the same shape")
    dtype = compute_dtype(s)
    log_p = torch.log_softmax(w.detach().to(dtype) / temperature, -1)
    log_q = torch.log_softmax(s.to(dtype) / temperature, -1)
    per = kl_rows(log_p, log_q) * temperature**2  # [E, B]
    if confident_only:
        if labels is None:
            raise ValueError("confident-instance sampling needs labels (or pass confident_only=False)")
        sel = w.argmax(-1) == labels.to(w.device).reshape(1, -1)
    else:
        sel = torch.ones_like(per, dtype=torch.bool)
    per_expert = torch.where(sel, per, torch.zeros_like(per)).sum(-1) / sel.sum(-1).clamp_min(1)
    return per_expert.sum()


def mdcs_loss(
    weak_logits,
    strong_logits,
    labels,
    *,
    class_counts,
    lambdas: Sequence[float] = (-0.5, 1.0, 2.5),
    cs_weight: float = 0.6,
    temperature: float = 1.0,
    return_parts: bool = False,
):
    """Full MDCS objective: diversity-adjusted CE of every expert on both views + ``cs_weight`` * consistency.

    Expert ``e``'s logits are adjusted by ``lambdas[e] * log(n_c)`` (repo: -0.5 head, 1 medium, 2.5 tail expert)
    and its CE is averaged over both views' samples; CE terms are summed over experts. The consistency term
    (:func:`mdcs_consistency_loss`) uses the same adjusted logits (choice: each expert distils its own training
    distribution; not checked against the repo). Scale ``cs_weight`` by :func:`mdcs_cs_weight` for the repo's warm-up.
    """
    w, s = _experts(weak_logits, "weak_logits"), _experts(strong_logits, "strong_logits")
    if len(lambdas) != w.shape[0]:
        raise ValueError(f"{w.shape[0]} experts but {len(lambdas)} lambdas")
    wa = torch.stack([mdcs_logit_adjust(w[e], class_counts, lam) for e, lam in enumerate(lambdas)])
    sa = torch.stack([mdcs_logit_adjust(s[e], class_counts, lam) for e, lam in enumerate(lambdas)])
    y = labels.to(w.device)
    dtype = compute_dtype(s)
    ce = sum(F.cross_entropy(torch.cat([wa[e], sa[e]]).to(dtype), torch.cat([y, y])) for e in range(w.shape[0]))
    cs = mdcs_consistency_loss(wa, sa, y, temperature=temperature)
    total = ce + cs_weight * cs
    return (total, ce, cs) if return_parts else total


def mdcs_cs_weight(epoch: float, max_weight: float = 0.6, warmup_epochs: float = 20) -> float:
    """The repo's consistency weight schedule ``max_weight * min(epoch / warmup_epochs, 1)``."""
    return max_weight * min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else max_weight


@register_loss("mdcs", kind="logits", function=mdcs_loss)
class MDCSLoss(nn.Module):
    """MDCS: diverse logit-adjusted experts + consistency self-distillation on confident instances."""

    def __init__(
        self,
        class_counts,
        lambdas: Sequence[float] = (-0.5, 1.0, 2.5),
        cs_weight: float = 0.6,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.register_buffer("class_counts", torch.as_tensor(class_counts, dtype=torch.float32))
        self.lambdas, self.cs_weight, self.temperature = tuple(lambdas), cs_weight, temperature

    def forward(self, weak_logits, strong_logits, *, labels, cs_weight: float | None = None, **_):
        return mdcs_loss(
            weak_logits,
            strong_logits,
            labels,
            class_counts=self.class_counts,
            lambdas=self.lambdas,
            cs_weight=self.cs_weight if cs_weight is None else cs_weight,
            temperature=self.temperature,
        )
