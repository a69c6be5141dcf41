"""``WADConfig``: how the WAD adapters (``WADTask`` for timm, ``WADCallback`` for the HF Trainer) train a student on
labelled plus unlabelled rows. The weights and pseudo-labels themselves come from :func:`kd_plugins.wad_weights`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..losses.registry import get_loss_spec

__all__ = ["WADConfig"]

Target = Literal["hard", "soft"]


@dataclass
class WADConfig:
    """Objective of a WAD training step::

        loss = task_weight * CE(labelled rows) + wad_weight * wad_loss(unlabelled rows)

    with :func:`kd_plugins.wad_loss` (``reduce(w_i * loss_i)``, mean over the batch's unlabelled rows).
    """

    wad_weight: float = field(default=1.0, metadata={"help": "weight of the WAD term on the unlabelled rows (>= 0)"})
    task_weight: float = field(
        default=1.0, metadata={"help": "weight of the task loss (cross-entropy) on the labelled rows (>= 0)"}
    )
    target: str = field(
        default="hard",
        metadata={
            "help": "'hard': cross-entropy to the WAD pseudo-labels (the paper's form); "
            "'soft': the logit loss `loss` to softmax(pmi / temperature)"
        },
    )
    loss: str = field(default="kl", metadata={"help": "registered logit loss of target='soft' (kl, soft_ce, ...)"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of target='soft' (> 0)"})
    index_column: str = field(
        default="wad_index",
        metadata={
            "help": "HF Trainer: the dataset column with each unlabelled example's row in the WADWeights "
            "(-1 on labelled examples)"
        },
    )

    def __post_init__(self):
        for name in ("wad_weight", "task_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"WADConfig.{name} must be a number >= 0, got {value!r}")
        if self.target not in get_args(Target):
            raise ValueError(
                f"WADConfig.target must be one of {get_args(Target)}, got {self.target!r}: 'hard' trains on the "
                "pseudo-labels, 'soft' distils softmax(pmi / temperature)"
            )
        try:
            kind = get_loss_spec(self.loss).kind
        except (KeyError, ValueError) as e:
            raise ValueError(f"WADConfig.loss {self.loss!r} is not a registered loss: {e}") from None
        if kind != "logits":
            raise ValueError(
                f"WADConfig.loss must be a logit loss (kl, soft_ce, ...); {self.loss!r} is of kind {kind!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"WADConfig.temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.index_column, str) or not self.index_column:
            raise ValueError(f"WADConfig.index_column must be a non-empty column name, got {self.index_column!r}")
