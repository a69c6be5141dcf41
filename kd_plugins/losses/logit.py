"""Logit-level distillation losses (reference PyTorch implementations).

All functions share one calling convention::

    loss(student_logits, teacher_logits=None, *, labels=None, mask=None, temperature=1.0,
         num_items_in_batch=None, teacher_topk=None, topk_tail="bucket", reduction="mean",
         ignore_index=-100, **hyper_parameters)

* ``student_logits`` / ``teacher_logits``: ``[..., V]`` (e.g. ``[B, T, V]`` for LMs, ``[B, C]`` for classifiers).
  For causal LMs pass logits and labels already aligned (``logits[:, :-1]`` with ``labels[:, 1:]``).
* ``labels`` (``[...]``): rows whose label is ``ignore_index`` are excluded; DKD also uses them as targets.
* ``mask`` (``[...]``, bool): rows to keep (e.g. an attention mask) when there are no labels.
* ``num_items_in_batch``: divide the summed loss by this count instead of the local number of valid rows, so that
  gradient accumulation gives the same gradient as one large batch (the HF Trainer passes it).
* ``teacher_topk = (indices, log_probs)``: sparse teacher signal, see :func:`~kd_plugins.losses._common.log_prob_pair`.

Divergences are computed per row in float32 (float64 if the inputs are float64), summed over the vocabulary and
averaged over valid rows. The KL-family losses are multiplied by ``T**2`` (Hinton et al.) so that gradient
magnitudes stay comparable across temperatures; TVD is not (it is a bounded distance; DistiLLM convention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ._common import (
    IGNORE_INDEX,
    compute_dtype,
    kl_rows,
    log1mexp,
    log_mix,
    log_prob_pair,
    reduce_rows,
    rows,
    valid_mask,
)
from .registry import register_loss

__all__ = [
    "kl_divergence",
    "reverse_kl_divergence",
    "generalized_jsd",
    "skew_kl_divergence",
    "skew_reverse_kl_divergence",
    "total_variation_distance",
    "soft_cross_entropy",
    "dkd_loss",
    "ofa_loss",
    "OFALoss",
    "logit_mse",
]


def _logit_loss(
    row_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    num_items_in_batch,
    teacher_topk,
    topk_tail: str,
    reduction: str,
    ignore_index: int,
    t2_scale: bool,
) -> torch.Tensor:
    prefix = student_logits.shape[:-1]
    valid = valid_mask(prefix, labels=labels, mask=mask, ignore_index=ignore_index, device=student_logits.device)
    s = rows(student_logits, valid)
    t = rows(teacher_logits, valid) if teacher_logits is not None else None
    topk = None
    if teacher_topk is not None:
        from ._common import check_topk

        idx, lp = check_topk(teacher_topk, student_logits.shape[-1], prefix)
        topk = (rows(idx, valid), rows(lp, valid))
    log_p, log_q = log_prob_pair(s, t, temperature=temperature, teacher_topk=topk, topk_tail=topk_tail)
    per_row = row_fn(log_p, log_q)
    if t2_scale:
        per_row = per_row * (temperature**2)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def kl_divergence(
    student_logits,
    teacher_logits=None,
    *,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Forward KL ``T^2 * KL(p_T || q_S)`` at temperature ``T`` (Hinton KD; mode-covering)."""
    return _logit_loss(
        kl_rows,
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def reverse_kl_divergence(
    student_logits,
    teacher_logits=None,
    *,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Reverse KL ``T^2 * KL(q_S || p_T)`` (MiniLLM's token-level objective; mode-seeking)."""
    return _logit_loss(
        lambda lp, lq: kl_rows(lq, lp),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def _jsd_rows(beta: float):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")

    def fn(log_p, log_q):
        # TRL/GKD convention: beta=0 -> forward KL, beta=1 -> reverse KL (the generalised JSD itself vanishes there).
        if beta == 0.0:
            return kl_rows(log_p, log_q)
        if beta == 1.0:
            return kl_rows(log_q, log_p)
        log_m = log_mix(log_p, log_q, beta)
        return beta * kl_rows(log_p, log_m) + (1.0 - beta) * kl_rows(log_q, log_m)

    return fn


def generalized_jsd(
    student_logits,
    teacher_logits=None,
    *,
    beta: float = 0.5,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Generalised JSD (GKD): ``beta*KL(p||m) + (1-beta)*KL(q||m)``, ``m = beta*p + (1-beta)*q``.

    ``beta=0`` and ``beta=1`` are special-cased to forward and reverse KL (TRL's convention).
    """
    return _logit_loss(
        _jsd_rows(beta),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def _check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"skew lambda must lie in [0, 1], got {lam}")


def skew_kl_divergence(
    student_logits,
    teacher_logits=None,
    *,
    skew: float = 0.1,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Skew KL (DistiLLM): ``KL(p || skew*p + (1-skew)*q)``. A true KL (0 at identity), unlike DistiLLM's repo,
    which adds the teacher entropy. ``skew=0`` is forward KL, ``skew=1`` is 0."""
    _check_lambda(skew)
    return _logit_loss(
        lambda lp, lq: kl_rows(lp, log_mix(lp, lq, skew)),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def skew_reverse_kl_divergence(
    student_logits,
    teacher_logits=None,
    *,
    skew: float = 0.1,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): ``KL(q || skew*q + (1-skew)*p)``; ``skew=0`` is reverse KL."""
    _check_lambda(skew)
    return _logit_loss(
        lambda lp, lq: kl_rows(lq, log_mix(lq, lp, skew)),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def total_variation_distance(
    student_logits,
    teacher_logits=None,
    *,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = False,
) -> torch.Tensor:
    """Total variation ``0.5 * sum |p - q|`` (DistillSpec: ``1 - TVD`` is the speculative acceptance rate).
    Not T^2-scaled by default."""
    return _logit_loss(
        lambda lp, lq: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def soft_cross_entropy(
    student_logits,
    teacher_logits=None,
    *,
    labels=None,
    mask=None,
    temperature: float = 1.0,
    num_items_in_batch=None,
    teacher_topk=None,
    topk_tail: str = "bucket",
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Soft-target cross-entropy ``-T^2 * sum p log q`` = forward KL + teacher entropy (LLaVA-MoD "mimic").
    Not 0 at identity, but its gradient is."""
    return _logit_loss(
        lambda lp, lq: -(lp.exp() * lq).sum(-1),
        student_logits,
        teacher_logits,
        labels=labels,
        mask=mask,
        temperature=temperature,
        num_items_in_batch=num_items_in_batch,
        teacher_topk=teacher_topk,
        topk_tail=topk_tail,
        reduction=reduction,
        ignore_index=ignore_index,
        t2_scale=t2_scale,
    )


def _class_rows(name: str, student_logits, teacher_logits, labels, mask, ignore_index: int, temperature: float):
    """Valid rows of both logits (divided by ``temperature``), their target classes ``[N, 1]`` and the row mask."""
    prefix = student_logits.shape[:-1]
    valid = valid_mask(prefix, labels=labels, mask=mask, ignore_index=ignore_index, device=student_logits.device)
    dtype = compute_dtype(student_logits)
    s = rows(student_logits, valid).to(dtype) / temperature
    t = rows(teacher_logits, valid).to(s.device, dtype) / temperature
    y = labels.reshape(-1)[valid.reshape(-1)].to(s.device).long().unsqueeze(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= s.shape[-1]):
        raise ValueError(f"{name} labels must lie in [0, {s.shape[-1]}); got max {int(y.max())}")
    return s, t, y, valid


def dkd_loss(
    student_logits,
    teacher_logits,
    *,
    labels,
    alpha: float = 1.0,
    beta: float = 8.0,
    mask=None,
    temperature: float = 4.0,
    num_items_in_batch=None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    return_parts: bool = False,
):
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, both ``T^2``-scaled.

    TCKD is the KL between binary (target vs rest) distributions; NCKD the KL between the distributions
    renormalised over the non-target classes. ``labels`` are the target classes (rows with ``ignore_index``
    are skipped). Defaults are mdistiller's CIFAR-100 values (alpha=1, beta=8, T=4). With ``return_parts`` the
    function returns ``(loss, tckd, nckd)``.
    """
    if labels is None:
        raise ValueError("dkd_loss needs labels (the target class of every row): DKD splits target/non-target mass.")
    s, t, y, valid = _class_rows("dkd_loss", student_logits, teacher_logits, labels, mask, ignore_index, temperature)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    ls_y, lt_y = ls.gather(-1, y), lt.gather(-1, y)
    b_s = torch.cat([ls_y, log1mexp(ls_y)], -1)
    b_t = torch.cat([lt_y, log1mexp(lt_y)], -1)
    tckd = kl_rows(b_t, b_s)
    # Non-target distributions: drop the target column by pushing it to -inf, then renormalise.
    neg = torch.zeros_like(s).scatter_(-1, y, float("-inf"))
    nckd = kl_rows(torch.log_softmax(t + neg, -1), torch.log_softmax(s + neg, -1))
    t2 = temperature**2
    tckd, nckd = tckd * t2, nckd * t2
    loss = reduce_rows(alpha * tckd + beta * nckd, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)
    if return_parts:
        return (
            loss,
            reduce_rows(tckd, valid, reduction=reduction, num_items_in_batch=num_items_in_batch),
            reduce_rows(nckd, valid, reduction=reduction, num_items_in_batch=num_items_in_batch),
        )
    return loss


def ofa_loss(
    student_logits,
    teacher_logits,
    *,
    labels,
    eps: float = 1.0,
    temperature: float = 1.0,
    mask=None,
    num_items_in_batch=None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """OFA-KD's adaptive target-enhancement loss (Hao et al., NeurIPS 2023), repository form.

    With teacher probabilities ``p = softmax(t / T)``, student ``q = softmax(z / T)``, target class ``y`` and
    exponent ``eps`` (the paper's gamma)::

        l_OFA(z) = - sum_c w_c log q_c,   w_y = (1 + p_y) ** eps - 1,   w_c = p_c ** eps  (c != y)

    With ``eps = 1`` it is the plain soft-target cross-entropy; larger ``eps`` amplifies the target class when the
    teacher is confident. ``labels`` are class indices ``[B]`` (rows equal to ``ignore_index`` are skipped);
    averaged over valid rows and not ``T^2``-scaled (the paper uses ``T = 1``). The exit branches OFA-KD trains
    with it are in :mod:`kd_plugins.vision.ofa`.
    """
    if labels is None:
        raise ValueError("ofa_loss needs labels: the target class receives the enhanced weight (1 + p_y)^eps - 1.")
    if eps <= 0:
        raise ValueError(f"ofa_loss eps must be > 0, got {eps}")
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"ofa_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{None if teacher_logits is None else tuple(teacher_logits.shape)} must have the same shape "
            "(same number of classes)."
        )
    s, t, y, valid = _class_rows("ofa_loss", student_logits, teacher_logits, labels, mask, ignore_index, temperature)
    p_t = torch.softmax(t, -1).detach()
    w = p_t.pow(eps)
    w_y = (1.0 + p_t.gather(-1, y)).pow(eps) - 1.0
    w = w.scatter(-1, y, w_y)
    per_row = -(w * torch.log_softmax(s, -1)).sum(-1)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


def logit_mse(
    student_logits,
    teacher_logits,
    *,
    labels=None,
    mask=None,
    num_items_in_batch=None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    center: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean squared error between raw logits, averaged over the vocabulary (the T -> infinity limit of KD).

    With ``center=True`` each row is mean-centred first, making it shift invariant. ``temperature`` is accepted
    for a uniform signature and ignored.
    """
    del temperature
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"logit_mse: shapes differ {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    valid = valid_mask(
        student_logits.shape[:-1], labels=labels, mask=mask, ignore_index=ignore_index, device=student_logits.device
    )
    s = rows(student_logits, valid).to(compute_dtype(student_logits))
    t = rows(teacher_logits, valid).to(s.device, s.dtype)
    if center:
        s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    return reduce_rows((s - t).pow(2).mean(-1), valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


class _LogitLossModule(nn.Module):
    """Shared ``nn.Module`` wrapper: hyper-parameters in ``__init__``, tensors in ``forward``."""

    _fn: Callable = None  # type: ignore[assignment]
    _hparams: tuple[str, ...] = ()

    def __init__(
        self,
        temperature: float = 1.0,
        topk_tail: str = "bucket",
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        **hparams,
    ):
        super().__init__()
        unknown = set(hparams) - set(self._hparams)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameters {sorted(unknown)}; "
                f"accepted: temperature, topk_tail, ignore_index, reduction, {', '.join(self._hparams)}"
            )
        self.temperature = temperature
        self.topk_tail = topk_tail
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.hparams = hparams

    def forward(
        self, student_logits, teacher_logits=None, *, labels=None, mask=None, num_items_in_batch=None, teacher_topk=None
    ):
        return type(self)._fn(
            student_logits,
            teacher_logits,
            labels=labels,
            mask=mask,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
            teacher_topk=teacher_topk,
            topk_tail=self.topk_tail,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            **self.hparams,
        )

    def extra_repr(self) -> str:
        return ", ".join([f"temperature={self.temperature}"] + [f"{k}={v}" for k, v in self.hparams.items()])


@register_loss("kl", kind="logits", function=kl_divergence, aliases=("forward_kl", "fkl", "hinton"))
class KLDivergenceLoss(_LogitLossModule):
    """Forward KL with T^2 scaling (Hinton KD)."""

    _fn = staticmethod(kl_divergence)
    _hparams = ("t2_scale",)


@register_loss("reverse_kl", kind="logits", function=reverse_kl_divergence, aliases=("rkl",))
class ReverseKLDivergenceLoss(_LogitLossModule):
    """Reverse KL(q_S || p_T) with T^2 scaling."""

    _fn = staticmethod(reverse_kl_divergence)
    _hparams = ("t2_scale",)


@register_loss("jsd", kind="logits", function=generalized_jsd, aliases=("gkd", "generalized_jsd"))
class GeneralizedJSDLoss(_LogitLossModule):
    """Generalised Jensen-Shannon divergence JSD(beta) (GKD)."""

    _fn = staticmethod(generalized_jsd)
    _hparams = ("beta", "t2_scale")


@register_loss("skew_kl", kind="logits", function=skew_kl_divergence, aliases=("skl",))
class SkewKLLoss(_LogitLossModule):
    """Skew forward KL (DistiLLM), KL(p || lambda p + (1-lambda) q)."""

    _fn = staticmethod(skew_kl_divergence)
    _hparams = ("skew", "t2_scale")


@register_loss("skew_reverse_kl", kind="logits", function=skew_reverse_kl_divergence, aliases=("srkl",))
class SkewReverseKLLoss(_LogitLossModule):
    """Skew reverse KL (DistiLLM), KL(q || lambda q + (1-lambda) p)."""

    _fn = staticmethod(skew_reverse_kl_divergence)
    _hparams = ("skew", "t2_scale")


@register_loss("tvd", kind="logits", function=total_variation_distance, aliases=("total_variation",))
class TotalVariationLoss(_LogitLossModule):
    """Total variation distance 0.5 * sum |p - q|."""

    _fn = staticmethod(total_variation_distance)
    _hparams = ("t2_scale",)


@register_loss("soft_ce", kind="logits", function=soft_cross_entropy, aliases=("soft_cross_entropy",))
class SoftCrossEntropyLoss(_LogitLossModule):
    """Soft-target cross-entropy -sum p log q (forward KL plus teacher entropy)."""

    _fn = staticmethod(soft_cross_entropy)
    _hparams = ("t2_scale",)


@register_loss("dkd", kind="logits", function=dkd_loss, aliases=("decoupled_kd",))
class DKDLoss(nn.Module):
    """Decoupled KD: alpha * TCKD + beta * NCKD (needs target labels)."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(
        self, student_logits, teacher_logits=None, *, labels=None, mask=None, num_items_in_batch=None, teacher_topk=None
    ):
        if teacher_topk is not None or teacher_logits is None:
            raise ValueError(
                "DKD needs dense teacher logits (the non-target distribution is renormalised over all "
                "classes); a sparse top-k teacher signal is not supported."
            )
        return dkd_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            alpha=self.alpha,
            beta=self.beta,
            mask=mask,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )


@register_loss("ofa", kind="logits", function=ofa_loss, aliases=("ofa_kd", "target_enhancement"))
class OFALoss(nn.Module):
    """OFA-KD adaptive target-enhancement loss (needs labels)."""

    def __init__(
        self, eps: float = 1.0, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
    ):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"OFA eps must be > 0, got {eps}")
        self.eps, self.temperature, self.ignore_index, self.reduction = eps, temperature, ignore_index, reduction

    def forward(
        self, student_logits, teacher_logits=None, *, labels=None, mask=None, num_items_in_batch=None, teacher_topk=None
    ):
        if teacher_topk is not None:
            raise ValueError("OFA needs dense teacher logits; a sparse top-k teacher signal is not supported.")
        return ofa_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            eps=self.eps,
            mask=mask,
            temperature=self.temperature,
            num_items_in_batch=num_items_in_batch,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, temperature={self.temperature}"


@register_loss("logit_mse", kind="logits", function=logit_mse, aliases=("mse_logits",))
class LogitMSELoss(nn.Module):
    """Mean squared error between student and teacher logits."""

    def __init__(
        self, center: bool = False, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", temperature: float = 1.0
    ):
        super().__init__()
        self.center, self.ignore_index, self.reduction = center, ignore_index, reduction
        self.temperature = temperature

    def forward(
        self, student_logits, teacher_logits=None, *, labels=None, mask=None, num_items_in_batch=None, teacher_topk=None
    ):
        if teacher_topk is not None or teacher_logits is None:
            raise ValueError("logit_mse needs dense teacher logits; a sparse top-k teacher signal is not supported.")
        return logit_mse(
            student_logits,
            teacher_logits,
            labels=labels,
            mask=mask,
            num_items_in_batch=num_items_in_batch,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            center=self.center,
        )
