"""Measured speculative decoding: Hugging Face assisted generation with accepted tokens counted per round.

:func:`measure_speculative` runs, for every prompt, the target alone and the target assisted by the draft
(``target.generate(..., assistant_model=draft)``, one prompt per call: transformers' assisted generation takes batch
size 1), counts the draft tokens proposed and accepted in each round (:mod:`kd_plugins.speculative.hook`), times
both, and with greedy decoding checks that the assisted output equals the target's own output token for token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .._config import resolve_config
from ..distill.teacher import Teacher
from .acceptance import eval_mode
from .config import SpeculativeConfig
from .hook import GenerationRounds, record_acceptance
from .vocab import check_same_vocabulary

__all__ = ["SpeculativeReport", "measure_speculative"]


@dataclass
class SpeculativeReport:
    """What :func:`measure_speculative` measured (``as_dict()`` adds the derived figures).

    Attributes:
        num_draft_tokens: ``gamma``, proposals per round.
        do_sample: speculative sampling (``True``) or greedy assisted generation.
        proposed / accepted: per prompt, per round: draft tokens proposed, and those the target kept. A final round
            can propose fewer (length limit) and keep fewer (tokens after an EOS are dropped).
        new_tokens: per prompt, tokens the assisted generation produced.
        target_seconds / assisted_seconds: wall-clock of the target alone and of assisted generation, all prompts.
        lossless: greedy only: per prompt, whether the assisted output equals the target's greedy output token for
            token (``None`` when sampling: outputs are random).
    """

    num_draft_tokens: int
    do_sample: bool
    proposed: list[list[int]]
    accepted: list[list[int]]
    new_tokens: list[int]
    target_seconds: float
    assisted_seconds: float
    lossless: list[bool] | None

    @property
    def rounds(self) -> int:
        """Rounds over all prompts, i.e. forward passes of the target in assisted generation."""
        return sum(len(r) for r in self.accepted)

    @property
    def mean_accepted_per_round(self) -> float:
        """Accepted draft tokens per round."""
        return sum(map(sum, self.accepted)) / max(self.rounds, 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return sum(map(sum, self.accepted)) / max(sum(map(sum, self.proposed)), 1)

    @property
    def tokens_per_target_forward(self) -> float:
        """Generated tokens per target forward pass (1 for the target alone)."""
        return sum(self.new_tokens) / max(self.rounds, 1)

    @property
    def speedup(self) -> float:
        """Target-alone time over assisted time (above 1: assisted generation is faster)."""
        return self.target_seconds / self.assisted_seconds if self.assisted_seconds > 0 else float("nan")

    @property
    def all_lossless(self) -> bool | None:
        """Greedy: every prompt's assisted output equals the target's; ``None`` when sampling."""
        return None if self.lossless is None else all(self.lossless)

    def as_dict(self) -> dict:
        """The fields and the derived figures, JSON-ready."""
        derived = (
            "rounds",
            "mean_accepted_per_round",
            "acceptance_rate",
            "tokens_per_target_forward",
            "speedup",
            "all_lossless",
        )
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


def _prompt_ids(prompts: Sequence, tokenizer, device: torch.device) -> list[torch.Tensor]:
    """Each prompt as ids ``[1, T]``: strings through ``tokenizer``, id lists / tensors as they are."""
    if isinstance(prompts, (str, torch.Tensor)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of strings or of token-id sequences (one per prompt).")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need the target's tokenizer: measure_speculative(..., tokenizer=tok)")
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; give every prompt some text.")
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {i} has no tokens; give every prompt at least one token.")
        out.append(ids.to(device))
    return out


def _generate_kwargs(cfg: SpeculativeConfig, target: nn.Module, tokenizer, extra: dict | None) -> dict:
    """Keyword arguments of every ``generate`` call (both runs get the same)."""
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        gc = getattr(target, "generation_config", None)
        pad = getattr(gc, "pad_token_id", None)
        if pad is None:
            eos = getattr(gc, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "pad_token_id": pad}
    if cfg.do_sample:
        # top_k=0 / top_p=1: the draft's proposal distribution is then exactly the q of the acceptance rule (a top-k
        # cut on the target's side only would change the measured acceptance).
        kwargs.update(temperature=cfg.temperature or 1.0, top_k=0, top_p=1.0)
    kwargs.update(extra or {})
    return kwargs


def _timed(fn, *args):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - start


def measure_speculative(
    target: nn.Module,
    draft: nn.Module,
    prompts: Sequence,
    tokenizer=None,
    config: SpeculativeConfig | None = None,
    *,
    draft_tokenizer=None,
    generate_kwargs: dict | None = None,
    **overrides,
) -> SpeculativeReport:
    """Speculative decoding of ``prompts`` with ``draft`` proposing for ``target``, measured.

    One ``generate`` call per prompt (transformers' assisted generation takes batch size 1), first the target alone,
    then assisted (``assistant_model=draft``, exactly ``num_draft_tokens`` proposals per round). Both models run in
    eval mode under ``no_grad`` (the target through :class:`~kd_plugins.distill.teacher.Teacher`, hence frozen);
    the draft gets its train/eval state back.

    Args:
        target: the target (verifier) Hugging Face causal LM.
        draft: the draft causal LM, with the target's vocabulary (checked).
        prompts: strings (tokenized with ``tokenizer``) or token-id sequences; none may be empty.
        tokenizer: the target's tokenizer (needed for text prompts; checked against the models' vocabulary).
        config: a :class:`SpeculativeConfig`: ``num_draft_tokens``, ``do_sample``, ``temperature`` (sampling),
            ``max_new_tokens``, ``warmup``.
        draft_tokenizer: the draft's tokenizer, if it has its own: it must map tokens to the same ids.
        generate_kwargs: extra ``generate`` arguments for both runs (e.g. ``{"eos_token_id": None}``).
        **overrides: ``SpeculativeConfig`` fields, e.g. ``num_draft_tokens=4``.
    """
    cfg = resolve_config(SpeculativeConfig, config, overrides)
    teacher = target if isinstance(target, Teacher) else Teacher(target)
    model = teacher.module
    check_same_vocabulary(model, draft, tokenizer, draft_tokenizer)
    prompt_ids = _prompt_ids(prompts, tokenizer, teacher.device)
    kwargs = _generate_kwargs(cfg, model, tokenizer, generate_kwargs)

    def plain(ids):
        return teacher.run(lambda m: m.generate(ids, attention_mask=torch.ones_like(ids), **kwargs))

    def assisted(ids):
        return teacher.run(
            lambda m: m.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, **kwargs)
        )

    with eval_mode(draft), record_acceptance(model, draft, cfg.num_draft_tokens) as recorder:
        if cfg.warmup:
            plain(prompt_ids[0])
            assisted(prompt_ids[0])
        warm_calls = len(recorder.calls)
        target_seconds = assisted_seconds = 0.0
        new_tokens, lossless = [], []
        for ids in prompt_ids:
            alone, seconds = _timed(plain, ids)
            target_seconds += seconds
            out, seconds = _timed(assisted, ids)
            assisted_seconds += seconds
            new_tokens.append(int(out.shape[1] - ids.shape[1]))
            lossless.append(bool(alone.shape == out.shape and torch.equal(alone.to(out.device), out)))
    calls: list[GenerationRounds] = recorder.calls[warm_calls:]
    if len(calls) != len(prompt_ids) or any(not c.accepted for c in calls):
        raise RuntimeError(
            "The acceptance hook saw no assisted-generation rounds: this transformers release builds its candidate "
            "generator differently. kd_plugins.speculative supports transformers 5.x."
        )
    return SpeculativeReport(
        num_draft_tokens=cfg.num_draft_tokens,
        do_sample=cfg.do_sample,
        proposed=[c.proposed for c in calls],
        accepted=[c.accepted for c in calls],
        new_tokens=new_tokens,
        target_seconds=target_seconds,
        assisted_seconds=assisted_seconds,
        lossless=None if cfg.do_sample else lossless,
    )
