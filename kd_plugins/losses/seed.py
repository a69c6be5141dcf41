"""The remaining seed-paper objectives: SinKD, MI-alpha, DAC-KL, LELP, MDCS, TinyCLIP affinity, Hybrid Distill.

Conventions follow :mod:`kd_plugins.losses.logit` / :mod:`~kd_plugins.losses.feature`: tensors first, keyword-only
hyper-parameters, ``labels``/``mask`` select valid rows, float64 in -> float64 compute, ``ValueError`` naming the
problem and the fix. Several of these papers have no public code; where the research note
(``../shared/research/losses.md`` §5, §8, §9, §11, §12, §14, §24) marks a detail unverified, the docstring says
which choice is made here, and ``tests/test_seed_losses.py`` pins it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import IGNORE_INDEX, compute_dtype, kl_rows, reduce_rows, rows, valid_mask
from .feature import FeatureProjector, _project, affinity_kl, attention_kl
from .registry import register_loss

__all__ = [
    "sinkhorn_loss",
    "mi_alpha_loss",
    "dac_kl_loss",
    "DACBoundsNet",
    "LELPProjection",
    "fit_lelp_projection",
    "lelp_teacher_log_probs",
    "lelp_loss",
    "subclass_to_class_logits",
    "mdcs_logit_adjust",
    "mdcs_consistency_loss",
    "mdcs_loss",
    "mdcs_cs_weight",
    "tinyclip_affinity_loss",
    "token_relations",
    "redundant_token_keep_mask",
    "token_keep_schedule",
    "hybrid_distill_loss",
]


def _pair_rows(student_logits, teacher_logits, labels, mask, ignore_index):
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(getattr(teacher_logits, 'shape', ()))} must have the same shape (same rows and vocabulary)."
        )
    valid = valid_mask(student_logits.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index,
                       device=student_logits.device)
    dtype = compute_dtype(student_logits)
    s = rows(student_logits, valid).to(dtype)
    t = rows(teacher_logits, valid).to(s.device, dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("teacher logits contain NaN/inf at valid rows; fix the teacher or mask those rows out.")
    return s, t, valid


# --------------------------------------------------------------------------------------------------------------------
# SinKD
# --------------------------------------------------------------------------------------------------------------------

def sinkhorn_loss(student_logits, teacher_logits, *, temperature: float = 2.0, epsilon: float = 0.1,
                  n_iters: int = 20, labels=None, mask=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------------------------------
# Distiller MI-alpha
# --------------------------------------------------------------------------------------------------------------------

def mi_alpha_loss(student_hidden, teacher_hidden, *, alpha: float = 0.5, temperature: float = 0.1, projector=None,
                  log_baseline=0.0, mask=None, labels=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Negative interpolated MI lower bound ``-I_alpha`` (Poole et al. 2019) between student and teacher features.

    Used by Distiller (He et al. 2021) for intermediate-representation KD; the critic form and the baseline are not
    published in code (research note §8, §24.5). Choices made here:

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


# --------------------------------------------------------------------------------------------------------------------
# MGSR DAC-KL
# --------------------------------------------------------------------------------------------------------------------

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
            self.net[2].bias.copy_(torch.tensor([math.log(init_upper / (1 - init_upper)),
                                                 math.log(init_lower / (1 - init_lower))]))

    def forward(self, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(self.top_k, teacher_probs.shape[-1])
        top = teacher_probs.detach().topk(k, dim=-1).values
        if k < self.top_k:
            top = F.pad(top, (0, self.top_k - k))
        w = self.net[0].weight
        out = self.net(top.to(w.dtype)).to(teacher_probs.dtype)
        return torch.sigmoid(out[..., 0]), torch.sigmoid(out[..., 1])


def dac_kl_loss(student_logits, teacher_logits, *, upper=None, lower=None, bounds_net=None, sharpness: float = 0.02,
                keep_labels: bool = True, temperature: float = 1.0, labels=None, mask=None,
                ignore_index: int = IGNORE_INDEX, num_items_in_batch=None, reduction: str = "mean") -> torch.Tensor:
    """Distribution-adaptive clipping KL (MGSR's DAC-KL, Liu et al.): forward KL on the teacher's high-density band.

    The paper's exact parameterisation is unverified (research note §9, §24.3). Choices made here:

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


# --------------------------------------------------------------------------------------------------------------------
# LELP
# --------------------------------------------------------------------------------------------------------------------

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
        z = torch.einsum("nd,csd->ncs", e, self.directions) - torch.einsum("cd,csd->cs", self.means,
                                                                         self.directions)
        return z / self.scales


def fit_lelp_projection(teacher_emb: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                        num_subclasses: int, *, seed: int = 0) -> LELPProjection:
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
        raise ValueError(f"teacher_emb must be [N, D] and head_weight [C, D]; got {tuple(e.shape)}, "
                         f"{tuple(w.shape)}")
    c_count, d = w.shape
    if num_subclasses > d - c_count:
        raise ValueError(f"num_subclasses={num_subclasses} exceeds the null-space dimension {d - c_count} of the "
                         "teacher head; use fewer subclasses.")
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


def lelp_teacher_log_probs(teacher_emb, teacher_logits, projection: LELPProjection, *, temperature: float = 1.0,
                           subclass_temperature: float = 1.0) -> torch.Tensor:
    """Teacher pseudo-subclass log-probabilities ``[N, C*S]`` (class-major: index ``c * S + s``).

    Choice (research note §11, §24.4 unverified): ``p(c, s) = softmax(t/T)_c * softmax_s(z[c, :] / subclass_T)``,
    i.e. the teacher's class probability split over the class's subclasses, so subclass probabilities always sum to
    the teacher's class marginal.
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


def lelp_loss(student_subclass_logits, teacher_emb, teacher_logits, projection: LELPProjection, *,
              temperature: float = 1.0, subclass_temperature: float = 1.0, labels=None, alpha: float = 0.0,
              num_items_in_batch=None, reduction: str = "mean") -> torch.Tensor:
    """LELP distillation: ``(1 - alpha) T^2 KL(p_T(c, s) || q_S(c, s)) + alpha CE(class(q_S), labels)``.

    The student has a ``C*S``-way head (``student_subclass_logits [N, C*S]``, class-major); its class prediction is
    :func:`subclass_to_class_logits`. The paper mostly uses ``alpha=0`` (pure distillation), the default here.
    With ``S = 1`` this is exactly vanilla KD (:func:`~kd_plugins.losses.kl_divergence`).
    """
    n, cs = student_subclass_logits.shape
    if cs != projection.num_classes * projection.num_subclasses:
        raise ValueError(f"student head has {cs} outputs; LELP needs num_classes * num_subclasses = "
                         f"{projection.num_classes} * {projection.num_subclasses}")
    dtype = compute_dtype(student_subclass_logits)
    log_p = lelp_teacher_log_probs(teacher_emb, teacher_logits.to(dtype), projection, temperature=temperature,
                                   subclass_temperature=subclass_temperature).to(student_subclass_logits.device)
    log_q = torch.log_softmax(student_subclass_logits.to(dtype) / temperature, -1)
    per_row = kl_rows(log_p, log_q) * temperature**2 * (1.0 - alpha)
    valid = torch.ones(n, dtype=torch.bool, device=per_row.device)
    if alpha > 0:
        if labels is None:
            raise ValueError("lelp_loss with alpha > 0 needs labels for the CE term")
        class_logits = subclass_to_class_logits(student_subclass_logits.to(dtype), projection.num_subclasses)
        per_row = per_row + alpha * F.cross_entropy(class_logits, labels.to(class_logits.device), reduction="none")
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


# --------------------------------------------------------------------------------------------------------------------
# MDCS
# --------------------------------------------------------------------------------------------------------------------

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


def mdcs_consistency_loss(weak_logits, strong_logits, labels=None, *, temperature: float = 1.0,
                          confident_only: bool = True) -> torch.Tensor:
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


def mdcs_loss(weak_logits, strong_logits, labels, *, class_counts, lambdas: Sequence[float] = (-0.5, 1.0, 2.5),
              cs_weight: float = 0.6, temperature: float = 1.0, return_parts: bool = False):
    """Full MDCS objective: diversity-adjusted CE of every expert on both views + ``cs_weight`` * consistency.

    Expert ``e``'s logits are adjusted by ``lambdas[e] * log(n_c)`` (repo: -0.5 head, 1 medium, 2.5 tail expert)
    and its CE is averaged over both views' samples; CE terms are summed over experts. The consistency term
    (:func:`mdcs_consistency_loss`) uses the same adjusted logits (choice: each expert distils its own training
    distribution; the repo note does not say). Scale ``cs_weight`` by :func:`mdcs_cs_weight` for the repo's warm-up.
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


# --------------------------------------------------------------------------------------------------------------------
# TinyCLIP
# --------------------------------------------------------------------------------------------------------------------

def tinyclip_affinity_loss(student_image, student_text, teacher_image, teacher_text, *, logit_scale: float = 50.0,
                           include_teacher_entropy: bool = False, num_items_in_batch=None) -> torch.Tensor:
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
    i2t = affinity_kl(student_image, teacher_image, student_keys=student_text, teacher_keys=teacher_text,
                      temperature=tau, num_items_in_batch=num_items_in_batch)
    t2i = affinity_kl(student_text, teacher_text, student_keys=student_image, teacher_keys=teacher_image,
                      temperature=tau, num_items_in_batch=num_items_in_batch)
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


# --------------------------------------------------------------------------------------------------------------------
# Hybrid Distill
# --------------------------------------------------------------------------------------------------------------------

def token_relations(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Token relation maps ``softmax(q k^T / sqrt(d))`` for ``[B, H, T, d]`` queries/keys -> ``[B, H, T, T]``."""
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [batch, heads, tokens, head_dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


def redundant_token_keep_mask(teacher_attn: torch.Tensor, keep_ratio: float, *, attention_mask=None,
                              keep_first: bool = True) -> torch.Tensor:
    """Progressive redundant-token masking: keep the ``keep_ratio`` most-attended tokens per sample ``[B, T]`` bool.

    Importance of token ``j`` = attention it receives, averaged over heads and (valid) query rows of the teacher's
    map ``[B, H, T, T]`` (choice; the paper's exact criterion is unverified). The first token (CLS) is always kept
    with ``keep_first``; padding is never kept.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    b, _, tq, tk = teacher_attn.shape
    am = torch.ones(b, tk, dtype=torch.bool, device=teacher_attn.device) if attention_mask is None \
        else attention_mask.bool().to(teacher_attn.device)
    qw = am.to(teacher_attn.dtype)[:, None, :, None]
    imp = (teacher_attn * qw).sum((1, 2)) / (qw.sum((1, 2)) * teacher_attn.shape[1]).clamp_min(1)
    imp = torch.where(am, imp, torch.full_like(imp, float("-inf")))
    if keep_first:
        imp[:, 0] = float("inf")
    n_keep = torch.ceil(am.sum(-1).to(torch.float64) * keep_ratio).long().clamp_min(1)
    order = imp.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(tk, device=order.device).expand_as(order))
    return (rank < n_keep.unsqueeze(-1)) & am


def token_keep_schedule(step: int, total_steps: int, final_keep: float = 0.5) -> float:
    """Linearly decreasing keep ratio: 1 at step 0 to ``final_keep`` at ``total_steps`` (progressive masking)."""
    if total_steps <= 0:
        return final_keep
    return 1.0 - (1.0 - final_keep) * min(max(step, 0) / total_steps, 1.0)


def hybrid_distill_loss(student_relations: Sequence[torch.Tensor], teacher_relations: Sequence[torch.Tensor],
                        student_features: torch.Tensor | None = None, teacher_features: torch.Tensor | None = None, *,
                        alpha: float = 1.0, beta: float = 1.0, projector=None, attention_mask=None, token_keep=None,
                        head_reduction: str = "mean", return_parts: bool = False):
    """Hybrid Distill (Shi et al. ICLR 2024): ``alpha * L_rel + beta * L_feat`` (alpha = beta = 1 [S]).

    * ``L_rel``: token-relation imitation of the MIM teacher (e.g. MAE): ``KL(R_T || R_S)`` per query row
      (:func:`~kd_plugins.losses.attention_kl`), averaged over the given layer pairs. Relations are attention maps
      ``[B, H, T, T]`` (:func:`token_relations` from q/k). The layer set is the caller's choice (unverified in the
      paper; a uniform student->teacher layer map is a sound default).
    * ``L_feat``: smooth-L1 between the student's (projected) final features and the discriminative teacher's
      (DeiT/CLIP) features ``[B, T, D]``, averaged over channels and tokens.
    * ``token_keep [B, T]`` (:func:`redundant_token_keep_mask`) removes masked redundant tokens from both terms.
    """
    if len(student_relations) != len(teacher_relations) or not student_relations:
        raise ValueError("pass the same (non-zero) number of student and teacher relation maps (one per layer pair)")
    keep = attention_mask.bool() if attention_mask is not None else None
    if token_keep is not None:
        keep = token_keep.bool() if keep is None else keep & token_keep.bool().to(keep.device)
    rel = sum(attention_kl(s, t, attention_mask=keep, head_reduction=head_reduction)
              for s, t in zip(student_relations, teacher_relations)) / len(student_relations)
    feat = rel.new_zeros(())
    if beta and student_features is not None:
        if teacher_features is None:
            raise ValueError("student_features given without teacher_features")
        s = _project(student_features, teacher_features, projector)
        valid = valid_mask(s.shape[:-1], mask=keep, device=s.device)
        sr = rows(s, valid).to(compute_dtype(s))
        tr = rows(teacher_features, valid).to(sr.device, sr.dtype)
        feat = reduce_rows(F.smooth_l1_loss(sr, tr, reduction="none").mean(-1), valid).to(rel.dtype)
    total = alpha * rel + beta * feat
    return (total, rel, feat) if return_parts else total


# --------------------------------------------------------------------------------------------------------------------
# nn.Module forms
# --------------------------------------------------------------------------------------------------------------------

@register_loss("sinkhorn", kind="logits", function=sinkhorn_loss, aliases=("sinkd",))
class SinkhornLoss(nn.Module):
    """SinKD batch-wise Sinkhorn (entropic OT) distance between student and teacher class distributions."""

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, n_iters: int = 20,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.kw = dict(temperature=temperature, epsilon=epsilon, n_iters=n_iters, ignore_index=ignore_index)

    def forward(self, student_logits, teacher_logits, *, labels=None, mask=None, **_):
        return sinkhorn_loss(student_logits, teacher_logits, labels=labels, mask=mask, **self.kw)


@register_loss("mi_alpha", kind="hidden", function=mi_alpha_loss, aliases=("distiller_mi",))
class MIAlphaLoss(nn.Module):
    """Distiller's MI-alpha: negative interpolated MI bound with a learned critic projection and baseline."""

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, alpha: float = 0.5,
                 temperature: float = 0.1, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.alpha, self.temperature, self.ignore_index = alpha, temperature, ignore_index
        self.projector = FeatureProjector(student_dim, teacher_dim) if student_dim and teacher_dim and \
            student_dim != teacher_dim else None
        self.log_baseline = nn.Parameter(torch.zeros(()))

    def forward(self, student_hidden, teacher_hidden, *, mask=None, labels=None, **_):
        return mi_alpha_loss(student_hidden, teacher_hidden, alpha=self.alpha, temperature=self.temperature,
                             projector=self.projector, log_baseline=self.log_baseline, mask=mask, labels=labels,
                             ignore_index=self.ignore_index)


@register_loss("dac_kl", kind="logits", function=dac_kl_loss, aliases=("mgsr_dac_kl",))
class DACKLLoss(nn.Module):
    """MGSR DAC-KL: forward KL on a teacher high-density band predicted by a small learned network."""

    def __init__(self, top_k: int = 32, hidden: int = 64, sharpness: float = 0.02, keep_labels: bool = True,
                 temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        super().__init__()
        self.bounds_net = DACBoundsNet(top_k=top_k, hidden=hidden)
        self.kw = dict(sharpness=sharpness, keep_labels=keep_labels, temperature=temperature,
                       ignore_index=ignore_index, reduction=reduction)

    def forward(self, student_logits, teacher_logits, *, labels=None, mask=None, num_items_in_batch=None, **_):
        return dac_kl_loss(student_logits, teacher_logits, bounds_net=self.bounds_net, labels=labels, mask=mask,
                           num_items_in_batch=num_items_in_batch, **self.kw)


@register_loss("lelp", kind="logits", function=lelp_loss)
class LELPLoss(nn.Module):
    """LELP: KD onto teacher pseudo-subclasses from null-space projections of teacher embeddings."""

    def __init__(self, projection: LELPProjection, temperature: float = 1.0, subclass_temperature: float = 1.0,
                 alpha: float = 0.0):
        super().__init__()
        self.register_buffer("means", projection.means)
        self.register_buffer("directions", projection.directions)
        self.register_buffer("scales", projection.scales)
        self.temperature, self.subclass_temperature, self.alpha = temperature, subclass_temperature, alpha

    def forward(self, student_subclass_logits, teacher_logits, *, teacher_emb, labels=None, **_):
        proj = LELPProjection(self.means, self.directions, self.scales)
        return lelp_loss(student_subclass_logits, teacher_emb, teacher_logits, proj, temperature=self.temperature,
                         subclass_temperature=self.subclass_temperature, labels=labels, alpha=self.alpha)


@register_loss("mdcs", kind="logits", function=mdcs_loss)
class MDCSLoss(nn.Module):
    """MDCS: diverse logit-adjusted experts + consistency self-distillation on confident instances."""

    def __init__(self, class_counts, lambdas: Sequence[float] = (-0.5, 1.0, 2.5), cs_weight: float = 0.6,
                 temperature: float = 1.0):
        super().__init__()
        self.register_buffer("class_counts", torch.as_tensor(class_counts, dtype=torch.float32))
        self.lambdas, self.cs_weight, self.temperature = tuple(lambdas), cs_weight, temperature

    def forward(self, weak_logits, strong_logits, *, labels, cs_weight: float | None = None, **_):
        return mdcs_loss(weak_logits, strong_logits, labels, class_counts=self.class_counts, lambdas=self.lambdas,
                         cs_weight=self.cs_weight if cs_weight is None else cs_weight, temperature=self.temperature)


@register_loss("tinyclip_affinity", kind="embedding", function=tinyclip_affinity_loss, aliases=("tinyclip",))
class TinyCLIPAffinityLoss(nn.Module):
    """TinyCLIP affinity mimicking: bidirectional image<->text in-batch affinity KL (wraps affinity_kl)."""

    def __init__(self, logit_scale: float = 50.0, include_teacher_entropy: bool = False):
        super().__init__()
        self.logit_scale, self.include_teacher_entropy = logit_scale, include_teacher_entropy

    def forward(self, student_image, student_text, teacher_image, teacher_text, **_):
        return tinyclip_affinity_loss(student_image, student_text, teacher_image, teacher_text,
                                      logit_scale=self.logit_scale,
                                      include_teacher_entropy=self.include_teacher_entropy)


@register_loss("hybrid_distill", kind="attention", function=hybrid_distill_loss, aliases=("hybrid",))
class HybridDistillLoss(nn.Module):
    """Hybrid Distill: token-relation imitation (MIM teacher) + feature regression (discriminative teacher)."""

    def __init__(self, student_dim: int | None = None, teacher_dim: int | None = None, alpha: float = 1.0,
                 beta: float = 1.0, head_reduction: str = "mean"):
        super().__init__()
        self.alpha, self.beta, self.head_reduction = alpha, beta, head_reduction
        self.projector = FeatureProjector(student_dim, teacher_dim) if student_dim and teacher_dim and \
            student_dim != teacher_dim else None

    def forward(self, student_relations, teacher_relations, student_features=None, teacher_features=None, *,
                attention_mask=None, token_keep=None, **_):
        return hybrid_distill_loss(student_relations, teacher_relations, student_features, teacher_features,
                                   alpha=self.alpha, beta=self.beta, projector=self.projector,
                                   attention_mask=attention_mask, token_keep=token_keep,
                                   head_reduction=self.head_reduction)
