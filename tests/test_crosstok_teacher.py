"""kd_plugins.crosstok.teacher: CrossTokenizerTeacher + cross_tokenizer_loss on tiny Llamas with two trained BPEs,
checked against a hand-rolled reference (independent byte-level alignment, per-row teacher forwards, Python loops)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from crosstok_tokenizers import byte_bpe, metaspace_bpe
from tiny import tiny_llama

from kd_plugins.crosstok import CrossTokenizerTeacher, RoundTripError, cross_tokenizer_loss
from kd_plugins.distill.teacher import Teacher

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A single man  in possession\nof a good fortune, naïve café 👍.",
    "Shares rose 5% to £3.20, analysts said.",
]


@pytest.fixture(scope="module")
def toks():
    return byte_bpe(320), metaspace_bpe(520, bos=True)  # student: GPT-2 style, no BOS; teacher: SentencePiece + BOS


def _batch(tok, texts=TEXTS, padding_side="right", prompt=3):
    tok.padding_side = padding_side
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    if prompt:  # row 0: its first tokens are a prompt without labels
        first = int(enc["attention_mask"][0].argmax())
        labels[0, first : first + prompt] = -100
    return {**enc, "labels": labels}


# ------------------------------------------------------------------------------------------------ reference
def _token_bytes(tok, ids, metaspace: bool):
    """Exact UTF-8 bytes of each token (byte-level ``Ġ`` BPE, or ``▁`` BPE with byte fallback); specials -> None."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's byte -> printable character map
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    out = []
    for piece, i in zip(tok.convert_ids_to_tokens(ids), ids):
        if i in tok.all_special_ids:
            out.append(None)
        elif piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:-1], 16)]))
        elif metaspace:
            out.append(piece.replace("▁", " ").encode())
        else:
            out.append(bytes(byte_of[ch] for ch in piece))
    return out


def _reference_chunks(text, s_bytes, t_bytes):
    """Chunk index per token from exact byte ends: a chunk closes at a byte position where both sides end a token
    and a character starts (whitespace attaches to the next token on both byte-level sides by construction)."""
    raw = text.encode()
    char_starts = {i for i in range(len(raw) + 1) if i == len(raw) or (raw[i] & 0xC0) != 0x80}

    def ends(pieces, lead):
        pos, out = -lead, []
        for p in pieces:
            if p is None:
                out.append(None)
                continue
            pos += len(p)
            out.append(pos)
        return out

    t_lead = 1 if b"".join(p for p in t_bytes if p) == b" " + raw else 0  # SentencePiece's dummy prefix space
    s_end, t_end = ends(s_bytes, 0), ends(t_bytes, t_lead)
    common = sorted(({e for e in s_end if e} & {e for e in t_end if e}) & char_starts)

    def assign(token_ends):
        return [
            -1 if e is None or e > common[-1] else next(k for k, c in enumerate(common) if e <= c) for e in token_ends
        ]

    return assign(s_end), assign(t_end), len(common)


def _reference_loss(student, teacher_model, s_tok, t_tok, batch, kind, **kw):
    """Per row: decode, tokenize for the teacher, run the teacher alone (no padding), sum chunks in Python."""
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    s_lp = torch.log_softmax(s_logits, -1)
    terms = []
    for b in range(batch["input_ids"].shape[0]):
        am = batch["attention_mask"][b].tolist()
        pos = [p for p in range(len(am)) if am[p]]
        s_ids = [int(batch["input_ids"][b, p]) for p in pos]
        text = s_tok.decode(s_ids)
        t_ids = t_tok(text)["input_ids"]
        with torch.no_grad():
            t_logits = teacher_model(input_ids=torch.tensor([t_ids])).logits[0].double()
        t_lp = torch.log_softmax(t_logits, -1)
        s_chunk, t_chunk, n = _reference_chunks(
            text, _token_bytes(s_tok, s_ids, False), _token_bytes(t_tok, t_ids, True)
        )
        for k in range(n):
            s_members = [pos[i] for i, c in enumerate(s_chunk) if c == k]
            t_members = [j for j, c in enumerate(t_chunk) if c == k]
            ok = all(p >= 1 and am[p - 1] and int(batch["labels"][b, p]) != -100 for p in s_members)
            if not (ok and all(j >= 1 for j in t_members)):
                continue
            if kind == "uld":
                if len(s_members) != 1 or len(t_members) != 1:
                    continue
                ps = torch.softmax(s_logits[b, s_members[0] - 1], -1).sort(descending=True).values
                pt = torch.softmax(t_logits[t_members[0] - 1], -1).sort(descending=True).values
                width = max(len(ps), len(pt))
                ps = torch.nn.functional.pad(ps, (0, width - len(ps)))
                pt = torch.nn.functional.pad(pt, (0, width - len(pt)))
                terms.append((ps - pt).abs().sum())
                continue
            log_s = sum(s_lp[b, p - 1, int(batch["input_ids"][b, p])] for p in s_members)
            log_t = float(sum(t_lp[j - 1, t_ids[j]] for j in t_members))
            if kw.get("form") == "abs":
                terms.append((log_s - log_t).abs())
            else:
                a, c = log_t / 100 - 1e-6, log_s / 100 - 1e-6
                terms.append(-(math.exp(a) * c + (1 - math.exp(a)) * torch.log(-torch.expm1(c))))
    return torch.stack(terms).mean(), len(terms)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind,kw", [("alm", {}), ("alm", {"form": "abs"}), ("uld", {})])
def test_matches_hand_rolled_reference(toks, kind, kw):
    s_tok, t_tok = toks
    student, teacher = tiny_llama(vocab=len(s_tok), seed=1), tiny_llama(vocab=len(t_tok), seed=2)
    batch = _batch(s_tok)
    source = CrossTokenizerTeacher(teacher, s_tok, t_tok)
    out = source(batch, need_logits=kind == "uld")
    assert out["texts"] == TEXTS and out["skipped_rows"] == []
    assert (out["teacher_input_ids"][:, 0] == t_tok.bos_token_id).all()  # the teacher's own BOS
    loss = cross_tokenizer_loss(
        student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch, out, kind, **kw
    )
    ref, count = _reference_loss(student, teacher, s_tok, t_tok, batch, kind, **kw)
    assert count > 10 and count == int((out["uld_mask"] if kind == "uld" else out["chunk_mask"]).sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_same_tokenizer_same_model_gives_zero(toks):
    s_tok, _ = toks
    student = tiny_llama(vocab=len(s_tok), seed=3)
    batch = _batch(s_tok, prompt=0)
    out = CrossTokenizerTeacher(copy.deepcopy(student), s_tok, s_tok)(batch, need_logits=True)
    assert torch.equal(
        out["teacher_input_ids"][out["teacher_attention_mask"].bool()],
        batch["input_ids"][batch["attention_mask"].bool()],
    )
    assert all(a.student_chunk_ids[: len(a.teacher_chunk_ids)] == a.teacher_chunk_ids for a in out["alignments"])
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert cross_tokenizer_loss(logits, batch, out, "alm", form="abs").item() == pytest.approx(0.0, abs=1e-5)
    assert cross_tokenizer_loss(logits, batch, out, "alm", form="binary_kl").item() == pytest.approx(0.0, abs=1e-6)
    assert cross_tokenizer_loss(logits, batch, out, "uld").item() == pytest.approx(0.0, abs=1e-5)
    assert cross_tokenizer_loss(logits, batch, out, "alm").item() > 0  # binary CE: the teacher's binary entropy


def test_bos_asymmetry_left_padding_and_truncation(toks):
    s_tok, t_tok = toks
    # Student with a BOS, teacher without: the teacher's first chunk has no context and is masked.
    teacher = tiny_llama(vocab=len(s_tok), seed=4)
    right = _batch(t_tok, prompt=0)
    source = CrossTokenizerTeacher(teacher, t_tok, s_tok)
    out_r = source(right)
    assert (right["input_ids"][:, 0] == t_tok.bos_token_id).all() and not out_r["chunk_mask"][:, 0].any()
    assert out_r["chunk_mask"][:, 1:4].all()
    # Left padding gives the same teacher side and the same chunk mask.
    left = _batch(t_tok, padding_side="left", prompt=0)
    out_l = source(left)
    assert torch.allclose(out_l["teacher_chunk_logprobs"], out_r["teacher_chunk_logprobs"], atol=1e-6)
    assert torch.equal(out_l["chunk_mask"], out_r["chunk_mask"])
    # Truncating the teacher masks the chunks it no longer reaches.
    out_t = CrossTokenizerTeacher(teacher, t_tok, s_tok, max_teacher_length=8)(right)
    assert out_t["teacher_input_ids"].shape[1] == 8
    assert out_t["chunk_mask"].sum() < out_r["chunk_mask"].sum()
    kept = out_t["chunk_mask"]
    assert torch.allclose(out_t["teacher_chunk_logprobs"][kept], out_r["teacher_chunk_logprobs"][kept], atol=1e-5)


def test_packed_documents_map_eos_and_refuse_other_specials(toks):
    s_tok, t_tok = toks
    teacher = tiny_llama(vocab=len(t_tok), seed=5)
    a, b = s_tok("The lazy dog.")["input_ids"], s_tok(" A fox.")["input_ids"]
    ids = torch.tensor([a + [s_tok.eos_token_id] + b])
    out = CrossTokenizerTeacher(teacher, s_tok, t_tok)({"input_ids": ids})
    t_row = out["teacher_input_ids"][0].tolist()
    assert t_row[0] == t_tok.bos_token_id and t_row.count(t_tok.eos_token_id) == 1
    assert out["texts"] == ["The lazy dog. A fox."]
    assert out["chunk_ids_student"][0, len(a)] == -1  # the EOS is in no chunk
    pad = torch.tensor([a + [s_tok.pad_token_id] + b])  # a special token with no role the teacher maps
    with pytest.raises(ValueError, match="no teacher equivalent"):
        CrossTokenizerTeacher(teacher, s_tok, t_tok)({"input_ids": pad})


def test_unknown_student_token_is_a_round_trip_error_that_skip_row_skips(toks):
    """A student UNK (WordPiece, Unigram or BPE without byte fallback on an unseen character) hides the text: the
    row cannot be scored, and ``skip_row`` must be able to skip it like any other row that does not round-trip. A
    byte-level tokenizer never writes its UNK for text (GPT-2-style ones name their document separator so): there it
    stays an ordinary special token."""
    from crosstok_tokenizers import unigram_eos

    _, t_tok = toks
    s_tok = unigram_eos()
    teacher = tiny_llama(vocab=len(t_tok), seed=5)
    a, b = s_tok("The lazy dog.")["input_ids"], s_tok(" A fox.")["input_ids"]
    ids = torch.tensor([a + [s_tok.unk_token_id] + b, a + b + [s_tok.pad_token_id]])
    batch = {"input_ids": ids, "attention_mask": (ids != s_tok.pad_token_id).long()}
    with pytest.raises(
        RoundTripError, match=f"row 0, position {len(a)}: the student ids hold the unknown token '<unk>'"
    ):
        CrossTokenizerTeacher(teacher, s_tok, t_tok)(batch)
    out = CrossTokenizerTeacher(teacher, s_tok, t_tok, on_round_trip_error="skip_row")(batch)
    assert out["skipped_rows"] == [0] and not out["chunk_mask"][0].any() and out["chunk_mask"][1].any()
    byte_level = toks[0]  # its UNK is never written for text: a leading one is a leading special, not lost text
    lead = torch.tensor([[byte_level.unk_token_id] + byte_level("The lazy dog.")["input_ids"]])
    out = CrossTokenizerTeacher(teacher, byte_level, t_tok)({"input_ids": lead})
    assert out["texts"] == ["The lazy dog."] and out["chunk_mask"].any()


def test_round_trip_errors_and_skip_row(toks):
    s_tok, t_tok = toks
    teacher = tiny_llama(vocab=len(t_tok), seed=6)
    split = [s_tok.convert_tokens_to_ids(ch) for ch in "The"]  # "The" spelled letter by letter: not what encode gives
    assert s_tok("The")["input_ids"] != split
    good = s_tok("The lazy dog.")["input_ids"]
    n = max(len(good), len(split))
    ids = torch.tensor([split + [0] * (n - len(split)), good + [0] * (n - len(good))])
    mask = (torch.arange(n)[None] < torch.tensor([[len(split)], [len(good)]])).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(RoundTripError, match="row 0.*do not round-trip"):
        CrossTokenizerTeacher(teacher, s_tok, t_tok)(batch)
    out = CrossTokenizerTeacher(teacher, s_tok, t_tok, on_round_trip_error="skip_row")(batch)
    assert out["skipped_rows"] == [0] and not out["chunk_mask"][0].any() and out["chunk_mask"][1].any()
    student = tiny_llama(vocab=len(s_tok), seed=7)
    loss = cross_tokenizer_loss(student(input_ids=ids, attention_mask=mask).logits, batch, out)
    assert torch.isfinite(loss)
    from tokenizers import normalizers

    lower = byte_bpe(320, normalizer=normalizers.Lowercase())
    with pytest.raises(RoundTripError, match="teacher tokenizer does not spell the text back"):
        CrossTokenizerTeacher(tiny_llama(vocab=len(lower)), s_tok, lower)({"input_ids": torch.tensor([good])})


def test_bad_inputs_raise_clearly(toks):
    s_tok, t_tok = toks
    teacher = tiny_llama(vocab=len(t_tok), seed=8)

    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="student tokenizer.*fast tokenizer"):
        CrossTokenizerTeacher(teacher, Slow(), t_tok)
    with pytest.raises(ValueError, match="uld_positions"):
        CrossTokenizerTeacher(teacher, s_tok, t_tok, uld_positions="all")
    source = CrossTokenizerTeacher(Teacher(teacher), s_tok, t_tok)
    batch = _batch(s_tok, prompt=0)
    shifted = {**batch, "labels": torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1), value=-100)}
    with pytest.raises(ValueError, match="unshifted"):
        source(shifted)
    out = source(batch)
    logits = tiny_llama(vocab=len(s_tok))(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="need_logits=True"):
        cross_tokenizer_loss(logits, batch, out, "uld")
    with pytest.raises(ValueError, match="'logits' loss"):
        cross_tokenizer_loss(logits, batch, out, "kl")


def test_chunk_start_positions_cover_every_complete_chunk(toks):
    s_tok, t_tok = toks
    teacher = tiny_llama(vocab=len(t_tok), seed=9)
    batch = _batch(s_tok, prompt=0)
    one = CrossTokenizerTeacher(teacher, s_tok, t_tok)(batch, need_logits=True)
    start = CrossTokenizerTeacher(teacher, s_tok, t_tok, uld_positions="chunk_start")(batch, need_logits=True)
    assert torch.equal(start["uld_mask"], start["chunk_mask"])
    assert (one["uld_mask"] <= start["uld_mask"]).all() and one["uld_mask"].sum() < start["uld_mask"].sum()
    assert start["teacher_logits_aligned"].shape == (*start["chunk_mask"].shape, len(t_tok))


# ------------------------------------------------------------------------------------------------ tokenizer families
FAMILY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A single man  in possession\nof a good fortune, naïve café 👍.",
    "Shares rose 5% to £3.20 on 12 May 2024, analysts said.",
    "Tabs\tand   spaces;  “quoted” — déjà vu 日本語 ✓",
]


@pytest.fixture(scope="module")
def families():
    from crosstok_tokenizers import digit_split_byte_bpe, legacy_llama_bpe, unigram_eos, wordpiece_cased

    return {
        "byte_bpe": byte_bpe(320),
        "metaspace_bpe": metaspace_bpe(520, bos=True),
        "legacy_llama_bpe": legacy_llama_bpe(),
        "unigram_eos": unigram_eos(),
        "wordpiece_cased": wordpiece_cased(),
        "digit_split_byte_bpe": digit_split_byte_bpe(),
    }


def _unknown(tok, text) -> bool:
    return tok.unk_token_id is not None and tok.unk_token_id in tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("teacher_family", ["byte_bpe", "legacy_llama_bpe", "unigram_eos", "wordpiece_cased"])
@pytest.mark.parametrize(
    "student_family", ["metaspace_bpe", "legacy_llama_bpe", "unigram_eos", "wordpiece_cased", "digit_split_byte_bpe"]
)
def test_tokenizer_families_align_and_score(families, student_family, teacher_family):
    """Pairs across six tokenizer conventions (offsets through a normaliser, EOS appended, ``[CLS] .. [SEP]``, ``##``
    continuations, digit splitting, UNK instead of byte fallback): rows that both sides can spell are scored with
    chunks that partition their bytes; rows one side can only spell with an unknown token are skipped, never mis-scored.
    """
    s_tok, t_tok = families[student_family], families[teacher_family]
    source = CrossTokenizerTeacher(tiny_llama(vocab=len(t_tok), seed=3), s_tok, t_tok, on_round_trip_error="skip_row")
    s_tok.padding_side = "right"
    enc = s_tok(FAMILY_TEXTS, padding=True, return_tensors="pt")
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    out = source.forward_batch(batch, need_logits=True)
    lost = [b for b, text in enumerate(FAMILY_TEXTS) if _unknown(s_tok, text) or _unknown(t_tok, text)]
    assert out["skipped_rows"] == lost and len(lost) < len(FAMILY_TEXTS)
    for b, text in enumerate(FAMILY_TEXTS):
        if b in lost:
            assert not out["chunk_mask"][b].any()
            continue
        aln = out["alignments"][b]
        spans = aln.chunk_spans
        assert out["texts"][b].strip() == text.strip() and spans[0][0] == 0
        assert [a for a, _ in spans[1:]] == [e for _, e in spans[:-1]]
        tail = out["texts"][b].encode("utf-8")[spans[-1][1] :]
        assert tail.decode().strip() == ""  # only whitespace after the last chunk
        assert int(out["chunk_mask"][b].sum()) >= aln.num_chunks - 1  # all but the first chunk (no context) scored
        if student_family == teacher_family:  # the same tokens on both sides of every chunk
            assert aln.tokens_per_chunk("student") == aln.tokens_per_chunk("teacher")
    student = tiny_llama(vocab=len(s_tok), seed=4)
    logits = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    for loss in ("alm", "uld"):
        value = cross_tokenizer_loss(logits, batch, out, loss=loss)
        assert torch.isfinite(value) and value > 0
