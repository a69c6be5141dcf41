"""A cheaper draft for serving: its LM head restricted to the frequent tokens (FR-Spec).

A small draft cut from its target keeps the target's full LM head, and at batch 1 that head is a large share of the
draft's cost per token (SmolLM2-135M: 49,152 x 576 weights, as many as 8 of its 30 transformer blocks). FR-Spec
(Zhao et al., "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling",
2025) keeps only the rows of the most frequent tokens in the draft's head: the draft can then propose only those
tokens, which costs acceptance only where the target's next token is a rare one, and the target still verifies every
token, so greedy assisted generation stays exactly the target's output.

* :func:`frequent_token_ids`: the ``num_tokens`` most frequent token ids of some tokenized text (count it on training
  text, not on the text you evaluate on), plus ids that must stay (EOS, special tokens).
* :func:`restrict_draft_vocab`: replaces a draft's LM head, in place, by a :class:`SubsetLMHead` over those ids. The
  head still returns logits over the whole vocabulary (the dtype's lowest value outside the subset), so
  ``generate(assistant_model=draft)``, :func:`~kd_plugins.speculative.measure_speculative` and
  :func:`~kd_plugins.speculative.expected_acceptance` work unchanged.

A restricted draft is a serving form: restrict it after training and after saving. Its ``save_pretrained`` raises,
because ``from_pretrained`` would not find the LM head it wrote and would load another model without the cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

__all__ = ["SubsetLMHead", "frequent_token_ids", "restrict_draft_vocab"]


def _id_rows(data) -> Iterable[torch.Tensor]:
    """Token id tensors of ``data``: a tensor, rows of ids, or dataset rows / batches with ``input_ids`` (only the
    attended positions when they carry an ``attention_mask``)."""
    if isinstance(data, torch.Tensor):
        yield data.reshape(-1)
        return
    for row in [data] if isinstance(data, Mapping) else data:  # one batch, or rows / batches
        if isinstance(row, Mapping):
            ids = torch.as_tensor(row["input_ids"])
            mask = row.get("attention_mask")
            yield ids[torch.as_tensor(mask).bool()] if mask is not None else ids.reshape(-1)
        else:
            yield torch.as_tensor(row).reshape(-1)


def frequent_token_ids(data, num_tokens: int, *, vocab_size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``num_tokens`` most frequent token ids of ``data`` (ties: the lower id first) together with ``always``,
    as a sorted ``int64`` tensor (so at most ``num_tokens + len(always)`` ids).

    ``data``: a tensor of ids, an iterable of id sequences, one batch or an iterable of dataset rows / batches with
    ``input_ids`` (padding left out through their ``attention_mask``). ``always``: ids kept whatever their count,
    e.g. the EOS and the other special tokens (a draft that cannot propose EOS never ends a round with it). Ids never
    seen are taken in id order when the text has fewer than ``num_tokens`` distinct tokens.
    """
    if not isinstance(num_tokens, int) or not 0 < num_tokens <= vocab_size:
        raise ValueError(f"num_tokens must be an integer in [1, vocab_size={vocab_size}], got {num_tokens!r}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in _id_rows(data):
        ids = ids.to(torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}), found {int(ids.min())}..{int(ids.max())}: pass the "
                "vocab_size of the draft's tokenizer, and ids without -100 label padding."
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError("frequent_token_ids found no token ids in data: pass tokenized training text")
    # Stable sort of -counts: equal counts keep id order.
    order = torch.sort(-counts, stable=True).indices[:num_tokens]
    keep = set(order.tolist()) | {int(i) for i in always}
    bad = [i for i in keep if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"always holds ids outside [0, {vocab_size}): {sorted(bad)[:5]}")
    return torch.tensor(sorted(keep), dtype=torch.int64)


class SubsetLMHead(nn.Module):
    """An LM head over a subset of the vocabulary that still returns full-vocabulary logits.

    ``proj`` holds the head's rows of ``keep_ids`` (a copy: the draft's input embeddings are left as they were);
    the logits of every other token are the dtype's lowest finite value, so softmax gives them probability 0 and
    argmax never picks them.
    """

    def __init__(self, head: nn.Linear, keep_ids: torch.Tensor):
        super().__init__()
        keep_ids = torch.as_tensor(keep_ids, dtype=torch.int64).reshape(-1)
        vocab = head.weight.shape[0]
        if keep_ids.numel() == 0 or int(keep_ids.min()) < 0 or int(keep_ids.max()) >= vocab:
            raise ValueError(f"keep_ids must be non-empty ids in [0, {vocab}), the head's rows")
        if keep_ids.unique().numel() != keep_ids.numel():
            raise ValueError("keep_ids holds repeated ids")
        weight = head.weight.detach()
        self.vocab_size = vocab
        self.proj = nn.Linear(weight.shape[1], keep_ids.numel(), bias=head.bias is not None)
        self.proj.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight[keep_ids.to(weight.device)])
            if head.bias is not None:
                self.proj.bias.copy_(head.bias.detach()[keep_ids.to(weight.device)])
        self.register_buffer("keep_ids", keep_ids.to(weight.device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = self.proj(hidden)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), torch.finfo(sub.dtype).min)
        return out.index_copy_(-1, self.keep_ids, sub)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, kept={self.keep_ids.numel()}"


def _refuse_save(*args, **kwargs):
    raise RuntimeError(
        "This draft's LM head was restricted by restrict_draft_vocab (a serving form): from_pretrained would not find "
        "the head it saved. Save the draft before restricting it, and restrict it again after loading."
    )


def restrict_draft_vocab(draft: nn.Module, keep_ids: torch.Tensor) -> nn.Module:
    """Replace ``draft``'s LM head (``get_output_embeddings()``, an ``nn.Linear``) by a :class:`SubsetLMHead` over
    ``keep_ids`` (e.g. :func:`frequent_token_ids` of training text), in place; returns ``draft``.

    The head's kept rows are copied, so a head tied to the input embeddings is untied (``config.tie_word_embeddings``
    is set to ``False`` so that nothing ties it back). ``save_pretrained`` of the restricted draft raises (see the
    module docstring); restrict a ``copy.deepcopy`` to keep the full draft.
    """
    head = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    if isinstance(head, SubsetLMHead):
        raise ValueError("the draft's LM head is already restricted; restrict the unrestricted draft")
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"restrict_draft_vocab needs a causal LM whose get_output_embeddings() is an nn.Linear, got "
            f"{type(head).__name__}"
        )
    draft.set_output_embeddings(SubsetLMHead(head, keep_ids))
    config = getattr(draft, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
    draft.save_pretrained = _refuse_save
    return draft
