"""LELP (Loo et al., arXiv 2409.20449): distillation onto teacher pseudo-subclasses, for few-class problems.

With few classes (binary, say) soft labels carry little dark knowledge. LELP splits every class into ``S``
pseudo-subclasses built from the teacher's final-layer embeddings, in the spirit of Subclass Distillation (Mueller et
al. 2020) but without retraining the teacher: per class, project the class's embeddings onto the null space of the
teacher's output weights (removing what the logits already express), keep ``S`` principal directions, mix them with
a random rotation to balance their variance, and split the class with a tempered softmax over the projection
coordinates. The student gets a ``C*S``-way head trained against the teacher's subclass distribution; its class
probability is the sum over the class's subclasses. The paper mostly uses pure distillation (``alpha=0``).

No official code is public. Unverified: how the subclass softmax combines with the teacher's class probability, and
its temperature (the choice made is in :func:`lelp_teacher_log_probs`). ``tests/test_seed_losses.py`` checks that
subclass probabilities sum to the class marginal and that ``S = 1`` is vanilla KD. (Definitions, defaults and
open questions: ``docs/losses.md``, LELP.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import compute_dtype, kl_rows, reduce_rows
from .registry import register_loss

__all__ = [
    "LELPProjection",
    "fit_lelp_projection",
    "lelp_teacher_log_probs",
    "lelp_loss",
    "subclass_to_class_logits",
    "LELPLoss",
]


@dataclass
class LELPProjection:
    """Per-class pseudo-subclass coordinates: ``z[c, s] = ((e - means[c]) @ directions[c, s]) / scales[c, s]``."""

    means: torch.Tensor  # [C, D]
    directions: torch.Tensor  # [C, S, D]
    scales: torch.Tensor  # [C, S]

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def num_subclasses(self) -> int:
        return self.directions.shape[1]

    def coordinates(self, emb: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [N, C, S]`` standardised projection coordinates of every class's subspace."""
        e = emb.to(self.means.dtype)
        z = torch.einsum("nd,csd->ncs", e, self.directions) - torch.einsum("cd,csd->cs", self.means, self.directions)
        return z / self.scales


def fit_lelp_projection(
    teacher_emb: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, num_subclasses: int, *, seed: int = 0
) -> LELPProjection:
    """Build LELP's pseudo-subclass projections (Loo et al. 2024) from teacher final-layer embeddings.

    For each class: centre its embeddings, project them onto the null space of the teacher's output weights
    ``head_weight [C, D]`` (removing what the logits already express), keep the top ``num_subclasses`` principal
    directions, and mix them with a seeded random rotation so the variance is spread across the directions.
    Coordinates are standardised per direction (``scales``), so the subclass temperature is unit-free.
    A class with fewer than 2 examples gets (deterministic) random null-space directions.
    """
    if num_subclasses < 1:
        raise ValueError(f"num_subclasses must be >= 1, got {num_subclasses}")
    e = teacher_emb.detach().double()
    w = head_weight.detach().double().to(e.device)
    if e.dim() != 2 or w.dim() != 2 or w.shape[1] != e.shape[1]:
        raise ValueError(f"teacher_emb must be [N, D] and head_weight [C, D]; got {tuple(e.shape)}, {tuple(w.shape)}")
    c_count, d = w.shape
    if num_subclasses > d - c_count:
        raise ValueError(
            f"num_subclasses={num_subclasses} exceeds the null-space dimension {d - c_count} of the "
            "teacher head; use fewer subclasses."
        )
    null = torch.eye(d, dtype=e.dtype) - torch.linalg.pinv(w) @ w  # projector onto the null space of W
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels).reshape(-1)
    means, dirs, scales = [], [], []
    for c in range(c_count):
        xc = e[y == c]
        mean = xc.mean(0) if xc.shape[0] else torch.zeros(d, dtype=e.dtype)
        if xc.shape[0] >= 2:
            xn = (xc - mean) @ null
            v = torch.linalg.svd(xn, full_matrices=False).Vh[:num_subclasses]
            if v.shape[0] < num_subclasses:
                v = torch.cat([v, torch.randn(num_subclasses - v.shape[0], d, generator=g, dtype=e.dtype) @ null])
        else:
            v = torch.randn(num_subclasses, d, generator=g, dtype=e.dtype) @ null
        rot = torch.linalg.qr(torch.randn(num_subclasses, num_subclasses, generator=g, dtype=e.dtype)).Q
        v = rot @ v
        coords = (xc - mean) @ v.T if xc.shape[0] >= 2 else torch.ones(1, num_subclasses, dtype=e.dtype)
        sc = coords.std(0, unbiased=False) if xc.shape[0] >= 2 else torch.ones(num_subclasses, dtype=e.dtype)
        means.append(mean)
        dirs.append(v)
        scales.append(sc.clamp_min(1e-8))
    return LELPProjection(torch.stack(means), torch.stack(dirs), torch.stack(scales))


def lelp_teacher_log_probs(
    teacher_emb,
    teacher_logits,
    projection: LELPProjection,
    *,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher pseudo-subclass log-probabilities ``[N, C*S]`` (class-major: index ``c * S + s``).

    Choice (the paper's combination of class probability and subclass softmax, and its temperature, are
    unverified): ``p(c, s) = softmax(t/T)_c * softmax_s(z[c, :] / subclass_T)``, i.e. the teacher's class probability
    split over the class's subclasses, so subclass probabilities always sum to the teacher's class marginal.
    """
    dtype = compute_dtype(teacher_logits)
    log_pc = torch.log_softmax(teacher_logits.to(dtype) / temperature, -1)
    z = projection.coordinates(teacher_emb.to(log_pc.device)).to(dtype)
    if z.shape[1] != log_pc.shape[-1]:
        raise ValueError(f"projection has {z.shape[1]} classes but the teacher logits have {log_pc.shape[-1]}")
    log_ps = torch.log_softmax(z / subclass_temperature, -1)
    return (log_pc.unsqueeze(-1) + log_ps).reshape(log_pc.shape[0], -1)


def subclass_to_class_logits(subclass_logits: torch.Tensor, num_subclasses: int) -> torch.Tensor:
    """``[N, C*S] -> [N, C]`` class logits (log of summed subclass probabilities, up to a shared constant)."""
    n, cs = subclass_logits.shape
    if cs % num_subclasses:
        raise ValueError(f"{cs} subclass logits are not a multiple of num_subclasses={num_subclasses}")
    return torch.logsumexp(subclass_logits.reshape(n, cs // num_subclasses, num_subclasses), -1)


def lelp_loss(
    student_subclass_logits,
    teacher_emb,
    teacher_logits,
    projection: LELPProjection,
    *,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
    labels=None,
    alpha: float = 0.0,
    num_items_in_batch=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """LELP distillation: ``(1 - alpha) T^2 KL(p_T(c, s) || q_S(c, s)) + alpha CE(class(q_S), labels)``.

    The student has a ``C*S``-way head (``student_subclass_logits [N, C*S]``, class-major); its class prediction is
    :func:`subclass_to_class_logits`. The paper mostly uses ``alpha=0`` (pure distillation), the default here.
    With ``S = 1`` this is exactly vanilla KD (:func:`~kd_plugins.losses.kl_divergence`).
    """
    n, cs = student_subclass_logits.shape
    if cs != projection.num_classes * projection.num_subclasses:
        raise ValueError(
            f"student head has {cs} outputs; LELP needs num_classes * num_subclasses = "
            f"{projection.num_classes} * {projection.num_subclasses}"
        )
    dtype = compute_dtype(student_subclass_logits)
    log_p = lelp_teacher_log_probs(
        teacher_emb,
        teacher_logits.to(dtype),
        projection,
        temperature=temperature,
        subclass_temperature=subclass_temperature,
    ).to(student_subclass_logits.device)
    log_q = torch.log_softmax(student_subclass_logits.to(dtype) / temperature, -1)
    per_row = kl_rows(log_p, log_q) * temperature**2 * (1.0 - alpha)
    valid = torch.ones(n, dtype=torch.bool, device=per_row.device)
    if alpha > 0:
        if labels is None:
            raise ValueError("lelp_loss with alpha > 0 needs labels for the CE term")
        class_logits = subclass_to_class_logits(student_subclass_logits.to(dtype), projection.num_subclasses)
        per_row = per_row + alpha * F.cross_entropy(class_logits, labels.to(class_logits.device), reduction="none")
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


@register_loss("lelp", kind="logits", function=lelp_loss)
class LELPLoss(nn.Module):
    """LELP: KD onto teacher pseudo-subclasses from null-space projections of teacher embeddings."""

    def __init__(
        self,
        projection: LELPProjection,
        temperature: float = 1.0,
        subclass_temperature: float = 1.0,
        alpha: float = 0.0,
    ):
        super().__init__()
        self.register_buffer("means", projection.means)
        self.register_buffer("directions", projection.directions)
        self.register_buffer("scales", projection.scales)
        self.temperature, self.subclass_temperature, self.alpha = temperature, subclass_temperature, alpha

    def forward(self, student_subclass_logits, teacher_logits, *, teacher_emb, labels=None, **_):
        proj = LELPProjection(self.means, self.directions, self.scales)
        return lelp_loss(
            student_subclass_logits,
            teacher_emb,
            teacher_logits,
            proj,
            temperature=self.temperature,
            subclass_temperature=self.subclass_temperature,
            labels=labels,
            alpha=self.alpha,
        )
