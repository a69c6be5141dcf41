"""A teacher with another tokenizer: re-tokenizes the student's batch, runs the teacher, aligns chunks.

:class:`CrossTokenizerTeacher` turns a student batch (``input_ids``, ``attention_mask``, ``labels``) into what the
cross-tokenizer losses need; :func:`cross_tokenizer_loss` computes ALM or ULD from the student's logits and that
output. Per row:

1. The student ids are split at special tokens into text runs. Each run is decoded with the student tokenizer and
   re-tokenized (with offsets); the ids must come back unchanged, otherwise the text does not round-trip and the
   row raises (or is skipped, ``on_round_trip_error="skip_row"``).
2. Each run is tokenized by the teacher tokenizer. The teacher row is the teacher tokenizer's own prefix (its BOS,
   if it adds one) followed by the runs; a student BOS/EOS/SEP/CLS *between* runs (packed documents) becomes the
   teacher's token of the same role. Leading and trailing student special tokens are not copied.
3. Both tokenizations are aligned into chunks (:func:`kd_plugins.crosstok.align.align_offsets`), the teacher runs
   under ``no_grad`` (through :class:`kd_plugins.distill.teacher.Teacher`), and the teacher's chunk
   log-likelihoods are summed.

A chunk is scored (``chunk_mask``) when every token in it has a log-probability on both sides: the token has a
context (not the first of its row), its student label is not ``-100``, and the teacher row was not truncated
before it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distill.teacher import Teacher
from ..losses import get_loss_spec
from ..losses._common import IGNORE_INDEX
from ..losses.cross_tokenizer import (
    alm_loss,
    chunk_hidden_loss,
    chunk_logprobs,
    target_token_logprobs,
    uld_loss,
)
from .align import AlignmentError, ChunkAlignment, _check_coverage, _encode, align_offsets, byte_offsets
from .chat import ChatFormat, ChatFormatError, render_messages

__all__ = ["CrossTokenizerTeacher", "RoundTripError", "cross_tokenizer_loss", "resolve_hidden_layers"]

_ROLES = ("bos", "eos", "sep", "cls")
_ULD_POSITIONS = ("one_to_one", "chunk_start")


class RoundTripError(ValueError):
    """Decoding the student's ids and re-tokenizing the text does not give the same ids (or the teacher's tokens
    do not spell the text): the two models would not read the same text."""


@dataclass
class _Row:
    text: str
    student_offsets: list[tuple[int, int]]  # byte offsets per padded student position ((p, p) outside runs)
    teacher_ids: list[int]
    alignment: ChunkAlignment
    skipped: bool = False


class CrossTokenizerTeacher:
    """A teacher model that reads the student's text through its own tokenizer.

    Args:
        teacher: the teacher model (or a :class:`~kd_plugins.distill.teacher.Teacher`), a causal LM.
        student_tokenizer, teacher_tokenizer: fast Hugging Face tokenizers (offsets are needed).
        max_teacher_length: truncate teacher rows to this many tokens (chunks past the cut are masked).
        uld_positions: rows handed to ULD: ``"one_to_one"`` (default) the positions predicting chunks of one token
            on each side (same context, same target text), ``"chunk_start"`` those predicting the first token of
            every chunk (same context, different target granularity).
        on_round_trip_error: ``"raise"`` (default) or ``"skip_row"`` (the row gets no chunk and is listed in
            ``skipped_rows``).
        check_coverage: raise when a tokenizer drops non-whitespace characters (its tokens spell another text).
        hidden_layers: hidden states gathered for ``chunk_hidden`` (with ``need_hidden=True``): ``"last"`` (default,
            the model's last hidden state), ``"all"`` (every layer's output, not the embeddings; student and teacher
            of the same depth) or indices into the models' ``hidden_states`` (both sides) separated by ``,``, ``;`` or
            ``+`` (``"10;20;30"`` inside an option string).
        chat: the rows are conversations rendered with the student tokenizer's chat template (``SFTTrainer``,
            ``apply_chat_template``): each row is cut into messages (:mod:`kd_plugins.crosstok.chat`), the teacher
            reads the same messages in its own tokenizer's template, and chunks cover message contents only.
    """

    def __init__(
        self,
        teacher: nn.Module | Teacher,
        student_tokenizer,
        teacher_tokenizer,
        *,
        max_teacher_length: int | None = None,
        uld_positions: str = "one_to_one",
        on_round_trip_error: str = "raise",
        check_coverage: bool = True,
        hidden_layers: str = "last",
        chat: bool = False,
    ) -> None:
        _parse_hidden_layers(hidden_layers)  # the spelling is checked now, the depth on the first batch
        if uld_positions not in _ULD_POSITIONS:
            raise ValueError(f"uld_positions must be one of {_ULD_POSITIONS}, got {uld_positions!r}")
        if on_round_trip_error not in ("raise", "skip_row"):
            raise ValueError(f"on_round_trip_error must be 'raise' or 'skip_row', got {on_round_trip_error!r}")
        if max_teacher_length is not None and max_teacher_length < 2:
            raise ValueError(f"max_teacher_length must be >= 2 or None, got {max_teacher_length}")
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        for side, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            try:
                _encode(tok, "a b", False)
            except TypeError as e:
                raise TypeError(f"{side} tokenizer: {e}") from None
        self.max_teacher_length = max_teacher_length
        self.uld_positions = uld_positions
        self.on_round_trip_error = on_round_trip_error
        self.check_coverage = check_coverage
        self.hidden_layers = hidden_layers
        self.chat = ChatFormat.from_tokenizer(student_tokenizer, "student") if chat else None
        self._chat_headers: tuple[str, ...] = ()  # to refuse conversation rows read as plain text
        if not chat and getattr(student_tokenizer, "chat_template", None):
            try:
                self._chat_headers = tuple(ChatFormat.from_tokenizer(student_tokenizer).header.values())
            except ChatFormatError:
                pass
        if chat:
            ChatFormat.from_tokenizer(teacher_tokenizer, "teacher")  # the teacher's template must render dialogues
        self._prefix = self._teacher_prefix()
        self._student_special = set(getattr(student_tokenizer, "all_special_ids", []) or [])
        self._student_unk = _emitted_unknown(student_tokenizer)
        self._teacher_unk = _emitted_unknown(teacher_tokenizer)
        pad = teacher_tokenizer.pad_token_id
        self._teacher_pad = pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)

    # ------------------------------------------------------------------------------------------ text preparation
    def _teacher_prefix(self) -> list[int]:
        """The special tokens the teacher tokenizer puts before a text (its BOS), found by encoding a probe."""
        tok = self.teacher_tokenizer
        with_sp, _ = _encode(tok, "a b", True)
        plain, _ = _encode(tok, "a b", False)
        for k in range(len(with_sp) - len(plain) + 1):
            if with_sp[k : k + len(plain)] == plain:
                return with_sp[:k]
        raise ValueError(
            f"{type(tok).__name__}: cannot find the text's tokens inside its encoding with special tokens "
            f"({with_sp} vs {plain}); the teacher tokenizer's special-token template is not prefix/suffix."
        )

    def _map_special(self, sid: int, where: str) -> int:
        for role in _ROLES:
            if sid == getattr(self.student_tokenizer, f"{role}_token_id", None):
                tid = getattr(self.teacher_tokenizer, f"{role}_token_id", None)
                if tid is None:
                    raise ValueError(
                        f"{where}: the student's {role.upper()} token separates two texts but the teacher tokenizer "
                        f"has no {role}_token; set teacher_tokenizer.{role}_token or do not pack documents."
                    )
                return tid
        token = self.student_tokenizer.convert_ids_to_tokens(sid)
        raise ValueError(
            f"{where}: special token {token!r} (id {sid}) inside the text has no teacher equivalent (only BOS, EOS, "
            "SEP and CLS are mapped). For conversations (chat-template rows) pass chat=True "
            "(DistillationConfig(cross_tokenizer_options='chat=true')): the teacher then reads the messages in its own "
            "chat template."
        )

    def _run(self, ids: list[int], where: str) -> tuple[str, list, list[int], list]:
        """Decode one run of student ids; return its text, student byte offsets, teacher ids and byte offsets."""
        stok, ttok = self.student_tokenizer, self.teacher_tokenizer
        text = stok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again, s_char = _encode(stok, text, False)
        if again != ids:
            k = next((i for i, (a, b) in enumerate(zip(again, ids)) if a != b), min(len(again), len(ids)))
            raise RoundTripError(
                f"{where}: the student ids do not round-trip through their text {text[:60]!r}...: re-tokenizing "
                f"gives {again[k : k + 3]} instead of {ids[k : k + 3]} at token {k}. Typical causes: a row cut "
                "inside a word or a multi-byte character, or ids not produced by this tokenizer. Tokenize whole "
                "texts, or pass on_round_trip_error='skip_row'."
            )
        t_ids, t_char = _encode(ttok, text, False)
        spelled = ttok.decode(t_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "".join(spelled.split()) != "".join(text.split()):
            raise RoundTripError(
                f"{where}: the teacher tokenizer does not spell the text back ({spelled[:60]!r}... for "
                f"{text[:60]!r}...): it normalises or loses characters (lower-casing, unknown tokens), so the teacher "
                "would score another text. Use a teacher tokenizer that covers the text, or "
                "on_round_trip_error='skip_row'."
            )
        if self.check_coverage:
            _check_coverage(text, s_char, "student")
            _check_coverage(text, t_char, "teacher")
        return text, byte_offsets(text, s_char), t_ids, byte_offsets(text, t_char)

    def prepare_row(self, input_ids: Sequence[int], attention_mask: Sequence[int] | None = None, where="row") -> _Row:
        """Text, student offsets, teacher ids and chunk alignment of one (padded) student row."""
        ids = [int(i) for i in input_ids]
        keep = [True] * len(ids) if attention_mask is None else [bool(m) for m in attention_mask]
        if self.chat is not None:
            return self._prepare_chat_row(ids, keep, where)
        self._refuse_conversation([i for i, k in zip(ids, keep) if k], where)
        pos = [p for p in range(len(ids)) if keep[p]]
        runs: list[list[int]] = []  # positions of each run of non-special tokens
        seps: list[int] = []  # positions of the special tokens
        after_special = True
        for p in pos:
            self._refuse_unknown(ids[p], p, where)
            if ids[p] in self._student_special:
                seps.append(p)
                after_special = True
            elif after_special:
                runs.append([p])
                after_special = False
            else:
                runs[-1].append(p)
        s_off = [(0, 0)] * len(ids)
        t_ids, t_off, parts, nbytes = list(self._prefix), [(0, 0)] * len(self._prefix), [], 0
        for r, run in enumerate(runs):
            if r:  # student special tokens between two runs become the teacher's tokens of the same role
                for p in (q for q in seps if runs[r - 1][-1] < q < run[0]):
                    t_ids.append(self._map_special(ids[p], f"{where}, position {p}"))
                    t_off.append((nbytes, nbytes))
            text, so, ti, to = self._run([ids[p] for p in run], f"{where}, tokens {run[0]}..{run[-1]}")
            for p, (a, b) in zip(run, so):
                s_off[p] = (a + nbytes, b + nbytes)
            t_ids += ti
            t_off += [(a + nbytes, b + nbytes) for a, b in to]
            parts.append(text)
            nbytes += len(text.encode("utf-8", "surrogatepass"))
        try:
            aln = align_offsets(s_off, t_off)
        except AlignmentError as e:
            raise AlignmentError(f"{where}: {e}") from None
        return _Row("".join(parts), s_off, t_ids, aln)

    def _refuse_conversation(self, row: list[int], where: str) -> None:
        """Without ``chat=True`` a conversation row would reach the teacher with the student's template markers
        (ChatML's ``<|im_start|>`` mapped to the teacher's BOS): another objective, so it is refused."""
        if not self._chat_headers:
            return
        text = self.student_tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        header = next((h for h in self._chat_headers if h in text), None)
        if header is not None:
            raise ValueError(
                f"{where} is a conversation in the student's chat template (it holds the header {header!r}); pass "
                "chat=True (DistillationConfig(cross_tokenizer_options='chat=true')) so the teacher reads the "
                "messages in its own chat template and only message contents are compared."
            )

    def _refuse_unknown(self, token_id: int, position: int, where: str) -> None:
        if token_id == self._student_unk:
            # An unknown token stands for characters the student tokenizer could not encode: the text is lost.
            raise RoundTripError(
                f"{where}, position {position}: the student ids hold the unknown token "
                f"{self.student_tokenizer.unk_token!r}, so the text the student reads cannot be recovered for the "
                "teacher. Clean the text of characters the student tokenizer cannot encode, or pass "
                "on_round_trip_error='skip_row'."
            )

    def _prepare_chat_row(self, ids: list[int], keep: list[bool], where: str) -> _Row:
        """A conversation row: messages parsed from the student's template, rendered in the teacher's, chunks over
        the message contents (template text on either side is in no chunk)."""
        stok, ttok = self.student_tokenizer, self.teacher_tokenizer
        pos = [p for p in range(len(ids)) if keep[p]]
        row = [ids[p] for p in pos]
        for p in pos:
            self._refuse_unknown(ids[p], p, where)
        text = stok.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        again, s_char = _encode(stok, text, False)
        if again != row:
            raise RoundTripError(
                f"{where}: the student ids do not round-trip through their text {text[:60]!r}... (a conversation "
                "row re-tokenized without added special tokens). Tokenize rows with apply_chat_template, or pass "
                "on_round_trip_error='skip_row'."
            )
        try:
            messages = self.chat.parse(text, getattr(stok, "all_special_tokens", []) or [])
            t_text, t_spans = render_messages(ttok, messages)
        except ChatFormatError as e:
            raise RoundTripError(f"{where}: {e} (chat=True reads every row as a conversation)") from None
        t_ids, t_char = _encode(ttok, t_text, False)
        if self._teacher_unk is not None and self._teacher_unk in t_ids:
            raise RoundTripError(
                f"{where}: the teacher tokenizer writes its unknown token in this conversation: it cannot spell the "
                "text, so the teacher would score another text. Use on_round_trip_error='skip_row'."
            )
        if self.check_coverage:
            _check_coverage(text, s_char, "student")
            _check_coverage(t_text, t_char, "teacher")
        s_regions, t_regions, parts = [], [], []
        for m, (a, b) in zip(messages, t_spans):
            body = t_text[a:b]  # the teacher's template may trim a content: compare the trimmed text on both sides
            k = m.start + m.content.find(body)
            s_regions.append(_char_to_byte_span(text, k, k + len(body)))
            t_regions.append(_char_to_byte_span(t_text, a, b))
            parts.append(body)
        s_mapped = _to_content_bytes(byte_offsets(text, s_char), s_regions)
        t_off = _to_content_bytes(byte_offsets(t_text, t_char), t_regions)
        s_off = [(0, 0)] * len(ids)
        for p, off in zip(pos, s_mapped):
            s_off[p] = off
        try:
            aln = align_offsets(s_off, t_off)
        except AlignmentError as e:
            raise AlignmentError(f"{where}: {e}") from None
        return _Row("".join(parts), s_off, t_ids, aln)

    def _skipped_row(self, length: int) -> _Row:
        t_ids = list(self._prefix) or [self._teacher_pad]
        return _Row("", [(0, 0)] * length, t_ids, ChunkAlignment((-1,) * length, (-1,) * len(t_ids), ()), True)

    # ------------------------------------------------------------------------------------------ batch
    def _teacher_tensors(self, rows: list[_Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """Right-padded teacher ids, attention mask and chunk ids; per row the first chunk lost to truncation."""
        cap = self.max_teacher_length
        width = max(1, max(len(r.teacher_ids) for r in rows))
        width = min(width, cap) if cap is not None else width
        ids = torch.full((len(rows), width), self._teacher_pad, dtype=torch.long)
        chunks = torch.full((len(rows), width), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        cut = []
        for b, r in enumerate(rows):
            n = min(len(r.teacher_ids), width)
            ids[b, :n] = torch.tensor(r.teacher_ids[:n], dtype=torch.long)
            chunks[b, :n] = torch.tensor(r.alignment.teacher_chunk_ids[:n], dtype=torch.long)
            mask[b, : max(n, 1)] = 1  # an empty row attends to one pad token (no all-masked attention row)
            lost = [c for c in r.alignment.teacher_chunk_ids[n:] if c >= 0]
            cut.append(min(lost) if lost else r.alignment.num_chunks)
        return ids.to(device), mask.to(device), chunks.to(device), cut

    def _student_token_mask(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """Student tokens with a log-probability: real, preceded by a real token, and labelled (if labels)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        valid = real & torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
                )
            scored = labels != IGNORE_INDEX
            if bool((scored & (labels != input_ids)).any()):
                raise ValueError(
                    "labels differ from input_ids at labelled positions: pass the causal-LM labels unshifted (a copy "
                    "of input_ids with -100 at ignored positions), as Hugging Face causal LMs take them."
                )
            valid &= scored
        return valid

    def forward_batch(self, batch: dict, *, need_logits: bool = False, need_hidden: bool = False) -> dict:
        """Teacher outputs aligned to the student's chunks for one student batch.

        Args:
            batch: ``input_ids`` ``[B, T_s]`` (left or right padded), optional ``attention_mask`` and ``labels``
                (unshifted, ``-100`` where ignored).
            need_logits: also return the teacher's logits at the ULD positions (``[B, C, V_T]``, memory of a
                full teacher logits tensor).
            need_hidden: also return the teacher's hidden states at the last token of every chunk, for the layers
                ``hidden_layers`` names: ``teacher_hidden_aligned`` ``[L, B, C, D]``, with ``hidden_layer_ids``
                (the indices into the teacher's ``hidden_states``) and ``student_positions_last`` ``[B, C]`` (the
                student position of each chunk's last token, ``-1`` if none).

        Returns:
            A dict, tensors on the student batch's device: ``teacher_chunk_logprobs`` ``[B, C]`` (float32),
            ``chunk_ids_student`` ``[B, T_s]``, ``chunk_ids_teacher`` ``[B, T_t]``, ``num_chunks`` ``[B]``,
            ``chunk_mask`` ``[B, C]`` (chunks to score), ``student_token_mask`` ``[B, T_s]``,
            ``student_positions_aligned`` ``[B, C]`` (student logit row for ULD, ``-1`` if none), ``uld_mask``
            ``[B, C]``, ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, T_t]``, with ``need_logits``
            ``teacher_logits_aligned`` ``[B, C, V_T]``; and ``texts``, ``alignments``, ``skipped_rows`` (lists).
        """
        input_ids = batch["input_ids"]
        attn, labels = batch.get("attention_mask"), batch.get("labels")
        device, (n_rows, length) = input_ids.device, input_ids.shape
        rows, skipped = [], []
        masks = attn.tolist() if attn is not None else [None] * n_rows
        for b, ids in enumerate(input_ids.tolist()):
            try:
                rows.append(self.prepare_row(ids, masks[b], where=f"row {b}"))
            except RoundTripError:
                if self.on_round_trip_error == "raise":
                    raise
                rows.append(self._skipped_row(length))
                skipped.append(b)
        t_ids, t_attn, t_chunks, cut = self._teacher_tensors(rows, device)
        s_chunks = torch.tensor([r.alignment.student_chunk_ids for r in rows], dtype=torch.long, device=device)
        num = torch.tensor([r.alignment.num_chunks for r in rows], dtype=torch.long, device=device)
        s_valid = self._student_token_mask(input_ids, attn, labels)
        t_valid = t_attn.bool() & (torch.arange(t_ids.shape[1], device=device) >= 1)

        extra = {"output_hidden_states": True} if need_hidden else {}
        t_model_out = self.teacher(input_ids=t_ids, attention_mask=t_attn, **extra)
        logits = getattr(t_model_out, "logits", None)
        if logits is None or logits.dim() != 3:
            raise TypeError(
                f"the teacher {type(self.teacher.module).__name__} returned no [B, T, V] logits; cross-tokenizer "
                "distillation needs a causal LM teacher (AutoModelForCausalLM)."
            )
        t_lp = target_token_logprobs(logits, t_ids.to(logits.device)).to(device)
        t_chunk_lp, t_complete = chunk_logprobs(t_lp, t_chunks, num, token_mask=t_valid)
        _, s_complete = chunk_logprobs(torch.zeros(s_chunks.shape, device=device), s_chunks, num, token_mask=s_valid)
        width = t_chunk_lp.shape[1]
        kept = torch.arange(width, device=device) < torch.tensor(cut, device=device)[:, None]
        chunk_mask = t_complete & s_complete & kept

        s_first, s_count = _first_and_count(s_chunks, width)
        t_first, t_count = _first_and_count(t_chunks, width)
        uld_mask = chunk_mask & (s_first >= 1) & (t_first >= 1)
        if self.uld_positions == "one_to_one":
            uld_mask &= (s_count == 1) & (t_count == 1)
        out = {
            "teacher_chunk_logprobs": t_chunk_lp,
            "chunk_ids_student": s_chunks,
            "chunk_ids_teacher": t_chunks,
            "num_chunks": num,
            "chunk_mask": chunk_mask,
            "student_token_mask": s_valid,
            "student_positions_aligned": torch.where(uld_mask, s_first - 1, -1),
            "uld_mask": uld_mask,
            "teacher_input_ids": t_ids,
            "teacher_attention_mask": t_attn,
            "texts": [r.text for r in rows],
            "alignments": [r.alignment for r in rows],
            "skipped_rows": skipped,
        }
        if need_logits:
            t_pos = torch.where(uld_mask, t_first - 1, 0).to(logits.device)
            rows_t = logits.gather(1, t_pos[..., None].expand(-1, -1, logits.shape[-1]))
            out["teacher_logits_aligned"] = rows_t.detach().to(device)
        if need_hidden:
            out.update(self._hidden_at_chunk_ends(t_model_out, t_first, t_count, s_first, s_count, device))
        return out

    def _hidden_at_chunk_ends(self, t_model_out, t_first, t_count, s_first, s_count, device) -> dict:
        """The teacher's ``hidden_layers`` at each chunk's last token, and the student position of that token."""
        states = getattr(t_model_out, "hidden_states", None)
        if not states:
            raise TypeError(
                f"the teacher {type(self.teacher.module).__name__} returned no hidden_states with "
                "output_hidden_states=True; chunk_hidden needs a Hugging Face causal LM teacher."
            )
        layer_ids = resolve_hidden_layers(self.hidden_layers, len(states))
        t_last = torch.where(t_count > 0, t_first + t_count - 1, 0)
        gathered = []
        for i in layer_ids:
            h = states[i]
            pos = t_last.to(h.device)[..., None].expand(-1, -1, h.shape[-1])
            gathered.append(h.gather(1, pos).detach().to(device))
        return {
            "teacher_hidden_aligned": torch.stack(gathered),
            "hidden_layer_ids": layer_ids,
            "hidden_layers": self.hidden_layers,
            "student_positions_last": torch.where(s_count > 0, s_first + s_count - 1, -1),
        }

    __call__ = forward_batch


def _parse_hidden_layers(spec: str) -> str | tuple[int, ...]:
    """``"last"``, ``"all"`` or the integers of a comma-separated list; a clear error for anything else."""
    spec = str(spec).strip()
    if spec in ("last", "all"):
        return spec
    try:  # ';' or '+' also separate, for option strings that already use ',' between keys
        ids = tuple(int(x) for x in re.split(r"[,;+\s]+", spec) if x)
    except ValueError:
        ids = ()
    if not ids:
        raise ValueError(
            f"hidden_layers must be 'last', 'all' or comma-separated indices into hidden_states, got {spec!r}"
        )
    return ids


def resolve_hidden_layers(spec: str, num_states: int, *, teacher_ids: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Indices into a model's ``hidden_states`` (``num_states`` = layers + 1) that ``spec`` names.

    ``"last"``: the last one; ``"all"``: 1 .. ``num_states - 1`` (every layer's output; the embeddings differ by
    design between two tokenizations); otherwise integers separated by ``,``, ``;`` or ``+`` (negative ones count
    from the end).
    ``teacher_ids``: the teacher's resolved indices, which the student's must match in number (a clear error if not).
    """
    parsed = _parse_hidden_layers(spec)
    if parsed == "last":
        ids = (num_states - 1,)
    elif parsed == "all":
        ids = tuple(range(1, num_states))
    else:
        if any(not -num_states <= i < num_states for i in parsed):
            raise ValueError(f"hidden_layers {spec!r} names an index outside the model's {num_states} hidden states")
        ids = tuple(i % num_states for i in parsed)
    if teacher_ids is not None and len(ids) != len(teacher_ids):
        raise ValueError(
            f"hidden_layers={spec!r} gives the student {len(ids)} hidden states and the teacher {len(teacher_ids)} "
            "(different depths); use hidden_layers='last' or name the indices explicitly."
        )
    return ids


def _first_and_count(chunk_ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: the position of its first token (``-1`` if none) and its number of tokens."""
    n_rows, length = chunk_ids.shape
    inside = chunk_ids >= 0
    index = chunk_ids.clamp(min=0)
    count = torch.zeros((n_rows, width), dtype=torch.long, device=chunk_ids.device)
    first = torch.full((n_rows, width), length, dtype=torch.long, device=chunk_ids.device)
    if width:
        count.scatter_add_(1, index, inside.long())
        pos = torch.arange(length, device=chunk_ids.device).expand(n_rows, length)
        first.scatter_reduce_(1, index, torch.where(inside, pos, length), reduce="amin")
    return torch.where(count > 0, first, -1), count


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    student_batch: dict,
    source_output: dict,
    loss: str = "alm",
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    student_hidden_states: Sequence[torch.Tensor] | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """A cross-tokenizer loss from the student's logits and :meth:`CrossTokenizerTeacher.forward_batch` output.

    Args:
        student_logits: ``[B, T_s, V_S]`` logits of the student on ``student_batch["input_ids"]``.
        student_batch: the batch the source output was computed from (``input_ids``).
        source_output: what :class:`CrossTokenizerTeacher` returned for that batch (``need_logits=True`` for ULD).
        loss: a registered ``cross_tokenizer`` loss: ``"alm"``, ``"uld"`` or ``"chunk_hidden"`` (or an alias).
        reduction, num_items_in_batch: as in :func:`kd_plugins.losses.cross_tokenizer.alm_loss`.
        student_hidden_states: ``chunk_hidden`` only: the student's ``hidden_states`` (``output_hidden_states=True``);
            the source must have run with ``need_hidden=True``. Layers as the source's ``hidden_layers`` names them,
            the loss averaged over them.
        loss_kwargs: hyper-parameters of the loss (ALM: ``form``, ``tau``, ``epsilon``; ULD: temperatures;
            chunk_hidden: ``normalize``, ``epsilon``).
    """
    spec = get_loss_spec(loss)
    if spec.kind != "cross_tokenizer":
        raise ValueError(
            f"loss {loss!r} is a {spec.kind!r} loss; cross_tokenizer_loss takes 'alm', 'uld' or 'chunk_hidden'."
        )
    input_ids = student_batch["input_ids"]
    if student_logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match input_ids {tuple(input_ids.shape)}"
        )
    dev = student_logits.device
    if spec.name == "alm":
        s_lp = target_token_logprobs(student_logits, input_ids)
        s_chunks, complete = chunk_logprobs(
            s_lp,
            source_output["chunk_ids_student"].to(dev),
            source_output["num_chunks"].to(dev),
            token_mask=source_output["student_token_mask"].to(dev),
        )
        mask = source_output["chunk_mask"].to(dev) & complete
        teacher = source_output["teacher_chunk_logprobs"].to(dev)
        return alm_loss(
            s_chunks, teacher, mask, reduction=reduction, num_items_in_batch=num_items_in_batch, **loss_kwargs
        )
    if spec.name == "chunk_hidden":
        return _chunk_hidden(student_hidden_states, source_output, reduction, num_items_in_batch, loss_kwargs, dev)
    if "teacher_logits_aligned" not in source_output:
        raise ValueError("ULD needs the teacher's logits: call the CrossTokenizerTeacher with need_logits=True.")
    pos = source_output["student_positions_aligned"].to(dev)
    rows = student_logits.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, student_logits.shape[-1]))
    return uld_loss(
        rows,
        source_output["teacher_logits_aligned"].to(dev),
        mask=source_output["uld_mask"].to(dev),
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        **loss_kwargs,
    )


def _chunk_hidden(student_states, source_output, reduction, num_items_in_batch, loss_kwargs, device) -> torch.Tensor:
    """``chunk_hidden`` averaged over the layers the source gathered (see :func:`cross_tokenizer_loss`)."""
    if "teacher_hidden_aligned" not in source_output:
        raise ValueError(
            "chunk_hidden needs the teacher's hidden states: call the CrossTokenizerTeacher with need_hidden=True."
        )
    if not student_states:
        raise ValueError(
            "chunk_hidden needs the student's hidden states: run the student with output_hidden_states=True and "
            "pass student_hidden_states=outputs.hidden_states."
        )
    teacher = source_output["teacher_hidden_aligned"]
    ids = resolve_hidden_layers(
        source_output["hidden_layers"], len(student_states), teacher_ids=source_output["hidden_layer_ids"]
    )
    pos = source_output["student_positions_last"].to(device)
    mask = source_output["chunk_mask"].to(device) & (pos >= 0)
    values = []
    for k, i in enumerate(ids):
        h = student_states[i]
        rows_s = h.gather(1, pos.clamp(min=0).to(h.device)[..., None].expand(-1, -1, h.shape[-1]))
        values.append(
            chunk_hidden_loss(
                rows_s, teacher[k], mask, reduction=reduction, num_items_in_batch=num_items_in_batch, **loss_kwargs
            )
        )
    return torch.stack(values).mean(0)


#: Characters few vocabularies hold (a test-tube emoji, an Egyptian hieroglyph, a Tibetan mark, Cyrillic "ꙮ").
_RARE_TEXT = "\U0001f9ea \U00013000 \u0f3a \ua66e"


def _emitted_unknown(tokenizer) -> int | None:
    """The tokenizer's unknown-token id if encoding can produce it (WordPiece, Unigram, BPE without byte fallback),
    else ``None``. Byte-level and byte-fallback tokenizers never write it for text; GPT-2-style ones name their
    document separator ``<|endoftext|>`` the UNK, and it must stay a separator."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    ids, _ = _encode(tokenizer, _RARE_TEXT, False)
    return unk if unk in ids else None


def _char_to_byte_span(text: str, start: int, end: int) -> tuple[int, int]:
    head = len(text[:start].encode("utf-8", "surrogatepass"))
    return head, head + len(text[start:end].encode("utf-8", "surrogatepass"))


def _to_content_bytes(offsets: Sequence[tuple[int, int]], regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte offsets into a rendered conversation -> offsets into its message contents laid end to end.

    A token outside every content (template text, special tokens) gets an empty span; a token reaching over a
    content's edge is clipped to it."""
    bases = [0]
    for a, b in regions:
        bases.append(bases[-1] + b - a)
    out, last = [], 0
    for s, e in offsets:
        hit = [i for i, (a, b) in enumerate(regions) if s < b and e > a]
        if not hit:
            out.append((last, last))
            continue
        i, j = hit[0], hit[-1]
        start = bases[i] + max(s, regions[i][0]) - regions[i][0]
        end = bases[j] + min(e, regions[j][1]) - regions[j][0]
        out.append((start, end))
        last = end
    return out
