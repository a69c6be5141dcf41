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

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..losses import get_loss_spec
from ..losses._common import IGNORE_INDEX

__all__ = ["MultiExitConfig", "MultiExitLoss", "exit_weights", "multi_exit_loss", "exit_ce_losses", "info_nce"]


@dataclass
class MultiExitConfig:
    """Weights and losses of the multi-exit objective (see the module docstring).

    Args:
        weights: ``"depth"`` (``alpha_i = layer_i / L``, the paper's), ``"uniform"`` (all 1) or one float per exit.
        task_weight: weight of each exit's task loss (labels: cross-entropy; encoders: ``embedding_task``).
        self_distill_weight: weight of the deepest-exit -> shallower-exit distillation term.
        teacher_weight: weight of the external-teacher -> every-exit term (used only when a teacher is given).
        distill_loss: registry name of the distillation loss; ``None``: ``"kl"`` for logits,
            ``"embedding_cosine"`` for embeddings. Must be of kind ``logits`` or ``embedding`` to match the exits.
        distill_kwargs: extra keyword arguments for that loss (e.g. ``{"normalize": True}`` for ``embedding_mse``).
        temperature: softmax temperature of logit distillation.
        embedding_task: encoders: ``"none"`` (distillation only) or ``"infonce"`` (symmetric in-batch InfoNCE
            between each text and its positive, CLIP-style as in MoSE fine-tuning; the batch carries
            ``positive_input_ids`` / ``positive_attention_mask``).
        infonce_scale: logit scale of InfoNCE (cosine similarity times this).
    """

    weights: str | Sequence[float] = "depth"
    task_weight: float = 1.0
    self_distill_weight: float = 1.0
    teacher_weight: float = 1.0
    distill_loss: str | None = None
    distill_kwargs: dict = field(default_factory=dict)
    temperature: float = 1.0
    embedding_task: str = "none"
    infonce_scale: float = 20.0

    def __post_init__(self):
        if isinstance(self.weights, str) and self.weights not in ("depth", "uniform"):
            raise ValueError(f"weights must be 'depth', 'uniform' or a list of floats, got {self.weights!r}")
        for name in ("task_weight", "self_distill_weight", "teacher_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.embedding_task not in ("none", "infonce"):
            raise ValueError(f"embedding_task must be 'none' or 'infonce', got {self.embedding_task!r}")

    def distill_fn(self, kind: str):
        name = self.distill_loss or ("kl" if kind == "logits" else "embedding_cosine")
        spec = get_loss_spec(name)
        if spec.kind != kind or spec.function is None:
            examples = "kl, jsd, reverse_kl" if kind == "logits" else "embedding_cosine, embedding_mse, affinity_kl"
            raise ValueError(f"distill_loss={name!r} is a {spec.kind!r} loss; these exits produce {kind!r} outputs "
                             f"(pick e.g. {examples})")
        return name, spec.function


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


def multi_exit_loss(exits: Mapping[int, torch.Tensor], num_layers: int, config: MultiExitConfig | None = None, *,
                    kind: str = "logits", task_losses: Mapping[int, torch.Tensor] | None = None,
                    teacher: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                    kd_scale: float = 1.0) -> MultiExitLoss:
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
    total = None
    terms: dict[str, float] = {}

    def add(x, weight):
        nonlocal total
        total = x * weight if total is None else total + x * weight

    for k, a in zip(layers, w):
        out = exits[k]
        if task_losses is not None and k in task_losses and cfg.task_weight > 0:
            t = task_losses[k]
            add(t, a * cfg.task_weight)
            terms[f"exit{k}_task"] = float(t.detach())
        if k != layers[-1] and cfg.self_distill_weight > 0:
            d = fn(out, deepest, **kw) * kd_scale
            add(d, a * cfg.self_distill_weight)
            terms[f"exit{k}_self_kd"] = float(d.detach())
        if teacher is not None and cfg.teacher_weight > 0:
            d = fn(out, teacher.detach().to(out.device), **kw) * kd_scale
            add(d, a * cfg.teacher_weight)
            terms[f"exit{k}_teacher_kd"] = float(d.detach())
    if total is None:
        total = sum(o.sum() * 0.0 for o in exits.values())
    if not torch.isfinite(total.detach()):
        raise FloatingPointError(f"non-finite multi-exit loss; terms: {terms}")
    terms["multi_exit_loss"] = float(total.detach())
    return MultiExitLoss(total, terms)


def exit_ce_losses(exits: Mapping[int, torch.Tensor], labels: torch.Tensor, *, causal: bool = False,
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   skip: Sequence[int] = ()) -> dict[int, torch.Tensor]:
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
