"""Preference distillation data and sequence log-probs (LLaVA-MoD stage 2, text LMs).

A preference example is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (text, or token-id lists). The
:class:`PreferenceCollator` tokenizes prompt and answers separately (so the answer's first token is exact), and pads
chosen and rejected sequences to one length::

    chosen_input_ids / chosen_attention_mask / chosen_completion_mask       [B, T]
    rejected_input_ids / rejected_attention_mask / rejected_completion_mask [B, T]

``completion_mask`` marks the answer tokens: the log-prob of a sequence is the sum of the log-probs of those tokens
given everything before them (:func:`sequence_logprobs`). The loss on the log-probs is
:func:`~kd_plugins.losses.preference.dpo_loss`, with the frozen teacher as reference model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..losses.preference import dpo_loss

__all__ = [
    "PreferenceCollator",
    "completion_logprobs",
    "sequence_logprobs",
    "concat_preference_batch",
    "dpo_loss",
    "PREFERENCE_KEYS",
]

#: Batch keys the preference loss reads (per side: chosen / rejected).
PREFERENCE_KEYS = ("input_ids", "attention_mask", "completion_mask")


def completion_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    average: bool = False,
) -> torch.Tensor:
    """``[B]`` sum (``average``: mean) over the completion tokens ``t`` of ``log p(input_ids[t] | input_ids[<t])``,
    read from causal-LM ``logits [B, T, V]`` (position ``t - 1`` predicts token ``t``). Computed in float32."""
    if logits.shape[:2] != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must agree on [batch, sequence]"
        )
    mask = completion_mask[:, 1:].bool()
    if attention_mask is not None:
        mask = mask & attention_mask[:, 1:].bool()
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].clamp(0, logits.shape[-1] - 1)
    token = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    summed = (token * mask).sum(-1)
    if not average:
        return summed
    return summed / mask.sum(-1).clamp(min=1)


def sequence_logprobs(
    model: nn.Module | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    average: bool = False,
) -> torch.Tensor:
    """``[B]`` log-probability of each sequence's completion under ``model`` (a causal LM, or a
    :class:`~kd_plugins.distill.teacher.Teacher`, which runs without gradients). See :func:`completion_logprobs`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out["logits"] if isinstance(out, Mapping) else out.logits
    return completion_logprobs(logits, input_ids, completion_mask, attention_mask, average=average)


def concat_preference_batch(batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """``({"input_ids", "attention_mask", "completion_mask"} of [2B, T], B)``: the chosen rows, then the rejected
    rows, padded to one length, for a single forward pass. Raises naming the missing keys and the fix."""
    missing = [
        f"{side}_{key}" for side in ("chosen", "rejected") for key in PREFERENCE_KEYS if side + "_" + key not in batch
    ]
    if missing:
        hint = (
            "preference data needs a 'rejected' answer for every prompt"
            if any(k.startswith("rejected") for k in missing) and not any(k.startswith("chosen") for k in missing)
            else "the batch is not a preference batch"
        )
        raise ValueError(
            f"{hint}: missing {missing} (got keys {sorted(batch)}). Build batches with "
            "kd_plugins.moe.PreferenceCollator(tokenizer) from examples with 'prompt', 'chosen' and 'rejected', and "
            "set TrainingArguments(remove_unused_columns=False)."
        )
    sides = [[batch[f"{side}_{key}"] for key in PREFERENCE_KEYS] for side in ("chosen", "rejected")]
    length = max(sides[0][0].shape[1], sides[1][0].shape[1])
    out = {}
    for j, key in enumerate(PREFERENCE_KEYS):
        parts = [torch.nn.functional.pad(side[j], (0, length - side[j].shape[1])) for side in sides]
        out[key] = torch.cat(parts)
    return out, sides[0][0].shape[0]


class PreferenceCollator:
    """Collate ``{"prompt", "chosen", "rejected"}`` examples (strings, or lists of token ids) into the right-padded
    preference batch described in the module docstring.

    Args:
        tokenizer: the student's tokenizer (the teacher must share it: the reference log-probs are read at the same
            token ids). Needed for text examples; ``pad_token_id`` / ``eos_token_id`` are read from it.
        max_length: longest prompt + answer; longer answers are cut at the end, then prompts at the start (at least
            one answer token is kept). ``None``: no limit.
        add_eos: append the EOS token to each answer (as TRL's DPO does), when the tokenizer has one.
        pad_token_id: padding id when there is no tokenizer (default 0).
    """

    def __init__(self, tokenizer=None, max_length: int | None = None, *, add_eos: bool = True, pad_token_id: int = 0):
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and an answer token), got {max_length}")
        self.tokenizer, self.max_length, self.add_eos = tokenizer, max_length, add_eos
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = pad if pad is not None else (eos if eos is not None else pad_token_id)
        self.eos_token_id = eos

    def _ids(self, value, *, prompt: bool) -> list[int]:
        if isinstance(value, str):
            if self.tokenizer is None:
                raise ValueError("text preference examples need PreferenceCollator(tokenizer)")
            return list(self.tokenizer(value, add_special_tokens=prompt)["input_ids"])
        if isinstance(value, torch.Tensor):
            return [int(v) for v in value.reshape(-1).tolist()]
        if isinstance(value, Sequence):
            return [int(v) for v in value]
        raise TypeError(f"a prompt / answer must be text or a list of token ids, got {type(value).__name__}")

    def _pair(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        if self.add_eos and self.eos_token_id is not None and (not answer or answer[-1] != self.eos_token_id):
            answer = answer + [self.eos_token_id]
        if not answer:
            raise ValueError("an answer (chosen or rejected) is empty: there is nothing to score")
        limit = self.max_length
        if limit is not None and len(prompt) + len(answer) > limit:
            answer = answer[: max(limit - len(prompt), 1)]
            prompt = prompt[len(prompt) + len(answer) - limit :] if len(prompt) + len(answer) > limit else prompt
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[tuple[list[int], list[int]]]] = {"chosen": [], "rejected": []}
        for i, ex in enumerate(examples):
            absent = [k for k in ("prompt", "chosen", "rejected") if k not in ex]
            if absent:
                raise ValueError(
                    f"preference example {i} has no {absent} field (keys: {sorted(ex)}); every example needs "
                    "'prompt', 'chosen' and 'rejected' (the rejected answer is what DPO contrasts the chosen one with)"
                )
            prompt = self._ids(ex["prompt"], prompt=True)
            for side in rows:
                rows[side].append(self._pair(prompt, self._ids(ex[side], prompt=False)))
        length = max(len(ids) for side in rows.values() for ids, _ in side)
        batch = {}
        for side, pairs in rows.items():
            ids = torch.full((len(pairs), length), self.pad_token_id, dtype=torch.long)
            am = torch.zeros((len(pairs), length), dtype=torch.long)
            cm = torch.zeros((len(pairs), length), dtype=torch.long)
            for r, (seq, comp) in enumerate(pairs):
                ids[r, : len(seq)] = torch.tensor(seq)
                am[r, : len(seq)] = 1
                cm[r, : len(seq)] = torch.tensor(comp)
            batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": am, f"{side}_completion_mask": cm})
        return batch
