"""Sequence-level teachers with another tokenizer: the student's text, re-tokenized for the teacher.

A pooled sentence embedding or a sequence-classification logit row does not depend on how a text is cut into
tokens, so a teacher with another tokenizer can give it for the student's examples: decode the student's tokens
to text, tokenize that text with the teacher's tokenizer, run the teacher. The live engine
(:class:`~kd_plugins.distill.engine.DistillationEngine`) and the teacher cache
(:func:`~kd_plugins.distill.cache.build_teacher_cache` with ``teacher_tokenizer=``) share this one function, so a
cached teacher output equals the live one. Token-level targets need aligned tokens instead (``alm`` / ``uld``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["retokenize"]

#: Tokenizers without a real limit report a huge ``model_max_length`` sentinel; cap what the teacher is given.
_FALLBACK_MAX_LENGTH = 512


def teacher_max_length(teacher_tokenizer: Any, max_length: int | None = None) -> int:
    """``max_length`` when given, else the teacher tokenizer's ``model_max_length`` (512 when it has none)."""
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"teacher max_length must be >= 1, got {max_length}")
        return int(max_length)
    limit = getattr(teacher_tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else _FALLBACK_MAX_LENGTH


def retokenize(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The teacher's inputs for a ``[B, T]`` batch of student token ids: each row's unpadded tokens (per
    ``attention_mask``) decoded without special tokens and tokenized by ``teacher_tokenizer`` (its own special
    tokens, right padding, truncation at :func:`teacher_max_length`)."""
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError("re-tokenizing for the teacher needs both the student's and the teacher's tokenizer")
    ids = torch.as_tensor(input_ids).cpu()
    if attention_mask is None:
        rows = ids.tolist()
    else:
        keep = torch.as_tensor(attention_mask).cpu().bool()
        rows = [row[m].tolist() for row, m in zip(ids, keep)]
    texts = student_tokenizer.batch_decode(rows, skip_special_tokens=True)
    enc = teacher_tokenizer(
        texts,
        padding=True,
        truncation=True,
        return_tensors="pt",
        max_length=teacher_max_length(teacher_tokenizer, max_length),
    )
    return dict(enc)
