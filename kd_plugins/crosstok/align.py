"""Chunk alignment between two tokenizations of the same text, by UTF-8 byte offsets.

Approximate Likelihood Matching (ALM; Minixhofer, Vulić and Ponti, "Cross-Tokenizer Distillation via Approximate
Likelihood Matching") compares the likelihoods two models with different tokenizers give to the same *chunks* of
text: the shortest spans at whose ends both tokenizations end a token. This module computes those chunks.

Rules (see ``docs/cross_tokenizer.md``):

* **Positions are UTF-8 bytes.** Hugging Face offsets count characters; they are converted with the byte length of
  every character, so "é" is 2 bytes and "👨" 4 on both sides.
* **Special tokens** (empty offsets: BOS, EOS, ``[CLS]``, ...) belong to no chunk (chunk id ``-1``). BOS/EOS
  asymmetry between the tokenizers is therefore harmless.
* **Whitespace** belongs to the token that follows it (the leading-space convention of ``Ġ`` and ``▁``): a token
  covers the bytes from the end of the previous token of its side to its own end. A tokenizer whose offsets leave the
  leading space out (``trim_offsets``, WordPiece, which drops whitespace) and one whose offsets include it therefore
  end their tokens at the same bytes, and whitespace-only tokens (``Ċ``, ``ĠĠ``) join the chunk of the next word.
* **Characters split into several byte tokens** (byte-level BPE) share one character's offsets: a token whose span
  overlaps the next token's cannot end a chunk, so a chunk never ends inside a character.
* A chunk closes at every byte position where both sides close a token. Tokens after the last common position
  (typically a trailing whitespace token that the other side does not have) belong to no chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "AlignmentError",
    "ChunkAlignment",
    "align_offsets",
    "align_text",
    "alignment_stats",
    "byte_offsets",
    "chunk_id_tensors",
    "tokenize_with_offsets",
]

Offsets = Sequence[tuple[int, int]]


class AlignmentError(ValueError):
    """Two tokenizations cannot be aligned (no common token boundary, malformed offsets, dropped characters)."""


@dataclass(frozen=True)
class ChunkAlignment:
    """Chunks shared by two tokenizations of one text.

    Attributes:
        student_chunk_ids: per student token, its chunk index, or ``-1`` (special token or after the last chunk).
        teacher_chunk_ids: the same for the teacher's tokens.
        chunk_spans: per chunk, its UTF-8 byte range ``[start, end)`` in the text; consecutive and non-overlapping.
        student_ids / teacher_ids: the token ids, when the alignment was computed from a text by :func:`align_text`.
    """

    student_chunk_ids: tuple[int, ...]
    teacher_chunk_ids: tuple[int, ...]
    chunk_spans: tuple[tuple[int, int], ...]
    student_ids: tuple[int, ...] | None = None
    teacher_ids: tuple[int, ...] | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_spans)

    def tokens_per_chunk(self, side: str) -> list[int]:
        """Number of ``side`` (``"student"`` or ``"teacher"``) tokens in each chunk."""
        ids = {"student": self.student_chunk_ids, "teacher": self.teacher_chunk_ids}[side]
        counts = [0] * self.num_chunks
        for c in ids:
            if c >= 0:
                counts[c] += 1
        return counts

    def one_to_one(self) -> list[bool]:
        """Per chunk: exactly one token on each side."""
        return [s == 1 and t == 1 for s, t in zip(self.tokens_per_chunk("student"), self.tokens_per_chunk("teacher"))]


# ------------------------------------------------------------------------------------------------ offsets
def byte_offsets(text: str, char_offsets: Offsets) -> list[tuple[int, int]]:
    """Character offsets (as Hugging Face returns them) -> UTF-8 byte offsets into ``text``."""
    sizes = [len(ch.encode("utf-8", "surrogatepass")) for ch in text]
    starts = [0, *itertools.accumulate(sizes)]  # starts[c] = byte position of character c
    out = []
    for i, (s, e) in enumerate(char_offsets):
        if not 0 <= s <= e <= len(text):
            raise AlignmentError(
                f"token {i} has character offsets ({s}, {e}) outside the text of {len(text)} characters; the "
                "offsets do not belong to this text."
            )
        out.append((starts[s], starts[e]))
    return out


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, character offsets)`` from a fast Hugging Face tokenizer or a ``tokenizers.Tokenizer``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False, verbose=False
        )
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if hasattr(tokenizer, "encode") and type(tokenizer).__module__.startswith("tokenizers"):
        enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    raise TypeError(
        f"{type(tokenizer).__name__} gives no character offsets (a slow, pure-Python tokenizer); chunk alignment "
        "needs a fast tokenizer: load it with AutoTokenizer.from_pretrained(name_or_path) (use_fast=True, the "
        "default) or convert it with transformers' convert_slow_tokenizer."
    )


def tokenize_with_offsets(
    tokenizer, text: str, *, add_special_tokens: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, byte_offsets)`` of ``text`` under a fast Hugging Face tokenizer (or a ``tokenizers.Tokenizer``);
    raises ``TypeError`` for a slow tokenizer, which has no offsets."""
    ids, offsets = _encode(tokenizer, text, add_special_tokens)
    return ids, byte_offsets(text, offsets)


# ------------------------------------------------------------------------------------------------ alignment
def _segments(offsets: Offsets, side: str) -> tuple[list[int], list[int]]:
    """Per token its segment (``-1`` for empty offsets) and per segment its end byte.

    A segment is a run of tokens that ends where no later token starts before its end (so never inside a
    character that byte-level BPE split into several tokens).
    """
    real = [i for i, (s, e) in enumerate(offsets) if e > s]
    seg_of = [-1] * len(offsets)
    ends: list[int] = []
    for k, i in enumerate(real):
        s, e = offsets[i]
        if k:
            ps, pe = offsets[real[k - 1]]
            if s < ps or e < pe:
                raise AlignmentError(
                    f"{side} token {i} has byte offsets ({s}, {e}) before those of token {real[k - 1]} ({ps}, {pe}); "
                    "offsets must be non-decreasing (one tokenization of one text, in order)."
                )
        seg_of[i] = len(ends)
        next_start = offsets[real[k + 1]][0] if k + 1 < len(real) else e
        if next_start >= e:
            ends.append(e)
    return seg_of, ends


def align_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> ChunkAlignment:
    """Chunks of two tokenizations given as UTF-8 byte offsets ``(start, end)`` into the same text.

    Tokens with empty offsets (``start == end``: special tokens) get chunk ``-1``. Raises :class:`AlignmentError`
    when both sides have tokens but no byte position where both end one (the offsets describe different texts).
    """
    s_seg, s_ends = _segments(student_offsets, "student")
    t_seg, t_ends = _segments(teacher_offsets, "teacher")
    s_chunk, t_chunk = [-1] * len(s_ends), [-1] * len(t_ends)
    spans: list[tuple[int, int]] = []
    i = j = start = 0
    while i < len(s_ends) and j < len(t_ends):
        a, b = s_ends[i], t_ends[j]
        if a <= b:
            s_chunk[i] = len(spans)
            i += 1
        if b <= a:
            t_chunk[j] = len(spans)
            j += 1
        if a == b:
            spans.append((start, a))
            start = a
    # Segments after the last common boundary belong to no chunk.
    s_chunk = [c if c < len(spans) else -1 for c in s_chunk]
    t_chunk = [c if c < len(spans) else -1 for c in t_chunk]
    if not spans and s_ends and t_ends:
        raise AlignmentError(
            f"no common token boundary: the student ends tokens at bytes {s_ends[:5]}..., the teacher at "
            f"{t_ends[:5]}...; the two tokenizations do not cover the same text."
        )
    return ChunkAlignment(
        student_chunk_ids=tuple(s_chunk[g] if g >= 0 else -1 for g in s_seg),
        teacher_chunk_ids=tuple(t_chunk[g] if g >= 0 else -1 for g in t_seg),
        chunk_spans=tuple(spans),
    )


def _check_coverage(text: str, char_offsets: Offsets, side: str) -> None:
    """Every non-whitespace character must lie inside a token: a tokenizer that drops characters (a normaliser
    removing control or zero-width characters) describes another text, and its likelihoods cannot be matched."""
    covered = [False] * len(text)
    for s, e in char_offsets:
        covered[s:e] = [True] * (e - s)
    dropped = [(c, ch) for c, ch in enumerate(text) if not covered[c] and not ch.isspace()]
    if dropped:
        shown = ", ".join(f"U+{ord(ch):04X} at character {c}" for c, ch in dropped[:5])
        raise AlignmentError(
            f"the {side} tokenizer covers no token over {len(dropped)} non-whitespace character(s) ({shown}): its "
            "normaliser drops them, so its tokens describe another text. Clean the text first (remove those "
            "characters), or pass check_coverage=False to absorb them into the next token."
        )


def align_text(
    text: str,
    student_tokenizer,
    teacher_tokenizer,
    *,
    add_special_tokens: bool = True,
    check_coverage: bool = True,
) -> ChunkAlignment:
    """Tokenize ``text`` with both (fast) tokenizers and align the two tokenizations into chunks.

    Args:
        text: the text both models read.
        student_tokenizer, teacher_tokenizer: fast Hugging Face tokenizers (offsets are required).
        add_special_tokens: let each tokenizer add its own special tokens (BOS/EOS/...); they get chunk ``-1``.
        check_coverage: raise when a tokenizer leaves a non-whitespace character out of every token.

    Returns:
        A :class:`ChunkAlignment` with ``student_ids`` and ``teacher_ids`` filled.
    """
    out = {}
    for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        ids, char_offs = _encode(tok, text, add_special_tokens)
        if check_coverage:
            _check_coverage(text, char_offs, side)
        out[side] = (ids, byte_offsets(text, char_offs))
    aln = align_offsets(out["student"][1], out["teacher"][1])
    if not aln.num_chunks and text.strip():
        raise AlignmentError(f"no chunk found in a text with content ({text[:40]!r}...): a tokenizer gave no tokens.")
    return ChunkAlignment(
        aln.student_chunk_ids,
        aln.teacher_chunk_ids,
        aln.chunk_spans,
        tuple(out["student"][0]),
        tuple(out["teacher"][0]),
    )


# ------------------------------------------------------------------------------------------------ batches
def chunk_id_tensors(
    alignments: Sequence[ChunkAlignment],
    *,
    student_length: int | None = None,
    teacher_length: int | None = None,
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded chunk-id tensors of a batch: ``(student [B, T_s], teacher [B, T_t], num_chunks [B])``.

    Padding positions hold ``-1``. Lengths default to the longest row; a row longer than a given length raises.
    ``padding_side`` (``"right"`` or ``"left"``) must match how the token ids were padded.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    tensors = []
    for side, length in (("student", student_length), ("teacher", teacher_length)):
        rows = [getattr(a, f"{side}_chunk_ids") for a in alignments]
        width = max((len(r) for r in rows), default=0) if length is None else length
        out = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            if len(r) > width:
                raise ValueError(f"{side} row {b} has {len(r)} tokens, more than {side}_length={width}")
            if r:
                sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
                out[b, sl] = torch.tensor(r, dtype=torch.long)
        tensors.append(out)
    num = torch.tensor([a.num_chunks for a in alignments], dtype=torch.long)
    return tensors[0], tensors[1], num


def alignment_stats(alignments: Sequence[ChunkAlignment]) -> dict[str, float]:
    """Chunk statistics over many alignments: texts, chunks, fraction of 1:1 chunks and tokens per chunk on each
    side (tokens outside every chunk are not counted)."""
    chunks = sum(a.num_chunks for a in alignments)
    one = sum(sum(a.one_to_one()) for a in alignments)
    s_in = sum(sum(1 for c in a.student_chunk_ids if c >= 0) for a in alignments)
    t_in = sum(sum(1 for c in a.teacher_chunk_ids if c >= 0) for a in alignments)
    return {
        "texts": len(alignments),
        "chunks": chunks,
        "one_to_one_fraction": one / max(chunks, 1),
        "student_tokens_per_chunk": s_in / max(chunks, 1),
        "teacher_tokens_per_chunk": t_in / max(chunks, 1),
    }
