"""Analytic speculative-decoding acceptance of a draft model against its target, on given token batches.

In speculative sampling (Leviathan et al. 2023; Chen et al. 2023) the draft proposes ``x ~ q(.|ctx)`` and the target
accepts it with probability ``min(1, p(x|ctx) / q(x|ctx))``. Averaged over the draft's proposal, the probability that
a token is accepted is (DistillSpec, Zhou et al. 2024)::

    alpha(ctx) = sum_v q_v * min(1, p_v / q_v) = sum_v min(p_v, q_v) = 1 - TVD(p, q),   TVD = 0.5 * sum_v |p_v - q_v|

With greedy decoding the draft proposes its argmax and the target keeps it when it is the target's argmax too, so
``alpha(ctx) = 1[argmax p == argmax q]`` (the ``T -> 0`` limit of ``sum_v min(p_v, q_v)`` when both argmaxes are
unique). :func:`expected_acceptance` averages ``alpha`` over the positions of given token batches, with teacher
forcing: the contexts are the batches' prefixes, not the text the models would generate.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._config import resolve_config
from .._utils import model_device, to_device
from ..distill.teacher import Teacher
from ..losses import IGNORE_INDEX
from .config import SpeculativeConfig
from .vocab import check_same_vocabulary

__all__ = ["AcceptanceResult", "token_acceptance", "expected_acceptance", "expected_tokens_per_round"]


@dataclass
class AcceptanceResult:
    """Mean analytic acceptance over the valid positions of some batches.

    Attributes:
        mean: the average acceptance ``alpha``, in ``[0, 1]``.
        count: the number of valid positions averaged over.
        total: ``mean * count`` (what to add up across processes or calls).
        temperature: ``None`` for greedy acceptance, else the softmax temperature.
        per_position: with ``per_position=True``, one float tensor ``[B, T]`` per batch (on the CPU) holding the
            acceptance at every position, ``NaN`` where the position was not valid.
    """

    mean: float
    count: int
    total: float
    temperature: float | None
    per_position: list[torch.Tensor] | None = None


def token_acceptance(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """Per-position acceptance ``[...]`` from logits ``[..., V]``: ``sum_v min(p_v, q_v)`` with ``p`` and ``q`` the
    target's and the draft's softmax at ``temperature``; ``1[argmax p == argmax q]`` for greedy (``None`` / ``0``).

    Computed in float32 (float64 when given float64).
    """
    if target_logits.shape != draft_logits.shape:
        raise ValueError(
            f"target logits {tuple(target_logits.shape)} and draft logits {tuple(draft_logits.shape)} differ in "
            "shape: the draft must share the target's vocabulary (same tokenizer, same lm_head size)."
        )
    draft_logits = draft_logits.to(target_logits.device)
    if temperature is None or temperature == 0:
        return (target_logits.argmax(-1) == draft_logits.argmax(-1)).to(torch.float32)
    if temperature < 0:
        raise ValueError(f"temperature must be None, 0 (greedy) or > 0, got {temperature}")
    dtype = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(target_logits.to(dtype) / temperature, dim=-1)
    q = torch.softmax(draft_logits.to(dtype) / temperature, dim=-1)
    return torch.minimum(p, q).sum(-1)


def expected_tokens_per_round(alpha: float, num_draft_tokens: int) -> float:
    """Expected tokens produced per round (= per target forward) with ``gamma = num_draft_tokens`` drafted tokens
    when each is accepted independently with probability ``alpha`` (Leviathan et al. 2023, Eq. 1)::

        E[tokens per round] = (1 - alpha^(gamma + 1)) / (1 - alpha)      (gamma + 1 at alpha = 1)

    It counts the target's own token that ends every round; the expected number of accepted draft tokens is this
    minus one.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if alpha == 1.0:
        return float(num_draft_tokens + 1)
    return (1.0 - alpha ** (num_draft_tokens + 1)) / (1.0 - alpha)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``no_grad``; its train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _as_batch(batch) -> dict:
    """A batch as a dict with ``input_ids [B, T]`` (a tensor of ids is accepted too), checked."""
    if torch.is_tensor(batch):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            "each batch must be a tensor of token ids [B, T] or a dict with 'input_ids' (optionally "
            f"'attention_mask' and 'labels'), got {type(batch).__name__}"
        )
    batch = dict(batch)
    ids = batch["input_ids"]
    if not torch.is_tensor(ids):
        ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(ids.shape)}")
    batch["input_ids"] = ids
    for key in ("attention_mask", "labels"):
        value = batch.get(key)
        if value is not None:
            value = torch.as_tensor(value)
            value = value.unsqueeze(0) if value.dim() == 1 else value
            if value.shape != ids.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)} but input_ids has {tuple(ids.shape)}")
            batch[key] = value
    return batch


def valid_positions(batch: dict) -> torch.Tensor:
    """Positions whose next-token distribution is scored: attended (``attention_mask``), and, when the batch has
    ``labels``, whose next token is a label (``labels[:, t + 1] != -100``, the causal shift)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    labels = batch.get("labels")
    if labels is not None:
        next_is_label = torch.zeros_like(valid)
        next_is_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        valid = valid & next_is_label
    return valid


def _logits(output) -> torch.Tensor:
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


def batch_acceptance(teacher: Teacher, draft: nn.Module, batch: dict, temperature: float | None) -> torch.Tensor:
    """Acceptance ``[B, T]`` at every position of one checked batch (the caller masks invalid positions)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None}
    target_logits = _logits(teacher(**inputs, use_cache=False))
    draft_logits = _logits(draft(**to_device(inputs, model_device(draft)), use_cache=False))
    # Compared on the draft's device: the target may run elsewhere (Teacher moves its inputs there).
    return token_acceptance(target_logits.to(draft_logits.device), draft_logits, temperature)


def expected_acceptance(
    target: nn.Module | Teacher,
    draft: nn.Module,
    batches: Iterable,
    config: SpeculativeConfig | None = None,
    *,
    per_position: bool = False,
    **overrides,
) -> AcceptanceResult:
    """Average analytic acceptance of ``draft`` against ``target`` over the valid positions of ``batches``.

    ``alpha = sum_v min(p_v, q_v) = 1 - TVD(p, q)`` per position at ``temperature``, or ``1[argmax p == argmax q]``
    for greedy decoding (``temperature`` ``None`` / ``0``, the default). A position ``t`` counts when
    ``attention_mask[t]`` is set and, if the batch has ``labels``, when ``labels[t + 1] != -100`` (the
    distributions that predict label tokens). The target runs through :class:`~kd_plugins.distill.teacher.Teacher`
    (frozen, eval mode, ``no_grad``; a target that is not yet a ``Teacher`` is frozen here); the draft runs in eval
    mode under ``no_grad`` and gets its train/eval state back. Passing the same model twice is allowed (a sanity
    check: acceptance 1).

    Args:
        target: the target (verifier) model, or a ``Teacher`` holding it.
        draft: the draft model, same vocabulary.
        batches: tensors of token ids ``[B, T]`` or dicts with ``input_ids`` and optional ``attention_mask`` /
            ``labels``.
        config: a :class:`SpeculativeConfig` (only ``temperature`` is used here).
        per_position: also return every position's acceptance (``AcceptanceResult.per_position``).
        **overrides: ``SpeculativeConfig`` fields, e.g. ``temperature=1.0``.
    """
    cfg = resolve_config(SpeculativeConfig, config, overrides)
    teacher = target if isinstance(target, Teacher) else Teacher(target)
    check_same_vocabulary(teacher.module, draft)
    total, count, kept = 0.0, 0, []
    with eval_mode(draft):
        for raw in batches:
            batch = _as_batch(raw)
            acc = batch_acceptance(teacher, draft, batch, cfg.temperature)
            valid = valid_positions(batch).to(acc.device)
            total += float(acc[valid].double().sum())
            count += int(valid.sum())
            if per_position:
                kept.append(torch.where(valid, acc, torch.full_like(acc, math.nan)).cpu())
    if count == 0:
        raise ValueError(
            "expected_acceptance found no valid position: pass at least one batch with an attended position "
            "(attention_mask 1) whose next token is a label (labels != -100), or drop the labels."
        )
    return AcceptanceResult(
        mean=total / count,
        count=count,
        total=total,
        temperature=cfg.temperature,
        per_position=kept if per_position else None,
    )
