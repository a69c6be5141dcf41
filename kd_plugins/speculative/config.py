"""``SpeculativeConfig``: how draft/target acceptance is measured, parseable by ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SpeculativeConfig"]


@dataclass
class SpeculativeConfig:
    """How a draft model is scored against its target (see ``docs/speculative.md``).

    Args:
        temperature: ``None`` or ``0``: greedy decoding, where a drafted token is accepted when it is the target's
            argmax (analytic acceptance ``1[argmax p == argmax q]``). ``T > 0``: speculative sampling at temperature
            ``T``, acceptance ``sum_v min(p_v, q_v)`` with ``p``, ``q`` softmaxed at ``T`` (also the sampling
            temperature of :func:`~kd_plugins.speculative.measure_speculative` when ``do_sample``).
        num_draft_tokens: ``gamma``, tokens the draft proposes per round (a constant schedule, no confidence cut).
        do_sample: ``measure_speculative``: speculative sampling instead of greedy assisted generation.
        max_new_tokens: ``measure_speculative``: tokens generated per prompt.
        warmup: ``measure_speculative``: run both generations once, untimed, on the first prompt before timing.
        every_n_steps: ``DraftEvalCallback``: also log ``draft_acceptance`` every this many optimizer steps
            (0: only at evaluation).
        on_evaluate: ``DraftEvalCallback``: add ``eval_draft_acceptance`` to every evaluation's metrics.
        max_eval_batches: ``DraftEvalCallback``: score at most this many batches of its evaluation data
            (``None``: all of them).
        eval_batch_size: ``DraftEvalCallback`` with ``eval_dataset``: batch size of its loader (``None``: the
            Trainer's ``per_device_eval_batch_size``).
    """

    temperature: float | None = field(
        default=None,
        metadata={"help": "None or 0: greedy acceptance (argmax agreement); T > 0: sum_v min(p, q) at temperature T."},
    )
    num_draft_tokens: int = field(default=4, metadata={"help": "Tokens the draft proposes per round (gamma)."})
    do_sample: bool = field(
        default=False, metadata={"help": "measure_speculative: speculative sampling instead of greedy decoding."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "measure_speculative: tokens generated per prompt."})
    warmup: bool = field(
        default=True, metadata={"help": "measure_speculative: one untimed run of each generation before timing."}
    )
    every_n_steps: int = field(
        default=0,
        metadata={"help": "DraftEvalCallback: log draft_acceptance every N optimizer steps (0: at evaluation only)."},
    )
    on_evaluate: bool = field(
        default=True, metadata={"help": "DraftEvalCallback: add eval_draft_acceptance to each evaluation's metrics."}
    )
    max_eval_batches: int | None = field(
        default=None, metadata={"help": "DraftEvalCallback: score at most this many evaluation batches (None: all)."}
    )
    eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "DraftEvalCallback: batch size for eval_dataset (None: per_device_eval_batch_size)."},
    )

    def __post_init__(self):
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(
                f"SpeculativeConfig.temperature must be None or >= 0 (None/0: greedy), got {self.temperature!r}"
            )
        if self.temperature == 0:
            self.temperature = None
        for name in ("num_draft_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SpeculativeConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 0:
            raise ValueError(
                f"SpeculativeConfig.every_n_steps must be an integer >= 0 (0: at evaluation only), "
                f"got {self.every_n_steps!r}"
            )
        for name in ("max_eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"SpeculativeConfig.{name} must be None or an integer >= 1, got {value!r}")
