"""Tokenizer transfer: move a causal LM to a new tokenizer, then train it against the original with ALM.

This is the main use of cross-tokenizer distillation in Minixhofer, Vulić and Ponti, "Cross-Tokenizer Distillation
via Approximate Likelihood Matching": the teacher is the original model with its own tokenizer, the student the same
model with a new tokenizer. Two steps:

1. :func:`transfer_tokenizer` re-initialises the embeddings for the new vocabulary. Each new token is spelled out as
   the bytes it stands for, and those bytes are cut into the *old* tokenizer's pieces; the new row is the mean of
   the old rows of those pieces (input embeddings, and output embeddings when they are not tied). A new token that
   is exactly one old token gets exactly its old row. Special tokens are mapped by role (BOS, EOS, PAD, UNK, SEP,
   CLS, MASK) to the old special token of the same role. ``vocab_size`` and the special token ids of the config
   (and generation config) follow the new tokenizer, so the model saves and loads with plain ``save_pretrained`` /
   ``from_pretrained``.
2. Training (``kd_plugins.integrations.hf.tokenizer_transfer.train_transferred``, or ``kd-plugins
   transfer-tokenizer``): an unmodified ``transformers.Trainer`` with
   ``DistillationCallback(original, DistillationConfig(loss_terms="alm", hard_label_weight=1.0),
   teacher_tokenizer=old_tokenizer)`` on text rows tokenized by the new tokenizer (:func:`transfer_rows`).

How a token is spelled as bytes (the tokenizer's ``tokenizer.json`` says which convention it follows):

* byte-level BPE (GPT-2, SmolLM2, Llama 3; ``Ġ`` for a space): every character of the token stands for one byte;
* SentencePiece style (``▁`` for a space): UTF-8 of the token with ``▁`` read as a space; byte-fallback tokens
  ``<0xNN>`` are the byte ``NN`` (and take the old ``<0xNN>`` row where the old vocabulary has one);
* WordPiece: ``##x`` continues a word (``x``), other tokens start one (`` x``);
* added (non-special) tokens: their literal content.

The old pieces come from the old tokenizer's model on the bytes spelled in its own convention (its pre-tokenizer
and normaliser are not applied: a single token's bytes are one pre-token already); tokenizers with another
convention are asked to encode the text. Pieces that are unknown or special are dropped; a new token with no piece
left gets the mean of all old rows.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._config import resolve_config
from .config import TokenizerTransferConfig

__all__ = ["TokenizerTransferConfig", "TransferPlan", "transfer_tokenizer", "tokenizer_transfer_plan", "transfer_rows"]

logger = logging.getLogger(__name__)

ROLES = ("bos", "eos", "pad", "unk", "sep", "cls", "mask")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ------------------------------------------------------------------------------------------------ spelling
def _byte_level_maps() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte <-> printable character map (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars, {c: b for b, c in chars.items()}


_BYTE_TO_CHAR, _CHAR_TO_BYTE = _byte_level_maps()


def _types(node) -> set[str]:
    """Every ``"type"`` value in a ``tokenizer.json`` component (nested sequences included)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node))
    return set()


class _Spelling:
    """How one fast tokenizer writes bytes in its vocabulary: ``byte_level``, ``metaspace``, ``wordpiece`` or
    ``text``."""

    def __init__(self, tokenizer, role: str):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(
                f"{role} tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; load it with "
                "AutoTokenizer.from_pretrained(..., use_fast=True)."
            )
        spec = json.loads(backend.to_str())
        decoder, pre = spec.get("decoder"), spec.get("pre_tokenizer")
        types = _types(decoder) | _types(pre)
        if "ByteLevel" in types:
            self.kind = "byte_level"
        elif "Metaspace" in types or "▁" in json.dumps(decoder, ensure_ascii=False):
            self.kind = "metaspace"
        elif "WordPiece" in _types(decoder):
            self.kind = "wordpiece"
        else:
            self.kind = "text"
        self.tokenizer, self.backend = tokenizer, backend
        self.vocab = tokenizer.get_vocab()
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added = {i: t.content for i, t in added.items() if not getattr(t, "special", False)}
        self.special |= {i for i, t in added.items() if getattr(t, "special", False)}
        fallback = {i for i in self.special if _BYTE_FALLBACK.fullmatch(tokenizer.convert_ids_to_tokens(i) or "")}
        self.special -= fallback  # byte-fallback tokens registered as special still spell bytes

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a (non-special) token stands for; ``None`` for special tokens."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        m = _BYTE_FALLBACK.fullmatch(piece or "")
        if m:  # byte-fallback tokens are often registered as special added tokens: they still stand for a byte
            return bytes([int(m.group(1), 16)])
        if token_id in self.special:
            return None
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        if not piece:  # an id the vocabulary does not use
            return b""
        if self.kind == "byte_level" and all(c in _CHAR_TO_BYTE for c in piece):
            return bytes(_CHAR_TO_BYTE[c] for c in piece)
        if self.kind == "metaspace":
            return piece.replace("▁", " ").encode("utf-8")
        if self.kind == "wordpiece":
            return (piece[2:] if piece.startswith("##") else " " + piece).encode("utf-8")
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")

    def byte_fallback_id(self, piece: str | None) -> int | None:
        """The id of this vocabulary's byte-fallback token spelled ``piece`` (``<0xNN>``), if ``piece`` is one and
        this vocabulary has it."""
        return self.vocab.get(piece) if _BYTE_FALLBACK.fullmatch(piece or "") else None

    def spell(self, data: bytes) -> str | None:
        """``data`` as this tokenizer's vocabulary writes it (``None`` when it cannot, e.g. a partial UTF-8
        character for a text tokenizer)."""
        if self.kind == "byte_level":
            return "".join(_BYTE_TO_CHAR[b] for b in data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if self.kind == "metaspace":
            return text.replace(" ", "▁")
        if self.kind == "wordpiece":
            return text[1:] if text.startswith(" ") else "##" + text
        return text

    def pieces(self, data: bytes) -> tuple[int, ...]:
        """This tokenizer's (non-special, known) token ids for ``data``: one id when it is a token of the vocabulary,
        else its model's tokenization of the spelled bytes."""
        spelled = self.spell(data)
        if spelled is not None and self.vocab.get(spelled) is not None and self.vocab[spelled] not in self.special:
            return (self.vocab[spelled],)
        if spelled is None:  # not UTF-8: the byte-fallback tokens, where this vocabulary has them
            ids = [self.vocab.get(f"<0x{b:02X}>") for b in data]
        elif self.kind in ("byte_level", "metaspace"):
            ids = [t.id for t in self.backend.model.tokenize(spelled)]
        else:
            ids = self.tokenizer(data.decode("utf-8").strip(), add_special_tokens=False)["input_ids"]
        return tuple(i for i in ids if i is not None and i not in self.special)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class TransferPlan:
    """Per new token id: the old token ids whose rows are averaged, and how they were found.

    ``how``: ``"exact"`` (one old token with the same bytes), ``"mean"`` (several old pieces), ``"special"`` (an old
    special token of the same role or content), ``"fallback"`` (nothing found: the mean of all old rows)."""

    pieces: list[tuple[int, ...]]
    how: list[str]

    def counts(self) -> dict[str, int]:
        return {k: self.how.count(k) for k in ("exact", "mean", "special", "fallback")}


def _special_source(token_id: int, old: _Spelling, new_tok, old_tok) -> tuple[int, ...]:
    """The old token for a new special token: the same role (PAD falls back to EOS), else the same content."""
    for role in ROLES:
        if getattr(new_tok, f"{role}_token_id", None) == token_id:
            for old_role in (role, "eos") if role == "pad" else (role,):
                old_id = getattr(old_tok, f"{old_role}_token_id", None)
                if old_id is not None:
                    return (old_id,)
    content = new_tok.convert_ids_to_tokens(token_id)
    old_id = old.vocab.get(content)
    return (old_id,) if old_id is not None else ()


def tokenizer_transfer_plan(old_tokenizer, new_tokenizer) -> TransferPlan:
    """Which old token rows initialise each new token (see the module docstring)."""
    old, new = _Spelling(old_tokenizer, "old"), _Spelling(new_tokenizer, "new")
    pieces, how = [], []
    for token_id in range(len(new_tokenizer)):
        data = new.token_bytes(token_id)
        fallback_id = old.byte_fallback_id(new_tokenizer.convert_ids_to_tokens(token_id))
        if data is None:
            ids, kind = _special_source(token_id, old, new_tokenizer, old_tokenizer), "special"
        elif fallback_id is not None:  # <0xNN> onto the old <0xNN>: the row trained on that byte
            ids, kind = (fallback_id,), "exact"
        else:
            ids = old.pieces(data) if data else ()
            kind = "exact" if len(ids) == 1 and old.spell(data) in old.vocab else "mean"
        pieces.append(ids)
        how.append(kind if ids else "fallback")
    return TransferPlan(pieces, how)


def _init_rows(old_rows: torch.Tensor, pieces: list[tuple[int, ...]]) -> torch.Tensor:
    """``[V_new, D]``: per new token the mean of its old rows (float32 sums), the mean of all rows without any."""
    n_new = len(pieces)
    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long, device=old_rows.device)
    seg = torch.tensor([k for k, p in enumerate(pieces) for _ in p], dtype=torch.long, device=old_rows.device)
    src = old_rows.float()
    sums = torch.zeros(n_new, src.shape[1], device=src.device).index_add_(0, seg, src[flat])
    count = torch.bincount(seg, minlength=n_new).to(src.device)
    rows = sums / count.clamp(min=1)[:, None]
    rows[count == 0] = src.mean(0)
    return rows.to(old_rows.dtype)


# ------------------------------------------------------------------------------------------------ the verb
def transfer_tokenizer(model: nn.Module, old_tokenizer, new_tokenizer, config=None, **overrides) -> nn.Module:
    """A copy of ``model`` (``copy_model=False``: ``model`` itself) whose embeddings serve ``new_tokenizer``.

    Args:
        model: a Hugging Face causal LM (anything with ``get_input_embeddings`` / ``resize_token_embeddings``).
        old_tokenizer: the tokenizer ``model`` was trained with; new_tokenizer: the one it moves to (fast
            tokenizers).
        config: a :class:`TokenizerTransferConfig`; ``overrides`` replace its fields.

    Returns:
        The model with ``len(new_tokenizer)`` embedding rows initialised as the module docstring says (tied output
        embeddings stay tied; untied ones are initialised the same way, bias included), ``config.vocab_size`` and
        the special token ids of ``config`` / ``generation_config`` taken from ``new_tokenizer``, and
        ``config.kd_plugins_tokenizer_transfer`` recording how many rows were found which way.
    """
    cfg = resolve_config(TokenizerTransferConfig, config, overrides)
    plan = tokenizer_transfer_plan(old_tokenizer, new_tokenizer)
    inp = model.get_input_embeddings()
    largest = max((i for p in plan.pieces for i in p), default=-1)
    if largest >= inp.weight.shape[0]:
        raise ValueError(
            f"old_tokenizer has token id {largest} but the model has {inp.weight.shape[0]} embedding rows: "
            "old_tokenizer must be the tokenizer the model was trained with."
        )
    if cfg.copy_model:
        model = copy.deepcopy(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    old_in = inp.weight.detach().clone()
    old_out = out.weight.detach().clone() if out is not None and not tied else None
    old_bias = out.bias.detach().clone() if out is not None and getattr(out, "bias", None) is not None else None
    model.resize_token_embeddings(len(new_tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(_init_rows(old_in, plan.pieces))
        new_out = model.get_output_embeddings()
        if old_out is not None:
            new_out.weight.copy_(_init_rows(old_out, plan.pieces))
        if old_bias is not None:
            new_out.bias.copy_(_init_rows(old_bias[:, None], plan.pieces)[:, 0])
    _set_special_ids(model, new_tokenizer)
    model.config.kd_plugins_tokenizer_transfer = plan.counts()
    logger.info("kd_plugins: tokenizer transfer to %d tokens: %s", len(new_tokenizer), plan.counts())
    return model


def _set_special_ids(model: nn.Module, tokenizer) -> None:
    """The config's (and generation config's) special token ids follow the new tokenizer."""
    for holder in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if holder is None:
            continue
        for role in ROLES:
            key = f"{role}_token_id"
            if hasattr(holder, key):
                setattr(holder, key, getattr(tokenizer, key, None))


# ------------------------------------------------------------------------------------------------ training rows
def _pieces_of(text: str, tokenizer, budget: int) -> Iterator[str]:
    """``text`` cut at whitespace into pieces of at most ``budget`` tokens (a longer word is cut between tokens)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, k = 0, 0
    while k < len(offsets):
        if len(offsets) - k <= budget:
            yield text[start:]
            return
        end = offsets[k + budget][0]  # the first token that does not fit starts here
        if end <= start:  # several tokens of one character (byte tokens): keep the character whole
            later = [a for a, _ in offsets[k + budget :] if a > start]
            if not later:
                yield text[start:]
                return
            end = later[0]
        spaces = [m.start() for m in re.finditer(r"\s", text[start:end])]
        cut = start + spaces[-1] if spaces and spaces[-1] > 0 else end
        yield text[start:cut]
        start = cut
        while k < len(offsets) and offsets[k][0] < cut:
            k += 1


def transfer_rows(texts: Iterable[str], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Training rows ``{"input_ids": [...]}`` of at most ``max_length`` tokens (special tokens included).

    Each text is cut at whitespace and every piece is tokenized on its own, so a row's ids are what the tokenizer
    gives for the row's text: they round-trip through decoding, as the cross-tokenizer teacher requires. Rows of
    fewer than 2 tokens are dropped (nothing to predict)."""
    n_special = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    budget = max(1, max_length - n_special)
    rows = []
    for text in texts:
        if not text or not text.strip():
            continue
        for piece in _pieces_of(text.strip(), tokenizer, budget):
            ids = tokenizer(piece.strip(), truncation=True, max_length=max_length)["input_ids"]
            if len(ids) >= 2:
                rows.append({"input_ids": ids})
    return rows
