"""The multi-exit objective: depth-weighted task loss per exit plus self-distillation (and an optional teacher).

For exits ``i`` at layers ``l_i`` of an ``L``-layer model (MoSE / ModularStarEncoder, arXiv 2503.03008)::

    loss = sum_i alpha_i * ( task_weight         * task_i
                           + self_distill_weight * D(deepest exit -> exit i)   [i not the deepest]
                           + teacher_weight      * D(external teacher -> exit i) [when a teacher output is given] )

``alpha_i = l_i / L`` by default (``weights="depth"``; ``"uniform"`` or an explicit list also work). ``D`` is a
registered loss: logits KD (``"kl"`` at ``temperature``) for classifiers and LMs, ``"embedding_cosine"`` for
encoder embeddings (``"embedding_mse"``, or the width-free ``"affinity_kl"`` for a teacher of another width). The
deepest exit's output is detached when it serves as teacher, so self-distillation only moves shallower exits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distill.terms import weighted_sum
from ..losses._common import IGNORE_INDEX
from .config import MultiExitConfig

__all__ = ["MultiExitConfig", "MultiExitLoss", "exit_weights", "multi_exit_loss", "exit_ce_losses", "info_nce"]


def exit_weights(layers: Sequence[int], num_layers: int, weights: str | Sequence[float] = "depth") -> list[float]:
    """Per-exit weights: ``layer / num_layers`` (``"depth"``), 1 (``"uniform"``) or the given list."""
    layers = list(layers)
    if isinstance(weights, str):
        if weights == "depth":
            return [k / num_layers for k in layers]
        if weights == "uniform":
            return [1.0] * len(layers)
        raise ValueError(f"weights must be 'depth', 'uniform' or a list, got {weights!r}")
    w = [float(x) for x in weights]
    if len(w) != len(layers):
        raise ValueError(f"{len(w)} weights given for {len(layers)} exits {layers}")
    return w


@dataclass
class MultiExitLoss:
    """``loss`` (scalar with gradients) and ``terms``: detached floats ``exit{k}_task``, ``exit{k}_self_kd``,
    ``exit{k}_teacher_kd`` (unweighted per-exit values) and ``multi_exit_loss``."""

    loss: torch.Tensor
    terms: dict[str, float]


def multi_exit_loss(
    exits: Mapping[int, torch.Tensor],
    num_layers: int,
    config: MultiExitConfig | None = None,
    *,
    kind: str = "logits",
    task_losses: Mapping[int, torch.Tensor] | None = None,
    teacher: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kd_scale: float = 1.0,
) -> MultiExitLoss:
    """Combine per-exit task losses and distillation terms into the multi-exit objective.

    Args:
        exits: ``layer -> output`` (logits ``[..., V]`` or pooled embeddings ``[B, D]``), any order.
        num_layers: the model depth ``L`` (for depth weights).
        task_losses: ``layer -> scalar`` task loss per exit (e.g. from :func:`exit_ce_losses`); missing exits
            have no task term.
        teacher: external teacher output of the same kind (logits or embeddings); distilled into every exit.
        mask: rows to distil for token-level logits (e.g. the attention mask ``[B, T]``).
        kd_scale: multiplies the distillation terms (integrations use it to match the task loss normalisation
            under gradient accumulation).
    """
    cfg = config or MultiExitConfig()
    layers = sorted(exits)
    if not layers:
        raise ValueError("multi_exit_loss needs at least one exit output")
    w = exit_weights(layers, num_layers, cfg.weights)
    name, fn = cfg.distill_fn(kind)
    kw = dict(cfg.distill_kwargs)
    if kind == "logits":
        kw.setdefault("temperature", cfg.temperature)
        if mask is not None:
            kw["mask"] = mask.bool()
    deepest = exits[layers[-1]].detach()
    values: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for k, a in zip(layers, w):
        out = exits[k]
        if task_losses is not None and k in task_losses and cfg.task_weight > 0:
            values[f"exit{k}_task"], weights[f"exit{k}_task"] = task_losses[k], a * cfg.task_weight
        if k != layers[-1] and cfg.self_distill_weight > 0:
            values[f"exit{k}_self_kd"] = fn(out, deepest, **kw) * kd_scale
            weights[f"exit{k}_self_kd"] = a * cfg.self_distill_weight
        if teacher is not None and cfg.teacher_weight > 0:
            values[f"exit{k}_teacher_kd"] = fn(out, teacher.detach().to(out.device), **kw) * kd_scale
            weights[f"exit{k}_teacher_kd"] = a * cfg.teacher_weight
    total = weighted_sum(values, weights, hint="Lower the learning rate or check the inputs.")
    if total is None:
        total = sum(o.sum() * 0.0 for o in exits.values())
    terms = {name: float(v.detach()) for name, v in values.items()}
    terms["multi_exit_loss"] = float(total.detach())
    return MultiExitLoss(total, terms)


def exit_ce_losses(
    exits: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    *,
    causal: bool = False,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    skip: Sequence[int] = (),
) -> dict[int, torch.Tensor]:
    """Cross-entropy of every exit's logits against ``labels``.

    ``causal=True`` shifts (``logits[:, :-1]`` vs ``labels[:, 1:]``) as HF causal LMs do. With
    ``num_items_in_batch`` the summed loss is divided by it (HF Trainer's gradient-accumulation convention), else
    averaged over non-ignored targets. Exits in ``skip`` are left out.
    """
    out = {}
    for k, logits in exits.items():
        if k in skip:
            continue
        lg, lb = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
        lg = lg.reshape(-1, lg.shape[-1]).float()
        lb = lb.reshape(-1).to(lg.device)
        if num_items_in_batch is not None:
            out[k] = F.cross_entropy(lg, lb, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
        else:
            out[k] = F.cross_entropy(lg, lb, ignore_index=ignore_index)
    return out


def info_nce(query: torch.Tensor, positive: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP objective): row ``i`` of ``query`` matches row ``i`` of ``positive``."""
    if query.shape[0] < 2:
        raise ValueError("InfoNCE needs at least 2 pairs per batch (the other rows are the negatives)")
    q, p = F.normalize(query.float(), dim=-1), F.normalize(positive.float(), dim=-1)
    logits = scale * q @ p.T
    target = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
