"""Pair batches: an anchor text and its positive per row, each group padded on its own.

Retrieval-style training data (query -> document, title -> body) pairs a short text with a long one. Padding both
into one ``[2B, T]`` batch wastes most of the short side (an 8-token title padded to a 256-token body). A pair
batch keeps two groups instead::

    {"input_ids": [B, Ta], "attention_mask": [B, Ta],                       # anchors
     "positive_input_ids": [B, Tp], "positive_attention_mask": [B, Tp]}      # their positives

The distillation engine pools both groups (the teacher runs on, or the teacher cache looks up, each group), applies
the ``embedding`` terms to all ``2B`` texts and the ``pair`` terms (e.g. ``infonce``) to the ``B`` pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

#: Key prefix of the positive group in a pair batch (the same prefix ``MultiExitCallback`` reads).
POSITIVE_PREFIX = "positive_"


def split_pairs(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(anchors, positives)`` of a batch: keys without the ``positive_`` prefix, and those with it (prefix
    removed); ``positives`` is ``None`` for an ordinary batch."""
    anchors = {k: v for k, v in inputs.items() if not k.startswith(POSITIVE_PREFIX)}
    positives = {k[len(POSITIVE_PREFIX) :]: v for k, v in inputs.items() if k.startswith(POSITIVE_PREFIX)}
    if not positives:
        return anchors, None
    if "input_ids" not in positives:
        raise ValueError(
            f"the batch has {sorted(POSITIVE_PREFIX + k for k in positives)} but no 'positive_input_ids'; a pair "
            "batch needs the positives' token ids (kd_plugins.PairCollator builds one)"
        )
    a, p = anchors.get("input_ids"), positives["input_ids"]
    batched = torch.is_tensor(a) and torch.is_tensor(p) and a.dim() == 2 and p.dim() == 2  # not one example
    if batched and len(a) != len(p):
        raise ValueError(f"a pair batch needs one positive per anchor: {len(a)} anchors, {len(p)} positives")
    return anchors, positives


class PairCollator:
    """Collates ``{"input_ids", "attention_mask", "positive_input_ids", "positive_attention_mask"}`` examples
    (unpadded token lists, e.g. from ``tokenizer(...)``) into a pair batch, padding each group separately with
    ``tokenizer.pad`` (so a short anchor is not padded to its long positive).

    Args:
        tokenizer: a Hugging Face tokenizer (its ``pad`` method and padding side are used).
        pad_to_multiple_of: passed to ``tokenizer.pad``.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PairCollator got an empty list of examples")
        missing = [k for k in ("input_ids", POSITIVE_PREFIX + "input_ids") if k not in examples[0]]
        if missing:
            raise ValueError(
                f"PairCollator examples need 'input_ids' and 'positive_input_ids' (tokenized anchor and positive); "
                f"missing {missing} in an example with keys {sorted(examples[0])}"
            )
        groups = [split_pairs(e) for e in examples]
        batch = self._pad([a for a, _ in groups])
        positives = self._pad([p for _, p in groups])
        batch.update({POSITIVE_PREFIX + k: v for k, v in positives.items()})
        return batch

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keep = ("input_ids", "attention_mask", "token_type_ids")
        feats = [{k: v for k, v in f.items() if k in keep} for f in features]
        return dict(
            self.tokenizer.pad(feats, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        )
