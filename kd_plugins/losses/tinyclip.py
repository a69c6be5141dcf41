"""TinyCLIP affinity mimicking (Wu et al., ICCV 2023): image->text and text->image in-batch affinity distillation.

A thin wrapper over :func:`~kd_plugins.losses.affinity_kl`, registered as ``"tinyclip_affinity"`` (alias
``"tinyclip"``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .feature import affinity_kl
from .registry import register_loss

__all__ = [
    "tinyclip_affinity_loss",
    "TinyCLIPAffinityLoss",
]


def tinyclip_affinity_loss(
    student_image,
    student_text,
    teacher_image,
    teacher_text,
    *,
    logit_scale: float = 50.0,
    include_teacher_entropy: bool = False,
    num_items_in_batch=None,
) -> torch.Tensor:
    """TinyCLIP affinity mimicking (Wu et al. ICCV 2023): image->text and text->image affinities, averaged.

    A thin wrapper over :func:`~kd_plugins.losses.affinity_kl` with ``temperature = 1/logit_scale`` (both towers'
    scales fixed at 50, as in the repo's scripts), unscaled:
    ``0.5 * KL(A^t_I2T || A^s_I2T) + 0.5 * KL(A^t_T2I || A^s_T2I)`` averaged over rows, 0 at the optimum.
    The repo's value is the soft cross-entropy, i.e. this plus the teacher affinities' mean entropy
    (``include_teacher_entropy=True``); the gradient is the same.
    """
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    tau = 1.0 / logit_scale
    i2t = affinity_kl(
        student_image,
        teacher_image,
        student_keys=student_text,
        teacher_keys=teacher_text,
        temperature=tau,
        num_items_in_batch=num_items_in_batch,
    )
    t2i = affinity_kl(
        student_text,
        teacher_text,
        student_keys=student_image,
        teacher_keys=teacher_image,
        temperature=tau,
        num_items_in_batch=num_items_in_batch,
    )
    loss = 0.5 * (i2t + t2i)
    if include_teacher_entropy:
        dtype = loss.dtype
        ti = F.normalize(teacher_image.to(dtype), dim=-1)
        tt = F.normalize(teacher_text.to(dtype), dim=-1)
        sim = (ti @ tt.T * logit_scale).to(loss.device)
        ent = 0.0
        for m in (sim, sim.T):
            lp = torch.log_softmax(m, -1)
            ent = ent + (-(lp.exp() * lp).sum(-1)).sum() / (num_items_in_batch or m.shape[0])
        loss = loss + 0.5 * ent
    return loss


@register_loss("tinyclip_affinity", kind="embedding", function=tinyclip_affinity_loss, aliases=("tinyclip",))
class TinyCLIPAffinityLoss(nn.Module):
    """TinyCLIP affinity mimicking: bidirectional image<->text in-batch affinity KL (wraps affinity_kl)."""

    def __init__(self, logit_scale: float = 50.0, include_teacher_entropy: bool = False):
        super().__init__()
        self.logit_scale, self.include_teacher_entropy = logit_scale, include_teacher_entropy

    def forward(self, student_image, student_text, teacher_image, teacher_text, **_):
        return tinyclip_affinity_loss(
            student_image,
            student_text,
            teacher_image,
            teacher_text,
            logit_scale=self.logit_scale,
            include_teacher_entropy=self.include_teacher_entropy,
        )
