"""``HADConfig``: masked-LM pre-training of a student with HAD (Hybrid Architecture Distillation; Yang et al., 2025,
"HAD: Hybrid Architecture Distillation Outperforms Teacher in Genomic Sequence Modeling").

One config drives both halves of the method: the grouped masking of :class:`~kd_plugins.distill.had.HADCollator`
and the objective of :class:`~kd_plugins.integrations.hf.had.HADCallback`::

    loss = mlm_weight * CE(student logits at the masked tokens)            # the Trainer's own MLM loss
         + feature_weight * mean_pairs mean_visible d(P(h_s), h_t)        # d: cosine distance or MSE
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = ["HADConfig", "parse_layer_pairs"]

FeatureLoss = Literal["cosine", "mse"]
TeacherInput = Literal["full", "masked"]


def parse_layer_pairs(value) -> list[tuple[int, int]]:
    """``"-1=-1"`` / ``"2=4,-1=-1"`` (student ``hidden_states`` index = teacher index) or a list of pairs -> a list of
    ``(student, teacher)`` int pairs."""
    if isinstance(value, str):
        pairs = []
        for item in (p.strip() for p in value.split(",") if p.strip()):
            s, sep, t = item.partition("=")
            try:
                pairs.append((int(s), int(t if sep else s)))
            except ValueError:
                raise ValueError(
                    f"HADConfig.layers: {item!r} is not 'student_index=teacher_index' (hidden_states indices, "
                    "0 = embeddings, -1 = last layer), e.g. '-1=-1' or '2=4,-1=-1'"
                ) from None
        value = pairs
    try:
        pairs = [(int(s), int(t)) for s, t in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"HADConfig.layers must be 'student=teacher,...' or a list of int pairs, got {value!r}"
        ) from None
    if not pairs:
        raise ValueError("HADConfig.layers names no layer pair; use '-1=-1' (last layer of both models)")
    return pairs


@dataclass
class HADConfig:
    """Grouped masking and the HAD objective (feature alignment on visible tokens + MLM on masked ones)."""

    mask_ratio: float = field(
        default=0.15,
        metadata={"help": "share of each row's maskable tokens (not special, not padding) that is masked, in (0, 1)"},
    )
    group_size: int = field(
        default=3,
        metadata={
            "help": "tokens per masking group: the maskable tokens of a row are cut into contiguous groups of this "
            "size (random offset) and whole groups are masked; 1 = token-level masking like BERT"
        },
    )
    mask_replace_prob: float = field(
        default=1.0,
        metadata={
            "help": "share of the masked tokens replaced by the mask token (1.0: every masked token is invisible; "
            "BERT's recipe is 0.8 with random_replace_prob=0.1)"
        },
    )
    random_replace_prob: float = field(
        default=0.0, metadata={"help": "share of the masked tokens replaced by a random token (the rest unchanged)"}
    )
    mlm_weight: float = field(default=1.0, metadata={"help": "weight of the MLM loss on the masked tokens (>= 0)"})
    feature_weight: float = field(
        default=1.0, metadata={"help": "weight of the feature alignment on the visible tokens (>= 0; 0 = plain MLM)"}
    )
    feature_loss: str = field(
        default="cosine",
        metadata={"help": "distance between student and teacher features: 'cosine' (1 - cos) or 'mse'"},
    )
    layers: str = field(
        default="-1=-1",
        metadata={
            "help": "aligned hidden_states pairs 'student=teacher,...' (0 = embeddings, -1 = last layer); the "
            "feature term is the mean over pairs"
        },
    )
    teacher_input: str = field(
        default="full",
        metadata={
            "help": "'full': the teacher sees the unmasked sequence; 'masked': it sees the student's masked input "
            "(same mask positions in both models)"
        },
    )
    projector: bool = field(
        default=True,
        metadata={"help": "learn a linear projector student width -> teacher width when they differ (else: error)"},
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "projector learning rate (None: the Trainer's current learning rate)"}
    )
    teacher_device: str | None = field(
        default=None,
        metadata={"help": "None: the teacher must sit with the student; 'student': move it there; or a device"},
    )
    visible_key: str = field(
        default="had_visible",
        metadata={"help": "batch key of the visible-token mask written by HADCollator and read by HADCallback"},
    )

    def __post_init__(self):
        if not isinstance(self.mask_ratio, (int, float)) or not 0 < self.mask_ratio < 1:
            raise ValueError(
                f"HADConfig.mask_ratio must be in (0, 1) (the share of maskable tokens masked), got "
                f"{self.mask_ratio!r}; the usual MLM value is 0.15"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"HADConfig.group_size must be an int >= 1, got {self.group_size!r}")
        self._check_probabilities()
        for name in ("mlm_weight", "feature_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"HADConfig.{name} must be a number >= 0, got {value!r}")
        if self.mlm_weight == 0 and self.feature_weight == 0:
            raise ValueError("HADConfig: mlm_weight and feature_weight are both 0: nothing would train")
        _check_choice("feature_loss", self.feature_loss, FeatureLoss)
        _check_choice("teacher_input", self.teacher_input, TeacherInput)
        self.layers = parse_layer_pairs(self.layers)
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ValueError(f"HADConfig.projector_lr must be > 0 or None, got {self.projector_lr!r}")
        if not isinstance(self.visible_key, str) or not self.visible_key:
            raise ValueError(f"HADConfig.visible_key must be a non-empty batch key, got {self.visible_key!r}")

    def _check_probabilities(self) -> None:
        for name in ("mask_replace_prob", "random_replace_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"HADConfig.{name} must be in [0, 1], got {value!r}")
        if self.mask_replace_prob + self.random_replace_prob > 1 + 1e-9:
            raise ValueError(
                f"HADConfig: mask_replace_prob + random_replace_prob = "
                f"{self.mask_replace_prob + self.random_replace_prob} > 1; they share the masked tokens"
            )


def _check_choice(name: str, value, choices) -> None:
    if value not in get_args(choices):
        raise ValueError(f"HADConfig.{name} must be one of {get_args(choices)}, got {value!r}")
