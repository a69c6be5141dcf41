"""Cross-tokenizer terms in the distillation core: a teacher that reads the student's text through its own tokenizer.

Terms of loss kind ``cross_tokenizer`` (``alm``, ``uld``, see :mod:`kd_plugins.losses.cross_tokenizer`) need no
shared vocabulary. :class:`CrossTokenizerTerms` is the engine's teacher source for them: at setup it checks the pair
and wraps the engine's :class:`~kd_plugins.distill.teacher.Teacher` (already placed with the student) in a
:class:`kd_plugins.crosstok.CrossTokenizerTeacher`; per batch it re-tokenizes the student's rows for the teacher,
runs it and aligns chunks (:meth:`teacher_outputs`), then computes every term with
:func:`kd_plugins.crosstok.cross_tokenizer_loss` (``reduction="sum"``) and normalises it like the task loss
(:meth:`add_terms`).

Normalisation (chosen, documented in ``docs/cross_tokenizer.md``): a term's sum over scored chunks (ALM) or rows
(ULD) is divided by the micro-batch's **label tokens**, the count the task loss uses
(:meth:`kd_plugins.distill.scaling.LossScaling.token_sum`). Under gradient accumulation with a Trainer that
normalises by ``num_items_in_batch`` the divisor is the accumulated batch's label tokens, so two micro-batches give
the same update as one batch holding both. The per-chunk mean would need the chunk count of the whole accumulated
batch, which the Trainer does not know; with ~1.1 tokens per chunk the term is ~0.9 x the per-chunk mean.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..losses import get_loss_spec
from ..losses._common import IGNORE_INDEX

# ``engine`` arguments are the DistillationEngine (typed Any: engine.py imports this module, not the reverse);
# kd_plugins.crosstok imports distill.teacher, so it is imported lazily below.

__all__ = ["CROSS_TOKENIZER", "CrossTokenizerTerms", "cross_tokenizer_term_names", "label_token_count"]

CROSS_TOKENIZER = "cross_tokenizer"
#: ``DistillationConfig.cross_tokenizer_options`` keys, with their types (string shorthand values are converted).
OPTION_TYPES = {
    "max_teacher_length": int,
    "uld_positions": str,
    "on_round_trip_error": str,
    "check_coverage": bool,
    "hidden_layers": str,
    "chat": bool,
}


def cross_tokenizer_term_names(config) -> list[str]:
    """Names in ``config.loss_terms`` whose loss kind is ``cross_tokenizer``."""
    return [n for n, k in config.kinds.items() if k == CROSS_TOKENIZER]


def _same_vocab(a, b) -> bool:
    return a is b or (hasattr(a, "get_vocab") and hasattr(b, "get_vocab") and a.get_vocab() == b.get_vocab())


def _option(key: str, value: Any) -> Any:
    kind = OPTION_TYPES[key]
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"cross_tokenizer_options[{key!r}] must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return kind(value)


class CrossTokenizerTerms:
    """The cross-tokenizer teacher source and terms of one :class:`DistillationEngine` (see the module docstring).

    Built by :meth:`for_engine` at setup; ``None`` there when the config names no ``cross_tokenizer`` term.
    """

    def __init__(self, engine: Any, names: list[str]):
        from ..crosstok.teacher import CrossTokenizerTeacher

        self.engine, self.names = engine, names
        self.need_logits = any(get_loss_spec(n).name == "uld" for n in names)
        #: ``chunk_hidden`` compares hidden states: the student then runs with ``output_hidden_states=True``.
        self.need_hidden = any(get_loss_spec(n).name == "chunk_hidden" for n in names)
        self.options = self._options(engine)
        if "hidden_layers" in self.options and not self.need_hidden:
            raise ValueError(
                f"cross_tokenizer_options sets hidden_layers but loss_terms {names} has no 'chunk_hidden' term, which "
                "is the only one that reads hidden states; add chunk_hidden or drop the option."
            )
        self.source = CrossTokenizerTeacher(
            engine.runner, engine.student_tokenizer, engine.teacher_tokenizer, **self.options
        )
        self.kwargs = {n: self._loss_kwargs(n) for n in names}

    # ------------------------------------------------------------------------------------------ setup checks
    @classmethod
    def for_engine(cls, engine: Any) -> CrossTokenizerTerms | None:
        """Check the config, task and tokenizers for cross-tokenizer terms and build the source (``None`` when the
        config has no such term, or when a teacher cache stands in for the teacher: the cache refuses them)."""
        cfg = engine.config
        names = cross_tokenizer_term_names(cfg)
        if cfg.cross_tokenizer_options and not names:
            raise ValueError(
                f"cross_tokenizer_options {cfg.cross_tokenizer_options} is set but loss_terms {sorted(cfg.kinds)} "
                "names no cross-tokenizer term; add 'alm' or 'uld' to loss_terms or drop the options."
            )
        if not names or engine.cache is not None:
            return None
        other = sorted(n for n, k in cfg.kinds.items() if k != CROSS_TOKENIZER)
        if other or cfg.feature_pairs:
            raise ValueError(
                f"The cross-tokenizer terms {names} compare a teacher and a student with different tokenizers; the "
                f"terms {other or sorted(cfg.feature_pairs)} are token-level terms that need one shared tokenizer "
                "(the positions and vocabularies differ). Keep only 'alm' / 'uld' / 'chunk_hidden' (plus "
                "hard_label_weight)."
            )
        if engine.task != "causal_lm":
            raise ValueError(
                f"The cross-tokenizer terms {names} score the text with causal language models; the student is a "
                f"{engine.task!r} model. Use an AutoModelForCausalLM student (and teacher)."
            )
        if cfg.fused_loss:
            raise ValueError(
                f"fused_loss=True cannot compute the cross-tokenizer terms {names}: they need the student's full "
                "logits and the teacher's own tokenization. Set fused_loss=None (automatic) or False."
            )
        cls._check_tokenizers(engine, names)
        cls._check_widths(engine, names)
        return cls(engine, names)

    @staticmethod
    def _check_widths(engine: Any, names: list[str]) -> None:
        """``chunk_hidden`` compares hidden states channel by channel: the two models need the same hidden size."""
        if not any(get_loss_spec(n).name == "chunk_hidden" for n in names):
            return
        widths = [getattr(getattr(m, "config", None), "hidden_size", None) for m in (engine.student, engine.teacher)]
        if None not in widths and widths[0] != widths[1]:
            raise ValueError(
                f"chunk_hidden compares hidden states channel by channel, but the student's hidden size is {widths[0]} "
                f"and the teacher's {widths[1]}. Use it for students of the teacher's width (e.g. tokenizer transfer), "
                "or drop chunk_hidden and keep 'alm'."
            )

    @staticmethod
    def _check_tokenizers(engine: Any, names: list[str]) -> None:
        tt, st = engine.teacher_tokenizer, engine.student_tokenizer
        if tt is None:
            raise ValueError(
                f"The cross-tokenizer terms {names} re-tokenize the student's text for the teacher, so they need "
                "the teacher's tokenizer: pass DistillationCallback(teacher, config, teacher_tokenizer="
                "AutoTokenizer.from_pretrained(<teacher>)) (DistillationTrainer(..., teacher_tokenizer=...), "
                "DistillationEngine(..., teacher_tokenizer=...))."
            )
        if st is None:
            raise ValueError(
                f"The cross-tokenizer terms {names} decode the student's ids, so they need the student's tokenizer: "
                "give the Trainer processing_class=<student tokenizer> (or DistillationEngine(..., "
                "student_tokenizer=...))."
            )
        if _same_vocab(tt, st):
            raise ValueError(
                f"The teacher and student tokenizers are the same, but loss_terms names the cross-tokenizer terms "
                f"{names}. With one tokenizer, distil the next-token distributions position by position: use "
                "loss_terms='kl' (or another logit loss)."
            )

    @staticmethod
    def _options(engine: Any) -> dict:
        opts = {}
        for key, value in engine.config.cross_tokenizer_options.items():
            if key not in OPTION_TYPES:
                raise ValueError(
                    f"cross_tokenizer_options has the unknown key {key!r}; choose from {sorted(OPTION_TYPES)}."
                )
            opts[key] = _option(key, value)
        if "max_teacher_length" not in opts:  # never feed the teacher more positions than it has
            limit = getattr(getattr(engine.teacher, "config", None), "max_position_embeddings", None)
            if isinstance(limit, int) and limit >= 2:
                opts["max_teacher_length"] = limit
        return opts

    def _loss_kwargs(self, name: str) -> dict:
        cfg = self.engine.config
        kw = dict(cfg.loss_kwargs.get(name, {}))
        if "reduction" in kw:
            raise ValueError(
                f"loss_kwargs[{name!r}] sets 'reduction'; the engine sums the term and normalises it like the task "
                "loss. Drop it."
            )
        if get_loss_spec(name).name == "uld":  # the config's temperature applies unless the term sets its own
            kw.setdefault("student_temperature", cfg.temperature)
            kw.setdefault("teacher_temperature", cfg.temperature)
        params = inspect.signature(get_loss_spec(name).function).parameters
        allowed = {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY} - {"mask", "num_items_in_batch"}
        unknown = sorted(set(kw) - allowed)
        if unknown:
            raise ValueError(f"loss_kwargs[{name!r}] has unknown keys {unknown}; {name} takes {sorted(allowed)}")
        return kw

    # ------------------------------------------------------------------------------------------ per batch
    def teacher_outputs(self, inputs: dict) -> dict:
        """Re-tokenize the batch for the teacher, run it (frozen, ``no_grad``) and align chunks."""
        from ..crosstok.teacher import RoundTripError

        try:
            return self.source.forward_batch(inputs, need_logits=self.need_logits, need_hidden=self.need_hidden)
        except RoundTripError as e:
            raise RoundTripError(
                f"{e} In a distillation run: tokenize whole texts (rows cut inside a word may not round-trip), or "
                "set DistillationConfig(cross_tokenizer_options='on_round_trip_error=skip_row') to skip such rows "
                "(their count is logged as crosstok_skipped_rows)."
            ) from None

    def add_terms(self, terms, inputs: dict, s_out: Any, t_out: dict, scaling) -> None:
        """Every cross-tokenizer term as a sum over chunks (rows), normalised per label token like the task loss."""
        from ..crosstok.teacher import cross_tokenizer_loss

        if not isinstance(t_out, dict) or "chunk_ids_student" not in t_out:
            raise ValueError(
                "The cross-tokenizer terms need the output of a CrossTokenizerTeacher (chunk alignment, teacher chunk "
                "log-probabilities); the teacher outputs given to compute() are something else."
            )
        logits = s_out["logits"] if isinstance(s_out, dict) else s_out[1]
        hidden = s_out.get("hidden_states") if isinstance(s_out, dict) else getattr(s_out, "hidden_states", None)
        labels = inputs.get("labels")
        count = label_token_count(inputs)
        for name in self.names:
            value = cross_tokenizer_loss(
                logits, inputs, t_out, name, reduction="sum", student_hidden_states=hidden, **self.kwargs[name]
            )
            mean = value / max(count, 1)
            terms.add(name, scaling.token_sum(value, count) if labels is not None else scaling.mean(mean), mean)
        terms.metrics["crosstok_skipped_rows"] = float(len(t_out.get("skipped_rows", ())))


def label_token_count(inputs: dict) -> int:
    """Positions a causal LM's task loss scores in this micro-batch: labels ``[:, 1:]`` other than ``-100`` (as the
    Trainer counts ``num_items_in_batch``) at non-padding positions; every non-padding position without labels."""
    ids, labels, attn = inputs["input_ids"], inputs.get("labels"), inputs.get("attention_mask")
    valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    if labels is not None:
        valid &= labels[:, 1:] != IGNORE_INDEX
    if attn is not None:
        valid &= attn[:, 1:].bool()
    return int(valid.sum())
