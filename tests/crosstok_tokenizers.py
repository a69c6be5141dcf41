"""Small real tokenizers trained in-process with the `tokenizers` library (no downloads), for the crosstok tests.

* :func:`byte_bpe`: byte-level BPE, GPT-2 / SmolLM2 style (leading space spelled ``Ġ``, offsets include it).
* :func:`metaspace_bpe`: SentencePiece-style BPE (leading space spelled ``▁``, byte fallback ``<0xNN>`` for unseen
  characters, decoder strips the first leading space).
* :func:`legacy_llama_bpe`: Llama-2 / Mistral style: no pre-tokenizer, the normaliser prepends ``▁`` and turns spaces
  into ``▁`` (so its offsets come through the normaliser's alignments), byte fallback, BOS.
* :func:`unigram_eos`: T5 style: a Unigram model, ``▁`` always prepended, no byte fallback (``<unk>`` for unseen
  characters) and an EOS *appended* to every text.
* :func:`wordpiece_cased`: BERT style (cased): ``[CLS] ... [SEP]``, ``##`` continuations, offsets without whitespace.
* :func:`digit_split_byte_bpe`: Qwen / Llama-3 style byte-level BPE that splits every digit off, with an NFC normaliser
  and no BOS.
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


def legacy_llama_bpe(vocab_size: int = 600, corpus=None):
    """Llama-2 / Mistral style SentencePiece BPE expressed as a normaliser (``Prepend("▁")`` + ``Replace``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fallback = [f"<0x{i:02X}>" for i in range(256)]
    # SentencePiece trains on whitespace-split words; the split here keeps merges inside words the same way.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + fallback, show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    tok.pre_tokenizer = None  # encode like Llama-2's tokenizer.json: no pre-tokenizer
    _add_bos(tok)
    return _wrap(tok)


def unigram_eos(vocab_size: int = 300, corpus=None):
    """T5 style: Unigram, ``▁`` always prepended, ``<unk>`` for unseen characters, EOS appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    import string

    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _wrap(tok)


def wordpiece_cased(vocab_size: int = 400, corpus=None):
    """BERT style, cased: ``[CLS] $A [SEP]``, ``##`` continuations, whitespace in no token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def digit_split_byte_bpe(vocab_size: int = 360, corpus=None):
    """Qwen / Llama-3 style: NFC, every digit its own pre-token, byte-level BPE, EOS only (no BOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
