"""MGSR's DAC-KL (distribution-adaptive clipping KL) and its bounds network ``f_sub`` (:class:`DACBoundsNet`).

MGSR (Multi-Granularity Semantic Revision, Liu et al., arXiv 2407.10068) trains with
``L_SFT + L_DAC-KL + L_span`` (unit weights); this module is the DAC-KL term. There is no official code; what is
known comes from the abstract and reviewer summaries: a small learnable MLP ``f_sub`` reads the teacher's output
distribution (its sorted probabilities) and predicts an upper and a lower bound; the teacher distribution is clipped
to that high-density band and renormalised; the KL between the clipped teacher and the equally restricted student is
minimised, and ``f_sub`` is trained end to end through this loss.

Unverified (paper Eqs. 5-8): ``f_sub``'s exact inputs, the clipping rule, whether the target token is always kept,
and the KL direction. The choices made are listed in :func:`dac_kl_loss` and pinned in ``tests/test_seed_losses.py``.
Definitions, defaults and open questions: ``docs/losses.md`` (DAC-KL).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import IGNORE_INDEX, _pair_rows, kl_rows, reduce_rows, rows
from .registry import register_loss

__all__ = [
    "dac_kl_loss",
    "DACBoundsNet",
    "DACKLLoss",
]


class DACBoundsNet(nn.Module):
    """``f_sub`` of DAC-KL: reads the teacher's sorted top-``k`` probabilities, predicts ``(upper, lower)`` in (0, 1).

    Initialised so that ``upper ~ 0.95`` (nucleus mass kept) and ``lower ~ 0.02`` (relative probability floor).
    """

    def __init__(self, top_k: int = 32, hidden: int = 64, init_upper: float = 0.95, init_lower: float = 0.02):
        super().__init__()
        self.top_k = top_k
        self.net = nn.Sequential(nn.Linear(top_k, hidden), nn.GELU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            self.net[2].bias.copy_(
                torch.tensor([math.log(init_upper / (1 - init_upper)), math.log(init_lower / (1 - init_lower))])
            )

    def forward(self, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(self.top_k, teacher_probs.shape[-1])
        top = teacher_probs.detach().topk(k, dim=-1).values
        if k < self.top_k:
            top = F.pad(top, (0, self.top_k - k))
        w = self.net[0].weight
        out = self.net(top.to(w.dtype)).to(teacher_probs.dtype)
        return torch.sigmoid(out[..., 0]), torch.sigmoid(out[..., 1])


def dac_kl_loss(
    student_logits,
    teacher_logits,
    *,
    upper=None,
    lower=None,
    bounds_net=None,
    sharpness: float = 0.02,
    keep_labels: bool = True,
    temperature: float = 1.0,
    labels=None,
    mask=None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distribution-adaptive clipping KL (MGSR's DAC-KL, Liu et al.): forward KL on the teacher's high-density band.

    The paper's exact parameterisation is unverified (no public code; see the module docstring). Choices made here:

    * band, on the teacher's tokens sorted by probability: keep token ``v`` when the teacher mass ranked above it is
      ``< upper`` (a nucleus of mass ``upper``) **and** ``p_v >= lower * max p`` (drop the low-density tail);
      the argmax token is always kept, and with ``keep_labels`` so is the label token;
    * ``(upper, lower)`` per row come from ``bounds_net`` (:class:`DACBoundsNet`, ``f_sub``, reading the sorted
      teacher probabilities) or are given as floats / ``[rows]`` tensors;
    * soft band ``sigmoid(margin / sharpness)`` so that ``f_sub`` is trained end to end (``sharpness=0``: hard band);
    * loss ``T^2 * KL(p~ || q~)`` with both distributions restricted to the (soft) band and renormalised - forward KL,
      like the rest of the library. ``upper=1, lower=0`` (hard) is plain forward KL; 0 at identity for any band.

    Note that the loss alone can be lowered by shrinking the band; keep ``f_sub``'s learning rate small or add the
    SFT/CE term as MGSR does (``L_SFT + L_DAC-KL + L_span``).
    """
    if temperature <= 0 or sharpness < 0:
        raise ValueError("dac_kl_loss needs temperature > 0 and sharpness >= 0")
    s, t, valid = _pair_rows(student_logits, teacher_logits, labels, mask, ignore_index)
    log_p = torch.log_softmax(t / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    p = log_p.exp()
    if bounds_net is not None:
        if upper is not None or lower is not None:
            raise ValueError("pass either bounds_net or explicit upper/lower bounds, not both")
        upper, lower = bounds_net(p)
    upper = torch.as_tensor(1.0 if upper is None else upper, dtype=p.dtype, device=p.device)
    lower = torch.as_tensor(0.0 if lower is None else lower, dtype=p.dtype, device=p.device)
    if upper.dim() == 0:
        upper = upper.expand(p.shape[0])
    if lower.dim() == 0:
        lower = lower.expand(p.shape[0])
    if upper.shape != (p.shape[0],) or lower.shape != (p.shape[0],):
        raise ValueError(f"upper/lower must be scalars or one value per valid row ({p.shape[0]})")
    ps, order = p.detach().sort(-1, descending=True)
    mass_before = torch.cumsum(ps, -1) - ps
    rel = ps / ps[..., :1].clamp_min(torch.finfo(ps.dtype).tiny)
    mu_margin = upper.unsqueeze(-1) - mass_before
    ml_margin = rel - lower.unsqueeze(-1)
    if sharpness == 0:
        keep_sorted = ((mu_margin > 0) & (ml_margin >= 0)).to(p.dtype)
    else:
        keep_sorted = torch.sigmoid(mu_margin / sharpness) * torch.sigmoid(ml_margin / sharpness)
    keep_sorted = torch.cat([torch.ones_like(keep_sorted[..., :1]), keep_sorted[..., 1:]], -1)  # argmax kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if keep_labels and labels is not None:
        y = rows(labels.unsqueeze(-1), valid).squeeze(-1).to(p.device).long()
        keep = keep.scatter(-1, y.unsqueeze(-1), torch.ones_like(keep[..., :1]))
    log_keep = torch.log(keep.clamp_min(1e-30))
    lp_band = log_p + log_keep
    lq_band = log_q + log_keep
    log_pt = lp_band - torch.logsumexp(lp_band, -1, keepdim=True)
    log_qt = lq_band - torch.logsumexp(lq_band, -1, keepdim=True)
    per_row = kl_rows(log_pt, log_qt) * temperature**2
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


@register_loss("dac_kl", kind="logits", function=dac_kl_loss, aliases=("mgsr_dac_kl",))
class DACKLLoss(nn.Module):
    """MGSR DAC-KL: forward KL on a teacher high-density band predicted by a small learned network."""

    def __init__(
        self,
        top_k: int = 32,
        hidden: int = 64,
        sharpness: float = 0.02,
        keep_labels: bool = True,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ):
        super().__init__()
        self.bounds_net = DACBoundsNet(top_k=top_k, hidden=hidden)
        self.kw = dict(
            sharpness=sharpness,
            keep_labels=keep_labels,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
        )

    def forward(self, student_logits, teacher_logits, *, labels=None, mask=None, num_items_in_batch=None, **_):
        return dac_kl_loss(
            student_logits,
            teacher_logits,
            bounds_net=self.bounds_net,
            labels=labels,
            mask=mask,
            num_items_in_batch=num_items_in_batch,
            **self.kw,
        )
