"""Preference distillation losses: DPO with the teacher as the reference model (LLaVA-MoD, Shu et al., ICLR 2025).

With sequence log-probabilities ``log pi(y|x)`` (summed over the completion tokens) of the student ``pi_S`` and of
the frozen teacher ``pi_T`` for a chosen answer ``y_w`` and a rejected answer ``y_l``, the implicit rewards are
``r_w = beta (log pi_S(y_w) - log pi_T(y_w))`` and ``r_l = beta (log pi_S(y_l) - log pi_T(y_l))``, and with
``h = (log pi_S(y_w) - log pi_T(y_w)) - (log pi_S(y_l) - log pi_T(y_l))``:

* ``"sigmoid"`` (DPO; the formula of the LLaVA-MoD paper): ``-log sigma(beta h)``; with label smoothing ``eps``
  (conservative DPO) ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``. ``log 2`` when student = teacher.
* ``"kto_pair"`` (what the released LLaVA-MoD script runs, ``LOSS_TYPE='kto_pair'`` of the TRL version it vendors):
  with ``z_w = log pi_S(y_w) - log pi_T(y_w)``, ``z_l`` likewise and the batch estimates
  ``KL_w = max(0, mean(z_w))``, ``KL_l = max(0, mean(z_l))``, the loss is the mean over the ``2B`` terms
  ``1 - sigma(beta (z_w - KL_l))`` and ``1 - sigma(beta (KL_w - z_l))``. The KL estimates are batch means, so
  the value of one pair depends on the rest of the batch. ``0.5`` when student = teacher.
* ``"ipo"`` (IPO, Azar et al. 2023): ``(h - 1 / (2 beta))^2``.

In the registry the loss is of kind ``"ranking"``: a preference pair is a two-candidate list whose scores are the
student's and the teacher's sequence log-probs (``[pairs, 2]``, chosen first), and DPO is a RankNet-style margin loss
on them (``"ipo"`` is Margin-MSE towards the target margin ``1 / (2 beta)``). Like the other ranking losses it takes
scores, not model outputs, so ``DistillationConfig.loss_terms`` refuses it; the HF adapter is
``kd_plugins.integrations.hf.PreferenceDistillationCallback``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import REDUCTIONS, compute_dtype
from .registry import register_loss

__all__ = ["dpo_loss", "preference_distillation_loss", "PreferenceDistillationLoss", "PREFERENCE_LOSS_FORMS"]

PREFERENCE_LOSS_FORMS = ("sigmoid", "kto_pair", "ipo")


def _check_logps(**logps: torch.Tensor) -> int:
    shapes = {name: tuple(t.shape) for name, t in logps.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(
            f"dpo_loss needs four 1-D tensors of per-sequence log-probs of one shape [pairs], got {shapes}"
        )
    return next(iter(shapes.values()))[0]


def _pair_losses(z_w: torch.Tensor, z_l: torch.Tensor, beta: float, form: str, label_smoothing: float):
    h = z_w - z_l
    if form == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if form == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    # kto_pair: the KL term of each half is estimated on the other half (batch means, no gradient path cut, as in
    # the TRL implementation the LLaVA-MoD script uses)
    kl_w = z_w.mean().clamp(min=0)
    kl_l = z_l.mean().clamp(min=0)
    chosen = 1 - torch.sigmoid(beta * (z_w - kl_l))
    rejected = 1 - torch.sigmoid(beta * (kl_w - z_l))
    return (chosen + rejected) / 2  # the mean over the 2B terms equals the mean of these per-pair averages


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO-family loss of the student (policy) against the frozen teacher (reference); see the module docstring.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[pairs]`` summed (or averaged) completion log-probs of the
            student for the chosen / rejected answers.
        ref_chosen_logps, ref_rejected_logps: the same for the reference model (the teacher); no gradient flows
            into them (they are detached).
        beta: DPO beta (for ``"ipo"``: tau).
        form: ``"sigmoid"`` (DPO), ``"kto_pair"`` (LLaVA-MoD's released script) or ``"ipo"``.
        label_smoothing: conservative-DPO ``eps`` in ``[0, 0.5)``, ``"sigmoid"`` only.
        reduction: ``"mean"`` (over pairs, or divided by ``num_items_in_batch``), ``"sum"`` or ``"none"``
            (``[pairs]``; for ``"kto_pair"`` each pair's value is the mean of its two terms).
    """
    n = _check_logps(pc=policy_chosen_logps, pr=policy_rejected_logps, rc=ref_chosen_logps, rr=ref_rejected_logps)
    if form not in PREFERENCE_LOSS_FORMS:
        raise ValueError(f"form must be one of {PREFERENCE_LOSS_FORMS}, got {form!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r} (LLaVA-MoD: 0.1)")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and form != "sigmoid"):
        raise ValueError(f"label_smoothing must be in [0, 0.5) and is for form='sigmoid' only, got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dt = compute_dtype(policy_chosen_logps)
    z_w = policy_chosen_logps.to(dt) - ref_chosen_logps.detach().to(dt)
    z_l = policy_rejected_logps.to(dt) - ref_rejected_logps.detach().to(dt)
    per_pair = _pair_losses(z_w, z_l, beta, form, label_smoothing)
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    if num_items_in_batch is not None:
        return per_pair.sum() / num_items_in_batch
    return per_pair.sum() / max(n, 1)


def preference_distillation_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    beta: float = 0.1,
    form: str = "sigmoid",
    label_smoothing: float = 0.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dpo_loss` in the ranking-loss calling convention: ``student_scores`` / ``teacher_scores`` are
    ``[pairs, 2]`` sequence log-probs, chosen answer in column 0, rejected in column 1 (the teacher is the DPO
    reference). ``mask``, if given, must mark both candidates of every pair as real."""
    s, t = torch.as_tensor(student_scores), torch.as_tensor(teacher_scores)
    if s.dim() != 2 or s.shape[-1] != 2 or s.shape != t.shape:
        raise ValueError(
            "preference_distillation_loss needs student and teacher scores of shape [pairs, 2] (chosen, rejected), "
            f"got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if mask is not None and not bool(torch.as_tensor(mask).all()):
        raise ValueError("a preference pair needs both its chosen and its rejected answer: the mask hides one")
    return dpo_loss(
        s[:, 0],
        s[:, 1],
        t[:, 0],
        t[:, 1],
        beta=beta,
        form=form,
        label_smoothing=label_smoothing,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


@register_loss("dpo", kind="ranking", function=preference_distillation_loss, aliases=("preference_distillation",))
class PreferenceDistillationLoss(nn.Module):
    """DPO with the teacher as reference model (LLaVA-MoD preference distillation) on [pairs, 2] sequence log-probs."""

    def __init__(self, beta: float = 0.1, form: str = "sigmoid", label_smoothing: float = 0.0):
        super().__init__()
        if form not in PREFERENCE_LOSS_FORMS:
            raise ValueError(f"form must be one of {PREFERENCE_LOSS_FORMS}, got {form!r}")
        self.hparams = {"beta": beta, "form": form, "label_smoothing": label_smoothing}

    def forward(self, student_scores, teacher_scores, **kwargs):
        return preference_distillation_loss(student_scores, teacher_scores, **self.hparams, **kwargs)
