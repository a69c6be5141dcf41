"""``MultiExitConfig``: weights and losses of the multi-exit objective, parseable by ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._config import parse_mapping
from ..losses import get_loss_spec

__all__ = ["MultiExitConfig"]


def _parse_weights(value) -> str | list[float]:
    """``"depth"`` / ``"uniform"``, a list of floats, or the same list as ``"0.2,0.5,1"``."""
    if isinstance(value, str):
        text = value.strip()
        if text in ("depth", "uniform"):
            return text
        try:
            return [float(x) for x in text.strip("[]").split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"weights must be 'depth', 'uniform' or a list of floats (e.g. '0.2,0.5,1.0'), got {value!r}"
            ) from None
    return [float(x) for x in value]


@dataclass
class MultiExitConfig:
    """Weights and losses of the multi-exit objective (see :mod:`kd_plugins.multiexit.loss`).

    Args:
        weights: ``"depth"`` (``alpha_i = layer_i / L``, the paper's), ``"uniform"`` (all 1) or one float per exit
            (a list, or ``"0.2,0.5,1.0"`` on the command line).
        task_weight: weight of each exit's task loss (labels: cross-entropy; encoders: ``embedding_task``).
        self_distill_weight: weight of the deepest-exit -> shallower-exit distillation term.
        teacher_weight: weight of the external-teacher -> every-exit term (used only when a teacher is given).
        distill_loss: registry name of the distillation loss; ``None``: ``"kl"`` for logits,
            ``"embedding_cosine"`` for embeddings. Must be of kind ``logits`` or ``embedding`` to match the exits.
        distill_kwargs: extra keyword arguments for that loss (e.g. ``{"normalize": True}`` for ``embedding_mse``;
            JSON on the command line).
        temperature: softmax temperature of logit distillation.
        embedding_task: encoders: ``"none"`` (distillation only) or ``"infonce"`` (symmetric in-batch InfoNCE
            between each text and its positive, CLIP-style as in MoSE fine-tuning; the batch carries
            ``positive_input_ids`` / ``positive_attention_mask``).
        infonce_scale: logit scale of InfoNCE (cosine similarity times this).
        distill_positives: encoders: distil the positive texts too. Each exit's query and positive embeddings are
            concatenated into one ``[2B, D]`` batch (queries first) for the self- and teacher-distillation terms;
            the batch must carry ``positive_input_ids`` / ``positive_attention_mask``.
        extra_pairs_weight: encoders: weight of additional (query, positive) pairs in the batch, e.g. inverse-cloze
            pairs (``inverse_cloze_pairs`` in the repository's ``benchmarks/data``), given as ``extra_input_ids`` /
            ``extra_attention_mask`` / ``extra_positive_input_ids`` / ``extra_positive_attention_mask``. They are
            scored by their own in-batch InfoNCE and added to every exit's task loss
            (``task_k = InfoNCE(query, positive) + extra_pairs_weight * InfoNCE(extra, extra_positive)``). 0: off.
            Needs ``embedding_task="infonce"`` and ``task_weight > 0``.
        embedding_losses_fp32: encoders: pool and compute every loss term in float32 with autocast off, as
            mixed-precision training loops usually do; the forward passes keep the Trainer's precision
            (``bf16=True``: bfloat16 autocast).
    """

    # Optional[Union[list, str]]: HfArgumentParser reads a Union with str as a str argument.
    weights: list | str | None = field(
        default="depth", metadata={"help": "Per-exit weights: 'depth' (layer/L), 'uniform' or '0.2,0.5,1.0'."}
    )
    task_weight: float = field(default=1.0, metadata={"help": "Weight of each exit's task loss."})
    self_distill_weight: float = field(
        default=1.0, metadata={"help": "Weight of distillation from the deepest exit into the shallower ones."}
    )
    teacher_weight: float = field(
        default=1.0, metadata={"help": "Weight of distillation from an external teacher into every exit."}
    )
    distill_loss: str | None = field(
        default=None,
        metadata={"help": "Registered distillation loss (default: kl for logits, embedding_cosine for embeddings)."},
    )
    distill_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments of that loss, as JSON."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of logit distillation."})
    embedding_task: str = field(
        default="none", metadata={"help": "Encoders: 'none' (distillation only) or 'infonce' (pairs in the batch)."}
    )
    infonce_scale: float = field(default=20.0, metadata={"help": "Logit scale of InfoNCE."})
    distill_positives: bool = field(
        default=False,
        metadata={
            "help": "Encoders: also distil the positive texts (query and positive embeddings "
            "concatenated, queries first); needs positive_* batch keys."
        },
    )
    extra_pairs_weight: float = field(
        default=0.0,
        metadata={
            "help": "Encoders: weight of additional (query, positive) pairs, e.g. inverse-cloze "
            "pairs (batch keys extra_input_ids / extra_attention_mask / "
            "extra_positive_input_ids / extra_positive_attention_mask), scored by their "
            "own in-batch InfoNCE and added to every exit's task loss; 0: off."
        },
    )
    embedding_losses_fp32: bool = field(
        default=False,
        metadata={
            "help": "Encoders: pool and compute the loss terms in float32 with autocast off "
            "(the forward passes keep the Trainer's precision)."
        },
    )

    def __post_init__(self):
        self.weights = _parse_weights(self.weights)
        self.distill_kwargs = parse_mapping(self.distill_kwargs, "distill_kwargs", str)
        for name in ("task_weight", "self_distill_weight", "teacher_weight", "extra_pairs_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.embedding_task not in ("none", "infonce"):
            raise ValueError(f"embedding_task must be 'none' or 'infonce', got {self.embedding_task!r}")
        if self.extra_pairs_weight > 0 and (self.embedding_task != "infonce" or self.task_weight <= 0):
            raise ValueError(
                "extra_pairs_weight adds InfoNCE over the extra pairs to every exit's task loss: it needs "
                f"embedding_task='infonce' and task_weight > 0 (got embedding_task="
                f"{self.embedding_task!r}, task_weight={self.task_weight})"
            )

    def distill_fn(self, kind: str):
        """``(name, function)`` of the distillation loss for exits of ``kind`` (``logits`` or ``embedding``)."""
        name = self.distill_loss or ("kl" if kind == "logits" else "embedding_cosine")
        spec = get_loss_spec(name)
        if spec.kind != kind or spec.function is None:
            examples = "kl, jsd, reverse_kl" if kind == "logits" else "embedding_cosine, embedding_mse, affinity_kl"
            raise ValueError(
                f"distill_loss={name!r} is a {spec.kind!r} loss; these exits produce {kind!r} outputs "
                f"(pick e.g. {examples})"
            )
        return name, spec.function
