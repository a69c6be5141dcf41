"""The one check every speculative measurement starts with: target and draft share one vocabulary."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["check_same_vocabulary"]

_FIX = (
    "Speculative decoding as measured by kd_plugins needs one shared vocabulary: a draft with the target's tokenizer "
    "and embedding / lm_head sizes (e.g. kd_plugins.inherit_student(target, num_layers=k), or a smaller model of the "
    "same family). Different-tokenizer assisted generation is not measured here."
)


def _vocab_sizes(model: nn.Module) -> dict[str, int]:
    """Vocabulary sizes a model declares: its input and output embedding rows and ``config.vocab_size``."""
    sizes = {}
    for name, getter in (("input embedding rows", "get_input_embeddings"), ("lm_head rows", "get_output_embeddings")):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            sizes[name] = int(weight.shape[0])
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if isinstance(vocab, int):
        sizes["config.vocab_size"] = vocab
    return sizes


def check_same_vocabulary(target: nn.Module, draft: nn.Module, tokenizer=None, draft_tokenizer=None) -> int | None:
    """Raise a ``ValueError`` unless ``target`` and ``draft`` share one vocabulary; return its size (``None`` when
    the models declare none).

    Compares the embedding and lm_head row counts and ``config.vocab_size`` of both models, checks that
    ``tokenizer`` (if given) has no token id beyond them, and that ``draft_tokenizer`` (if given) maps every token to
    the same id as ``tokenizer``.
    """
    t_sizes, d_sizes = _vocab_sizes(target), _vocab_sizes(draft)
    for name in t_sizes.keys() & d_sizes.keys():
        if t_sizes[name] != d_sizes[name]:
            raise ValueError(
                f"The draft's vocabulary differs from the target's: {name} {d_sizes[name]} (draft) vs "
                f"{t_sizes[name]} (target). {_FIX}"
            )
    sizes = list(t_sizes.values()) + list(d_sizes.values())
    vocab = min(sizes) if sizes else None
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the models' vocabulary has {vocab} rows: its ids would "
            f"index past the embeddings. Pass the tokenizer the target was trained with. {_FIX}"
        )
    if draft_tokenizer is not None:
        if tokenizer is None:
            raise ValueError("draft_tokenizer was given without tokenizer: pass the target's tokenizer too.")
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"The draft's tokenizer maps tokens to other ids than the target's tokenizer. {_FIX}")
    return vocab
