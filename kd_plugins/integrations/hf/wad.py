"""WAD (weight-aware distillation under class distribution mismatch) inside an unmodified ``transformers.Trainer``.

The train dataset mixes labelled and unlabelled examples of a classification task. Labelled examples carry their
class in ``labels`` and ``wad_index = -1``; unlabelled ones carry ``labels = -100`` and ``wad_index = i``, their row
in the :class:`~kd_plugins.WADWeights` (computed once from a teacher's features)::

    from kd_plugins import WADCallback, wad_weights_from_teacher

    wad = wad_weights_from_teacher(encoder, labelled_batches, unlabelled_batches, num_classes=6)
    labelled = labelled.add_column("wad_index", [-1] * len(labelled))
    unlabelled = unlabelled.map(lambda ex, i: {"labels": -100, "wad_index": i}, with_indices=True)
    train = concatenate_datasets([labelled] * 10 + [unlabelled])   # repeat the few labelled examples
    Trainer(model=model, args=args, train_dataset=train, callbacks=[WADCallback(wad)]).train()

Loss per batch: ``task_weight * (the Trainer's own loss on the labelled rows) + wad_weight * wad_loss(unlabelled
rows)``, the WAD term a mean over the batch's unlabelled rows, normalised under gradient accumulation like the task
loss (:func:`trainer_loss_scaling`). The callback keeps ``wad_index`` through the Trainer's
``remove_unused_columns`` and drops it before the model's forward. Evaluation runs the Trainer's own loss (an eval
set needs no ``wad_index``). Logged: ``wad_task``, ``wad_loss``, ``wad_weight_mean`` (mean weight of the unlabelled
rows seen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...distill.terms import weighted_sum
from ...distill.wad import WADWeights
from ...distill.wad_batch import LABELLED, UNLABELLED, check_wad, split_wad_rows, wad_batch_loss
from ...distill.wad_config import WADConfig
from ._trainer import TrainerPluginCallback, model_inputs, patch_trainer, trainer_loss_scaling

__all__ = ["WADCallback"]


class WADCallback(TrainerPluginCallback):
    """Trains a sequence/image classifier on labelled rows plus WAD-weighted unlabelled rows.

    Args:
        wad: the unlabelled examples' :class:`~kd_plugins.WADWeights` (row ``i`` = the example with
            ``wad_index == i``).
        config: a :class:`~kd_plugins.distill.wad_config.WADConfig`; ``**overrides`` replace its fields.
    """

    def __init__(self, wad: WADWeights, config: WADConfig | None = None, **overrides):
        if isinstance(wad, WADConfig):
            raise TypeError(
                "WADCallback(wad, config=None, **overrides): the WADWeights come first (the artifact, like "
                "SparseFTCallback's mask); pass the config as config=WADConfig(...)."
            )
        self.wad = check_wad(wad)
        self.config = resolve_config(WADConfig, config, overrides)
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    @property
    def num_unlabelled(self) -> int:
        return len(self.wad.weights)

    @property
    def num_classes(self) -> int:
        return int(self.wad.pmi.shape[1])

    def _attach(self, trainer: Trainer) -> None:
        num_labels = getattr(getattr(unwrap_model(trainer.model), "config", None), "num_labels", None)
        check_wad(self.wad, num_classes=num_labels)
        self.trainer = trainer
        self._keep_index_column(trainer)
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def _keep_index_column(self, trainer: Trainer) -> None:
        """Add the index column to the columns the Trainer keeps (it drops what the model's forward does not take)."""
        if getattr(trainer.args, "remove_unused_columns", False) and hasattr(
            trainer, "_set_signature_columns_if_needed"
        ):
            trainer._set_signature_columns_if_needed()
            if self.config.index_column not in trainer._signature_columns:
                trainer._signature_columns.append(self.config.index_column)

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_attached()
        self._check_dataset(self.trainer.train_dataset)

    def _check_dataset(self, dataset: Any) -> None:
        """On a ``datasets.Dataset``: the index column exists and numbers exactly the WADWeights rows."""
        columns = getattr(dataset, "column_names", None)
        if not isinstance(columns, list):
            return  # a torch Dataset / iterable: every batch is checked instead
        col = self.config.index_column
        if col not in columns:
            raise ValueError(
                f"the train dataset has no {col!r} column; add it (-1 on labelled examples, "
                f"0..{self.num_unlabelled - 1} on unlabelled ones, their rows in the WADWeights) or set "
                "WADConfig.index_column."
            )
        index = torch.as_tensor(dataset[col])
        rows = index[index != LABELLED].unique()
        if len(rows) != self.num_unlabelled or (len(rows) and (rows[0] != 0 or rows[-1] != self.num_unlabelled - 1)):
            span = f"{int(rows.min())}..{int(rows.max())}" if len(rows) else "none"
            raise ValueError(
                f"the WADWeights hold {self.num_unlabelled} rows but the train dataset's unlabelled examples have "
                f"{len(rows)} distinct {col!r} values ({span}); compute wad_weights on exactly the unlabelled "
                f"examples and number them 0..N-1 in that order."
            )

    def _split(self, inputs: Mapping[str, Any]) -> tuple[dict, torch.Tensor | None]:
        inputs = dict(inputs)
        return inputs, inputs.pop(self.config.index_column, None)

    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        inputs, index = self._split(inputs)
        if not model.training:
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
        if index is None:
            raise ValueError(
                f"the training batch has no {self.config.index_column!r} (missing indices): add the column to the "
                "train dataset (-1 on labelled examples, the WADWeights row on unlabelled ones) and keep it in the "
                "collator's output (TrainingArguments(remove_unused_columns=False) when the callback joins the "
                "Trainer after it was built)."
            )
        labels = inputs.get("labels")
        if labels is None:
            labels = torch.full_like(index, UNLABELLED)
        unlabelled = split_wad_rows(labels, index, self.num_unlabelled, self.num_classes)
        cfg = self.config
        task = None
        if (~unlabelled).any() and cfg.task_weight:
            task, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw)
        else:  # no labelled row: the model's own loss would be a mean over nothing
            outputs = model(**model_inputs(inputs))
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        values, weights = {}, {}
        # the Trainer's GA rule does not depend on this micro-batch having labelled rows
        scaling = trainer_loss_scaling(self.trainer, num_items_in_batch)
        if task is not None:
            values["wad_task"] = self.normalised_task_loss(task, outputs, inputs, scaling)
            weights["wad_task"] = cfg.task_weight
        if unlabelled.any():
            rows = index[unlabelled]
            values["wad_loss"] = scaling.mean(wad_batch_loss(logits[unlabelled], self.wad, rows, cfg))
            weights["wad_loss"] = cfg.wad_weight
        loss = weighted_sum(values, weights, hint="Lower the learning rate or check the inputs.")
        logs = {k: float(v.detach()) for k, v in values.items()}
        if unlabelled.any():
            logs["wad_weight_mean"] = float(self.wad.weights[rows.to(self.wad.weights.device)].float().mean())
        self._record(True, logs)
        return (loss, outputs) if return_outputs else loss
