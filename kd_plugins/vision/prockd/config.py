"""``ProCKDConfig``: the options of Prototype-guided Cross-task Knowledge Distillation (see :mod:`.`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ProCKDConfig"]


def _spec(value: str, name: str) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError(
            f"{name} must name a feature: a forward_intermediates index ('-1', '2') or a module name ('layer3'), "
            f"got {value!r}"
        )
    return text


@dataclass
class ProCKDConfig:
    """ProC-KD objective: a prototype memory learned from one teacher feature map, the student's prototype
    augmentation at one student feature map, and the weights of the three terms.

    ``loss = task_w * CE(student(x), y) + distill_w * (assignment_weight * prototype_kl
    + feature_weight * prototype_mse + augmented_task_weight * CE(head(augmented features), y))``.
    """

    num_prototypes: int = field(
        default=32, metadata={"help": "K: prototypes learned from the teacher's local features (spherical k-means)."}
    )
    student_feature: str = field(
        default="-1",
        metadata={"help": "Student feature map augmented with the prototypes: forward_intermediates index or module."},
    )
    teacher_feature: str = field(
        default="-1",
        metadata={"help": "Teacher feature map the prototypes are learned from (must be spatial, not pooled)."},
    )
    temperature: float = field(
        default=0.1, metadata={"help": "tau of the soft assignments softmax(cos(x, p_k) / tau)."}
    )
    momentum: float = field(
        default=0.99, metadata={"help": "EMA momentum of the prototype update p_k <- m p_k + (1 - m) mean_k (0..1)."}
    )
    restart_steps: int = field(
        default=20,
        metadata={"help": "Re-seed a prototype from a random teacher feature after this many updates without any "
                  "assigned feature (0: never)."},
    )  # fmt: skip
    assignment_weight: float = field(
        default=1.0, metadata={"help": "Weight of prototype_kl (student vs teacher prototype assignments)."}
    )
    feature_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of prototype_mse (augmented student features vs teacher prototype reconstruction)."},
    )
    augmented_task_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the task loss on the augmented features through the student's head. None: 1.0 "
                  "when the student feature is the one its head reads, else 0.0 (logged)."},
    )  # fmt: skip

    def __post_init__(self):
        self.student_feature = _spec(self.student_feature, "student_feature")
        self.teacher_feature = _spec(self.teacher_feature, "teacher_feature")
        if int(self.num_prototypes) < 2:
            raise ValueError(f"num_prototypes must be >= 2, got {self.num_prototypes!r}; e.g. 32.")
        if not float(self.temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}; e.g. 0.1.")
        if not 0.0 <= float(self.momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}; e.g. 0.99.")
        if int(self.restart_steps) < 0:
            raise ValueError(f"restart_steps must be >= 0 (0 disables restarts), got {self.restart_steps!r}.")
        for name in ("assignment_weight", "feature_weight", "augmented_task_weight"):
            value = getattr(self, name)
            if value is not None and not float(value) >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if (self.assignment_weight, self.feature_weight, self.augmented_task_weight) == (0, 0, 0):
            raise ValueError(
                "Nothing to distil: assignment_weight, feature_weight and augmented_task_weight are all 0; "
                "set at least one > 0 (or train the student without ProC-KD)."
            )
