"""Counting accepted draft tokens inside Hugging Face assisted generation.

``target.generate(..., assistant_model=draft)`` verifies the draft's proposals round by round but returns only the
tokens. Each round, transformers (checked against 5.x) asks a *candidate generator* for proposals
(``get_candidates(input_ids)`` returns the ids with the proposals appended) and, after verification, reports the
number of proposals the target kept as ``update_candidate_strategy(input_ids, scores, num_matches)``. ``generate``
accepts no candidate generator from the caller: it builds one per call in the model's private
``_get_candidate_generator``. :func:`record_acceptance` therefore shadows that method on the *target instance* only
(an instance attribute, removed on exit) with a wrapper that builds the generator as transformers does and wraps the
two methods of that one generator object to record ``(proposed, accepted)`` per round. The draft's
``generation_config`` is set for the measurement (``num_assistant_tokens = gamma``, the ``"constant"`` schedule, no
``assistant_confidence_threshold``, which would cut drafts short) and restored on exit. Nothing else is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["GenerationRounds", "AcceptanceRecorder", "record_acceptance"]

#: Draft ``generation_config`` fields that fix the number of proposals per round.
_DRAFT_SETTINGS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@dataclass
class GenerationRounds:
    """Rounds of one assisted ``generate`` call: tokens proposed by the draft and accepted by the target."""

    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


class AcceptanceRecorder:
    """Collects one :class:`GenerationRounds` per assisted ``generate`` call (see :func:`record_acceptance`)."""

    def __init__(self):
        self.calls: list[GenerationRounds] = []

    def watch(self, generator) -> None:
        """Wrap this candidate generator's ``get_candidates`` / ``update_candidate_strategy`` (the object lives for
        one ``generate`` call)."""
        rounds = GenerationRounds()
        self.calls.append(rounds)
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

        def counting_get_candidates(input_ids, *args, **kwargs):
            candidate_ids, candidate_logits = get_candidates(input_ids, *args, **kwargs)
            rounds.proposed.append(int(candidate_ids.shape[-1] - input_ids.shape[-1]))
            return candidate_ids, candidate_logits

        def counting_update(input_ids, scores, num_matches):
            rounds.accepted.append(int(num_matches))
            return update(input_ids, scores, num_matches)

        generator.get_candidates = counting_get_candidates
        generator.update_candidate_strategy = counting_update


@contextlib.contextmanager
def record_acceptance(target: nn.Module, draft: nn.Module, num_draft_tokens: int) -> Iterator[AcceptanceRecorder]:
    """Within the block, every ``target.generate(..., assistant_model=draft)`` drafts exactly ``num_draft_tokens``
    tokens per round (fewer only at the length limit or when the draft ends with EOS) and records per round the
    tokens proposed and accepted in the yielded :class:`AcceptanceRecorder`. Everything is restored on exit."""
    if not hasattr(target, "_get_candidate_generator"):
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}: {type(target).__name__} has no _get_candidate_generator, "
            "the hook kd_plugins uses to count accepted draft tokens. Use a transformers 5.x release."
        )
    recorder = AcceptanceRecorder()
    gen_config = draft.generation_config
    saved = {name: getattr(gen_config, name, None) for name in _DRAFT_SETTINGS}
    shadowed = "_get_candidate_generator" in vars(target)
    original = target._get_candidate_generator

    def build_and_watch(*args, **kwargs):
        generator = original(*args, **kwargs)
        recorder.watch(generator)
        return generator

    gen_config.num_assistant_tokens = num_draft_tokens
    gen_config.num_assistant_tokens_schedule = "constant"
    gen_config.assistant_confidence_threshold = 0.0
    target._get_candidate_generator = build_and_watch
    try:
        yield recorder
    finally:
        if shadowed:
            target._get_candidate_generator = original
        else:
            del target._get_candidate_generator
        for name, value in saved.items():
            setattr(gen_config, name, value)
