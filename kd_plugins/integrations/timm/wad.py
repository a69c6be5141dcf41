"""WAD (weight-aware distillation under class distribution mismatch) for timm training loops.

One train loader mixes labelled and unlabelled images (:class:`WADDataset`); each target is ``[class, wad_row]``
(``[y, -1]`` labelled, ``[-100, i]`` unlabelled), so any loop that calls ``task(input, target)`` (timm's, or
``kd-plugins-timm-train``'s) trains with :class:`WADTask`::

    from kd_plugins import WADDataset, WADTask, wad_weights_from_teacher

    wad = wad_weights_from_teacher(encoder, labelled_loader, unlabelled_loader, num_classes=6)  # once
    train_set = WADDataset(labelled_set, unlabelled_set, labelled_repeats=10)
    task = WADTask(student, wad, wad_weight=1.0)           # student head: the 6 known classes
    result = task(images, targets)                         # {"loss", "output", "task_loss", "kd_loss", ...}

``loss = task_weight * criterion(labelled rows) + wad_weight * wad_loss(unlabelled rows)`` (:class:`WADConfig`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..._config import resolve_config
from ...distill.terms import weighted_sum
from ...distill.wad import WADWeights
from ...distill.wad_batch import LABELLED, UNLABELLED, check_wad, split_wad_rows, wad_batch_loss
from ...distill.wad_config import WADConfig
from .model_task import ModelTask

_logger = logging.getLogger(__name__)

__all__ = ["WADDataset", "WADTask"]


class WADDataset(Dataset):
    """``labelled`` (repeated ``labelled_repeats`` times) then ``unlabelled``, with targets ``[class, wad_row]``.

    Args:
        labelled: items ``(image, class)``.
        unlabelled: items ``image`` or ``(image, anything)`` (an unknown target is ignored), in the order their
            WADWeights rows were computed: item ``i`` is row ``i``.
        labelled_repeats: how often the labelled items appear per epoch (few labels, a large pool: repeat them so
            that each batch holds some).

    Setting ``transform`` (timm's ``create_loader`` does) sets it on both datasets.
    """

    def __init__(self, labelled: Dataset, unlabelled: Dataset, labelled_repeats: int = 1):
        if not isinstance(labelled_repeats, int) or labelled_repeats < 1:
            raise ValueError(f"labelled_repeats must be an int >= 1, got {labelled_repeats!r}")
        if labelled is unlabelled:
            raise ValueError("labelled and unlabelled are the same dataset; pass the unlabelled pool separately.")
        self.labelled, self.unlabelled, self.labelled_repeats = labelled, unlabelled, labelled_repeats
        self.num_labelled, self.num_unlabelled = len(labelled), len(unlabelled)

    def __len__(self) -> int:
        return self.labelled_repeats * self.num_labelled + self.num_unlabelled

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if i < 0:
            i += len(self)
        n_lab = self.labelled_repeats * self.num_labelled
        if i < n_lab:
            image, label = self.labelled[i % self.num_labelled]
            return image, torch.tensor([int(label), LABELLED])
        item = self.unlabelled[i - n_lab]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return image, torch.tensor([UNLABELLED, i - n_lab])

    @property
    def transform(self):
        return getattr(self.labelled, "transform", None)

    @transform.setter
    def transform(self, value) -> None:
        self.labelled.transform = value
        self.unlabelled.transform = value


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["logits"] if isinstance(out, dict) else out


class WADTask(ModelTask):
    """Semi-supervised training of ``model`` on labelled rows plus WAD-weighted unlabelled rows.

    Args:
        model: the student; its head covers the known classes (``wad.pmi.shape[1]`` outputs).
        wad: the unlabelled set's :class:`~kd_plugins.WADWeights` (computed once, e.g. by
            :func:`~kd_plugins.distill.wad_batch.wad_weights_from_teacher`).
        config: a :class:`~kd_plugins.distill.wad_config.WADConfig`; ``**overrides`` replace its fields.
        num_unlabelled: size of the unlabelled set, checked against the WADWeights rows (``WADDataset`` gives it).
        criterion / criterion_kwargs: task loss of the labelled rows (timm's classification loss by default).

    Targets: ``[B, 2]`` integer ``[class, wad_row]`` (:class:`WADDataset`); plain ``[B]`` class targets are read as
    all-labelled. ``forward`` returns ``loss``, ``output`` (logits), ``task_loss``, ``kd_loss`` (the WAD term) and
    ``wad_rows`` / ``wad_weight_mean`` (unlabelled rows in the batch and their mean weight).
    """

    def __init__(
        self,
        model: nn.Module,
        wad: WADWeights,
        config: WADConfig | None = None,
        *,
        num_unlabelled: int | None = None,
        criterion: nn.Module | None = None,
        criterion_kwargs: dict | None = None,
        device=None,
        dtype=None,
        verbose: bool = False,
        **overrides,
    ):
        if isinstance(wad, WADConfig):
            raise TypeError("WADTask(model, wad, config=None, **overrides): the WADWeights come before the config.")
        num_classes = getattr(model, "num_classes", None)
        check_wad(wad, num_unlabelled=num_unlabelled, num_classes=num_classes)
        super().__init__(model, _logits, criterion, criterion_kwargs, None, device=device, dtype=dtype, verbose=verbose)
        self.config = resolve_config(WADConfig, config, overrides)
        self.num_classes = int(wad.pmi.shape[1])
        # not persistent: the weights are an input of training, never part of the checkpoint
        for name, value in zip(WADWeights._fields, wad):
            self.register_buffer(f"wad_{name}", value.detach().to(self.device), persistent=False)
        if verbose:
            kept = float(wad.kept().float().mean())
            _logger.info(f"WADTask: {len(wad.weights)} unlabelled rows, {kept:.1%} with weight >= 0.5; {self.config}")

    @property
    def wad(self) -> WADWeights:
        """The WADWeights (on the task's device)."""
        return WADWeights(self.wad_weights, self.wad_pseudo_labels, self.wad_pmi)

    def _split_target(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target.dim() == 1 and not target.dtype.is_floating_point:
            return target, torch.full_like(target, LABELLED)
        if target.dim() != 2 or target.shape[1] != 2 or target.dtype.is_floating_point:
            raise ValueError(
                f"WADTask needs integer targets [batch, 2] = [class, wad_row] (WADDataset builds them), got "
                f"{target.dtype} {tuple(target.shape)}; Mixup/CutMix soft targets cannot mark unlabelled rows."
            )
        return target[:, 0], target[:, 1]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        labels, index = self._split_target(target)
        unlabelled = split_wad_rows(labels, index, len(self.wad_weights), self.num_classes)
        logits = self.run_model(input)
        zero = logits.new_zeros(())
        labelled = ~unlabelled
        task = self.criterion(logits[labelled], labels[labelled]) if labelled.any() else zero
        wad = wad_batch_loss(logits[unlabelled], self.wad, index[unlabelled], self.config) if unlabelled.any() else zero
        cfg = self.config
        loss = weighted_sum(
            {"task_loss": task, "wad_loss": wad},
            {"task_loss": cfg.task_weight, "wad_loss": cfg.wad_weight},
            hint="Lower the learning rate or check the inputs.",
        )
        weights = self.wad_weights[index[unlabelled]] if unlabelled.any() else zero[None]
        return {
            "loss": loss,
            "output": logits,
            "task_loss": task.detach(),
            "kd_loss": wad.detach(),
            "wad_rows": unlabelled.sum().detach(),
            "wad_weight_mean": weights.float().mean().detach(),
        }
