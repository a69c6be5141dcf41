"""Small real tokenizers trained in-process with the `tokenizers` library (no downloads), for the crosstok tests.

* :func:`byte_bpe`: byte-level BPE, GPT-2 / SmolLM2 style (leading space spelled ``Ġ``, offsets include it).
* :func:`metaspace_bpe`: SentencePiece-style BPE (leading space spelled ``▁``, byte fallback ``<0xNN>`` for unseen
  characters, decoder strips the first leading space).
"""

from __future__ import annotations

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait, naïve résumé — déjà vu; 日本語のテキスト 👍 and 😀!",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood.",
    "Shares in the company rose 5% to £3.20 after the report, analysts said on Tuesday.",
]

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", **special
    )


def _add_bos(tok) -> None:
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )


def byte_bpe(vocab_size: int = 320, corpus=None, *, bos: bool = False, normalizer=None):
    """A byte-level BPE (``Ġ`` convention); ``bos=True`` makes it prepend ``<s>`` like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    if bos:
        _add_bos(tok)
    return _wrap(tok)


def metaspace_bpe(vocab_size: int = 600, corpus=None, *, bos: bool = False):
    """A SentencePiece-style BPE (``▁`` convention, byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fallback = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + fallback, show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    if bos:
        _add_bos(tok)
    return _wrap(tok)
