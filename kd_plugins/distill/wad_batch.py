"""What the WAD adapters share: teacher features -> :class:`WADWeights`, the checks of a WADWeights against the data,
the split of a mixed batch into labelled and unlabelled rows, and the WAD term of a batch.

A mixed batch marks each row twice: ``labels`` (a class in ``[0, C)``, or ``-100`` on unlabelled rows) and
``index`` (the row's position in the WADWeights, or ``-1`` on labelled rows). Exactly one of the two is set per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..losses._common import IGNORE_INDEX
from .teacher import Teacher
from .wad import WADWeights, wad_loss, wad_weights
from .wad_config import WADConfig

__all__ = ["UNLABELLED", "LABELLED", "wad_weights_from_teacher", "check_wad", "split_wad_rows", "wad_batch_loss"]

#: ``labels`` value of an unlabelled row.
UNLABELLED = IGNORE_INDEX
#: ``index`` value of a labelled row.
LABELLED = -1


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _embed(teacher: Teacher, batches: Iterable, features: Callable, name: str) -> torch.Tensor:
    out = []
    for batch in batches:
        x = _inputs(batch).to(teacher.device)
        out.append(teacher.run(lambda m, x=x: features(m, x)).float().cpu())
    if not out:
        raise ValueError(f"{name} yielded no batch; pass a DataLoader (or list) of batches.")
    return torch.cat(out)


def wad_weights_from_teacher(
    teacher: nn.Module | Teacher,
    labelled: Iterable,
    unlabelled: Iterable,
    num_classes: int,
    *,
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    **wad_kwargs: Any,
) -> WADWeights:
    """Embed both sets with the frozen ``teacher`` (eval mode, no gradients) and call :func:`wad_weights`.

    Args:
        teacher: the encoder (e.g. trained with SimCLR); wrapped in a :class:`Teacher`.
        labelled: batches ``(x, y)`` of the labelled instances (not shuffled; ``y`` in ``[0, num_classes)``).
        unlabelled: batches ``x`` or ``(x, ...)`` of the unlabelled instances, in dataset order (row ``i`` of the
            result is the ``i``-th instance: the index that ``WADDataset`` / the ``wad_index`` column must carry).
        features: ``(module, x) -> [B, D]``; default ``module(x)``.
        **wad_kwargs: ``temperature``, ``max_reference``, ``chunk_size``, ``seed`` of :func:`wad_weights`.
    """
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
    features = features or (lambda m, x: m(x))
    labelled = list(labelled)
    labels = torch.cat([torch.as_tensor(b[1]).reshape(-1) for b in labelled]) if labelled else torch.empty(0)
    feats_l = _embed(teacher, labelled, features, "labelled")
    feats_u = _embed(teacher, unlabelled, features, "unlabelled")
    return wad_weights(feats_u, feats_l, labels.long(), num_classes, **wad_kwargs)


def check_wad(wad: Any, *, num_unlabelled: int | None = None, num_classes: int | None = None) -> WADWeights:
    """``wad`` if it is a consistent :class:`WADWeights` for ``num_unlabelled`` instances and a ``num_classes`` head;
    otherwise an error that says what to pass."""
    if not isinstance(wad, WADWeights):
        raise TypeError(
            f"expected the WADWeights returned by kd_plugins.wad_weights(...), got {type(wad).__name__}; "
            "compute them once from the teacher's features (wad_weights_from_teacher)."
        )
    rows, pmi = wad.weights.shape[:1], wad.pmi
    if wad.weights.dim() != 1 or wad.pseudo_labels.shape != rows or pmi.dim() != 2 or pmi.shape[:1] != rows:
        raise ValueError(
            f"WADWeights fields disagree: weights {tuple(wad.weights.shape)}, pseudo_labels "
            f"{tuple(wad.pseudo_labels.shape)}, pmi {tuple(pmi.shape)}; select rows with wad.select(index), "
            "never slice one field alone."
        )
    if not torch.isfinite(wad.weights).all() or (wad.weights < 0).any():
        raise ValueError("WADWeights.weights must be finite and >= 0; recompute them with wad_weights.")
    if num_unlabelled is not None and rows[0] != num_unlabelled:
        raise ValueError(
            f"the WADWeights hold {rows[0]} rows but the unlabelled set has {num_unlabelled} instances; compute "
            "wad_weights on exactly the unlabelled set, in its order (row i = unlabelled instance i)."
        )
    if num_classes is not None and pmi.shape[1] != num_classes:
        raise ValueError(
            f"the WADWeights score {pmi.shape[1]} known classes but the student head has {num_classes} outputs; "
            "the head must cover exactly the labelled classes (num_classes / num_labels = "
            f"{pmi.shape[1]})."
        )
    return wad


def split_wad_rows(labels: torch.Tensor, index: torch.Tensor, num_unlabelled: int, num_classes: int) -> torch.Tensor:
    """Bool ``[B]``, True on unlabelled rows, after checking that every row is exactly one of labelled (class in
    ``[0, num_classes)``, index ``-1``) or unlabelled (label ``-100``, index in ``[0, num_unlabelled)``)."""
    if labels.shape != index.shape or labels.dim() != 1:
        raise ValueError(f"labels {tuple(labels.shape)} and WAD index {tuple(index.shape)} must both be [batch].")
    if labels.dtype.is_floating_point or index.dtype.is_floating_point:
        raise ValueError(
            "labels and WAD index must be integer tensors (soft targets from Mixup/CutMix cannot mark unlabelled "
            "rows: turn Mixup/CutMix off for WAD training)."
        )
    unlabelled, labelled = index != LABELLED, labels != UNLABELLED
    both = unlabelled & labelled
    if both.any():
        raise ValueError(
            f"{int(both.sum())} row(s) carry both a class label and a WAD index (a labelled example passed as "
            f"unlabelled?); set the label to {UNLABELLED} on unlabelled examples or the index to {LABELLED} on "
            "labelled ones."
        )
    if not (unlabelled | labelled).all():
        raise ValueError(
            f"{int((~(unlabelled | labelled)).sum())} row(s) have neither a class label nor a WAD index (missing "
            f"index?); give unlabelled examples their row in the WADWeights (0..{num_unlabelled - 1})."
        )
    bad_index = unlabelled & ((index < 0) | (index >= num_unlabelled))
    if bad_index.any():
        raise ValueError(
            f"WAD index {index[bad_index].tolist()[:5]} outside the {num_unlabelled} rows of the WADWeights; "
            f"number the unlabelled examples 0..{num_unlabelled - 1} in the order passed to wad_weights."
        )
    bad_label = labelled & ((labels < 0) | (labels >= num_classes))
    if bad_label.any():
        raise ValueError(
            f"labels {labels[bad_label].tolist()[:5]} outside the {num_classes} known classes; WAD trains the "
            f"student on classes 0..{num_classes - 1} only (mark unlabelled rows with {UNLABELLED})."
        )
    return unlabelled


def wad_batch_loss(
    student_logits: torch.Tensor, wad: WADWeights, index: torch.Tensor, config: WADConfig
) -> torch.Tensor:
    """:func:`wad_loss` of the unlabelled rows ``student_logits`` (``[n, C]``) at WADWeights rows ``index``, with the
    target, loss and temperature of ``config``."""
    rows = wad.select(index.to(wad.weights.device))
    return wad_loss(student_logits, rows, target=config.target, loss=config.loss, temperature=config.temperature)
