"""Tokenizer transfer (kd_plugins.crosstok.transfer): embedding initialisation from the old tokenizer's pieces, the
training recipe through DistillationCallback (ALM against the original model) and ``kd-plugins transfer-tokenizer``,
on tiny Llamas with tokenizers trained in the test."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from crosstok_tokenizers import CORPUS, byte_bpe, metaspace_bpe
from tiny import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_plugins.cli import main
from kd_plugins.crosstok.transfer import (
    TokenizerTransferConfig,
    tokenizer_transfer_plan,
    transfer_rows,
    transfer_tokenizer,
)
from kd_plugins.integrations.hf.tokenizer_transfer import train_transferred


@pytest.fixture(scope="module")
def toks():
    return byte_bpe(400), metaspace_bpe(520, bos=True)  # old: GPT-2 style; new: SentencePiece style + byte fallback


def _byte_level(data: bytes) -> str:
    """Independent GPT-2 byte -> character map (as in tests/test_crosstok_teacher.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return "".join(chr(table[b]) for b in data)


def _new_token_bytes(tok, piece: str) -> bytes:
    if piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:-1], 16)])
    return piece.replace("▁", " ").encode()


def test_rows_exact_mean_and_special(toks):
    old, new = toks
    model = tiny_llama(vocab=len(old), seed=1)  # untied input / output embeddings
    w_in, w_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    moved = transfer_tokenizer(model, old, new)
    assert moved is not model and torch.equal(model.get_input_embeddings().weight, w_in)  # the original is untouched
    n_in, n_out = moved.get_input_embeddings().weight, moved.get_output_embeddings().weight
    assert n_in.shape == (len(new), w_in.shape[1]) and moved.config.vocab_size == len(new)
    assert n_out.data_ptr() != n_in.data_ptr()
    old_vocab, special = old.get_vocab(), set(new.all_special_ids)
    exact = multi = 0
    for piece, i in new.get_vocab().items():
        if i in special:
            continue
        data = _new_token_bytes(new, piece)
        spelled = _byte_level(data)
        if spelled in old_vocab:  # the same bytes are one old token: exactly its rows
            exact += 1
            assert torch.equal(n_in[i], w_in[old_vocab[spelled]]) and torch.equal(n_out[i], w_out[old_vocab[spelled]])
        elif piece.startswith("▁") and piece[1:].isalpha():  # one word: the old tokenizer's pieces, averaged
            ids = old(data.decode(), add_special_tokens=False)["input_ids"]
            assert len(ids) > 1
            multi += 1
            torch.testing.assert_close(n_in[i], w_in[ids].mean(0), rtol=0, atol=1e-6)
            torch.testing.assert_close(n_out[i], w_out[ids].mean(0), rtol=0, atol=1e-6)
    assert exact > 100 and multi > 10
    # byte-fallback tokens are their byte, which the byte-level vocabulary has as a token
    e6 = new.convert_tokens_to_ids("<0xE6>")
    assert torch.equal(n_in[e6], w_in[old_vocab[_byte_level(bytes([0xE6]))]])
    # special tokens by role
    for role in ("bos", "eos", "pad", "unk"):
        assert torch.equal(n_in[getattr(new, f"{role}_token_id")], w_in[getattr(old, f"{role}_token_id")])
    assert moved.config.bos_token_id == new.bos_token_id and moved.config.eos_token_id == new.eos_token_id
    counts = moved.config.kd_plugins_tokenizer_transfer
    assert counts["exact"] >= exact and counts["special"] == 4 and sum(counts.values()) == len(new)


def test_special_tokens_follow_roles_not_names(toks):
    old, new = toks
    old = copy.deepcopy(old)
    old.pad_token = None  # no PAD on the old side: the new PAD starts from the old EOS (not the old "<pad>" string)
    plan = tokenizer_transfer_plan(old, new)
    assert plan.pieces[new.pad_token_id] == (old.eos_token_id,) and plan.how[new.pad_token_id] == "special"


def test_identity_transfer_keeps_every_row(toks):
    old, _ = toks
    model = tiny_llama(vocab=len(old), seed=2)
    moved = transfer_tokenizer(model, old, old)
    assert torch.equal(moved.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(moved.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize(
    "family", ["metaspace_bpe", "legacy_llama_bpe", "unigram_eos", "wordpiece_cased", "digit_split_byte_bpe"]
)
def test_identity_transfer_is_exact_for_every_tokenizer_family(family):
    """Every convention spells its own tokens back to themselves: byte-fallback ``<0xNN>`` included (onto the old
    ``<0xNN>``, not onto the character's own token), ``##`` continuations, Unigram pieces, split digits."""
    import crosstok_tokenizers

    tok = getattr(crosstok_tokenizers, family)()
    plan = tokenizer_transfer_plan(tok, tok)
    assert plan.pieces == [(i,) for i in range(len(tok))]
    assert plan.counts()["mean"] == plan.counts()["fallback"] == 0


def test_tied_model_saves_and_reloads_with_from_pretrained(toks, tmp_path):
    old, new = toks
    model = _tied_llama(len(old))
    moved = transfer_tokenizer(model, old, new)
    assert moved.get_output_embeddings().weight is moved.get_input_embeddings().weight
    moved.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.vocab_size == len(new) and back.config.pad_token_id == new.pad_token_id
    assert back.get_output_embeddings().weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()
    for k, v in moved.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    ids = new("The lazy dog.", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(back(input_ids=ids).logits, moved(input_ids=ids).logits)


def _tied_llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def test_transfer_rows_cut_at_whitespace_and_round_trip(toks):
    _, new = toks
    text = " ".join(CORPUS)
    rows = transfer_rows([text, "", "   "], new, 24)
    assert len(rows) > 3 and all(2 <= len(r["input_ids"]) <= 24 for r in rows)
    pieces = [new.decode(r["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False) for r in rows]
    assert "".join(" ".join(pieces).split()) == "".join(text.split())  # nothing lost, nothing added
    for r, p in zip(rows, pieces):
        assert new(p)["input_ids"] == r["input_ids"]  # each row is what the tokenizer gives for its text


def test_train_transferred_with_alm_through_the_callback(toks, tmp_path):
    old, new = toks
    original = tiny_llama(vocab=len(old), seed=4)
    student = transfer_tokenizer(original, old, new)
    cfg = TokenizerTransferConfig(steps=3, batch_size=2, max_length=24, logging_steps=1, train_embeddings_only=True)
    body = {k: v.clone() for k, v in student.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    trainer = train_transferred(student, new, original, old, CORPUS, cfg, output_dir=str(tmp_path / "t"))
    logged = [h for h in trainer.state.log_history if "kd_alm" in h]
    assert len(logged) == 3 and all({"task_loss", "kd_alm"} <= set(h) for h in logged)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in body.items())  # embeddings only
    assert not any(p.requires_grad for p in original.parameters())
    with pytest.raises(ValueError, match="nothing to train"):
        TokenizerTransferConfig(alm_weight=0, ce_weight=0)
    assert TokenizerTransferConfig(uld_weight=0.5).loss_terms == "alm:1,uld:0.5"
    assert TokenizerTransferConfig(hidden_weight=0.5).loss_terms == "alm:1,chunk_hidden:0.5"
    with pytest.raises(ValueError, match="hidden_layers must be"):
        TokenizerTransferConfig(hidden_layers="middle")


def test_train_transferred_matches_every_layer_at_chunk_ends(toks, tmp_path):
    """hidden_weight > 0: chunk_hidden over every layer (the transferred model has the original's depth) is logged
    and falls as the body learns the new segmentation."""
    old, new = toks
    original = tiny_llama(vocab=len(old), seed=5)
    student = transfer_tokenizer(original, old, new)
    cfg = TokenizerTransferConfig(
        steps=6,
        batch_size=2,
        max_length=24,
        logging_steps=1,
        alm_weight=0,
        ce_weight=0,
        hidden_weight=1.0,
        hidden_layers="all",
        learning_rate=3e-3,
    )
    trainer = train_transferred(student, new, original, old, CORPUS, cfg, output_dir=str(tmp_path / "h"))
    logged = [h["kd_chunk_hidden"] for h in trainer.state.log_history if "kd_chunk_hidden" in h]
    assert len(logged) == 6 and all(v > 0 for v in logged)
    assert sum(logged[-2:]) < sum(logged[:2])


def test_cli_transfers_and_trains_two_steps(toks, tmp_path, capsys):
    old, new = toks
    tiny_llama(vocab=len(old), seed=5).save_pretrained(tmp_path / "model")
    old.save_pretrained(tmp_path / "model")
    new.save_pretrained(tmp_path / "tok")
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(CORPUS), encoding="utf-8")
    out = tmp_path / "out"
    argv = [str(tmp_path / "model"), str(tmp_path / "tok"), str(out), "--data", str(data), "--steps", "2"]
    assert main(["transfer-tokenizer", *argv, "--batch_size", "2", "--max_length", "24", "--logging_steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "kd_alm" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) == len(new) and os.path.isfile(out / "tokenizer.json")
    assert main(["transfer-tokenizer", *argv[:3], "--steps", "0"]) == 0  # initialise only: no --data needed


SMOLLM2 = os.path.join(os.path.dirname(__file__), "..", ".cache", "assets", "smollm2-135m-instruct")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "tokenizer.json")), reason="SmolLM2 not converted yet")
def test_real_byte_level_vocabulary_maps_onto_itself():
    """SmolLM2's 49,152-token byte-level BPE against itself: every token is its own exact piece, specials by role."""
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    plan = tokenizer_transfer_plan(tok, tok)
    assert all(p == (i,) for i, p in enumerate(plan.pieces))
    assert plan.counts() == {"exact": len(tok) - 17, "mean": 0, "special": 17, "fallback": 0}


@pytest.mark.real
def test_smollm2_moved_to_a_new_bpe_closes_on_its_original_in_four_steps(tmp_path):
    """End to end on the real SmolLM2-135M: moved to a 400-token byte-level BPE trained in the test, then 4 steps of
    balanced CE + ALM + chunk_hidden (all 30 layers) through the recipe. On the training text the mean absolute chunk
    log-likelihood gap to the original falls by more than half (measured 7.76 -> 2.34 nats per chunk) and the
    chunk-end hidden-state distance falls (1.107 -> 1.064)."""
    from pathlib import Path

    from benchmarks.data import lm
    from kd_plugins.crosstok import CrossTokenizerTeacher, cross_tokenizer_loss

    try:
        original, old = lm.load_smollm2(cache_dir=Path(__file__).resolve().parents[1] / ".cache" / "assets")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")
    new = byte_bpe(400)
    new.pad_token = new.eos_token
    texts = CORPUS[:1] + CORPUS[2:]  # the Latin-script sentences
    student = transfer_tokenizer(original, old, new)
    enc = new(texts, padding=True, return_tensors="pt")
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    source = CrossTokenizerTeacher(original, new, old, hidden_layers="all")

    @torch.no_grad()
    def gaps():
        out = student(**batch, output_hidden_states=True)
        t_out = source(batch, need_hidden=True)
        alm = cross_tokenizer_loss(out.logits, batch, t_out, "alm", form="abs").item()
        hidden = cross_tokenizer_loss(out.logits, batch, t_out, "chunk_hidden", student_hidden_states=out.hidden_states)
        return alm, hidden.item(), int(t_out["chunk_mask"].sum())

    alm0, hidden0, chunks = gaps()
    cfg = TokenizerTransferConfig(
        steps=4,
        batch_size=4,
        max_length=64,
        logging_steps=1,
        hidden_weight=1.0,
        hidden_layers="all",
        term_balance="gradmag",
    )
    trainer = train_transferred(student, new, original, old, texts, cfg, output_dir=str(tmp_path))
    assert any("kd_chunk_hidden" in h and "balance_alm" in h for h in trainer.state.log_history)
    alm1, hidden1, _ = gaps()
    assert chunks > 50 and alm0 > 5.0
    assert alm1 < 0.5 * alm0 and hidden1 < hidden0
    assert not any(p.requires_grad for p in original.parameters())


@pytest.mark.real
def test_benchmark_smoke_runs_end_to_end(tmp_path):
    """``benchmarks/crosstok/tokenizer_transfer_smollm2.py --smoke``: the benchmark's whole path (new tokenizer,
    transfer, balanced CE + ALM training, bits/byte and the chunk gap on rows opened by SmolLM2's <|endoftext|>,
    which its tokenizer also names its UNK) runs on the real model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".cache" / "assets" / "smollm2-135m-instruct").exists():
        pytest.skip("SmolLM2 asset not prepared (make bench-assets)")
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, "benchmarks/crosstok/tokenizer_transfer_smollm2.py", "--threads", "2", "--smoke"]
    cmd += ["--train-domain", "bbc", "--arms", "ce_alm_gradmag", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[-1]["arm"] == "ce_alm_gradmag" and rows[-1]["chunk_gap_nats"] > 0
