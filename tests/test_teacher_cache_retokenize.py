"""Teachers with another tokenizer, live and cached: the student's text re-tokenized for the teacher.

Sequence-level targets (pooled embeddings) do not need aligned tokens, so a sentence encoder of another family can
teach. The live engine and ``build_teacher_cache(teacher_tokenizer=...)`` share ``retokenize``: the cached
embeddings equal what the live teacher computes, and both train the same student.
"""

import pytest
import torch
from tiny import tiny_bert, tiny_llama, training_args
from transformers import PreTrainedTokenizerFast, Trainer

from kd_plugins import (
    DistillationCallback,
    DistillationConfig,
    build_teacher_cache,
    load_teacher_cache,
    save_teacher_cache,
)
from kd_plugins.distill.retokenize import retokenize, teacher_max_length
from kd_plugins.losses.feature import mean_pool

WORDS = [f"w{i}" for i in range(60)]


def _tokenizer(words, specials=("[PAD]", "[UNK]")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(list(specials) + list(words))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizers():
    student = _tokenizer(WORDS)
    teacher = _tokenizer(list(reversed(WORDS)) + ["x0", "x1"], specials=("[UNK]", "[PAD]", "[SEP]"))
    return student, teacher


def _texts(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),)))
        for _ in range(n)
    ]


class Texts(torch.utils.data.Dataset):
    def __init__(self, tok, texts):
        enc = tok(texts)
        self.items = [
            {"input_ids": ids, "attention_mask": am} for ids, am in zip(enc["input_ids"], enc["attention_mask"])
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _live_embeddings(teacher, tok_t, texts, max_length=None):
    enc = tok_t(texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return mean_pool(teacher(**enc).last_hidden_state, enc["attention_mask"])


def test_retokenize_decodes_only_the_unpadded_tokens(tokenizers):
    tok_s, tok_t = tokenizers
    texts = ["w1 w2 w3", "w59"]
    enc = tok_s(texts, padding=True, return_tensors="pt")
    assert not torch.equal(enc["input_ids"][0], tok_t(texts[0], return_tensors="pt")["input_ids"][0])
    got = retokenize(tok_s, tok_t, enc["input_ids"], enc["attention_mask"])
    want = tok_t(texts, padding=True, return_tensors="pt")
    # padding with an ordinary token id (as some causal-LM collators do): only the attention mask drops it
    ordinary = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, tok_s.convert_tokens_to_ids("w7"))
    torch.testing.assert_close(
        retokenize(tok_s, tok_t, ordinary, enc["attention_mask"])["input_ids"], want["input_ids"]
    )
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert retokenize(tok_s, tok_t, enc["input_ids"], enc["attention_mask"], max_length=2)["input_ids"].shape[1] == 2
    assert teacher_max_length(tok_t) == 512  # no real limit: capped
    with pytest.raises(ValueError, match="both the student's and the teacher's tokenizer"):
        retokenize(None, tok_t, enc["input_ids"])


def test_cached_embeddings_equal_the_live_teacher_on_its_own_tokens(tokenizers):
    tok_s, tok_t = tokenizers
    teacher = tiny_bert(vocab=len(tok_t), hidden=48, seed=3).eval()
    texts = _texts()
    ds = Texts(tok_s, texts)
    cache = build_teacher_cache(
        teacher, ds, teacher_tokenizer=tok_t, student_tokenizer=tok_s, batch_size=5, progress=False
    )
    assert cache.metadata["teacher_tokenizer_fingerprint"] and cache.metadata["teacher_max_length"] == 512
    batch = tok_s(texts, padding=True, return_tensors="pt")
    got = cache.lookup(dict(batch))["pooled_embedding"]
    torch.testing.assert_close(got, _live_embeddings(teacher, tok_t, texts), atol=1e-5, rtol=1e-5)
    short = build_teacher_cache(
        teacher, ds, teacher_tokenizer=tok_t, student_tokenizer=tok_s, teacher_max_length=3, progress=False
    )
    torch.testing.assert_close(
        short.lookup(dict(batch))["pooled_embedding"], _live_embeddings(teacher, tok_t, texts, 3), atol=1e-5, rtol=1e-5
    )


def _train(tok_s, student, teacher_or_cache, ds, out, **cb_kw):
    cfg = DistillationConfig(task="encoder", loss_terms="embedding_mse", pooling="mean")
    trainer = Trainer(
        model=student,
        args=training_args(out, max_steps=2, learning_rate=0.05, optim="sgd", per_device_train_batch_size=4),
        train_dataset=ds,
        data_collator=lambda rows: tok_s.pad(rows, return_tensors="pt"),
        processing_class=tok_s,
        callbacks=[DistillationCallback(teacher_or_cache, cfg, **cb_kw)],
    )
    trainer.train()
    return trainer


def test_cache_and_live_teacher_train_the_same_student(tokenizers, tmp_out):
    tok_s, tok_t = tokenizers
    teacher = tiny_bert(vocab=len(tok_t), seed=3).eval()
    ds = Texts(tok_s, _texts(8))
    cache = build_teacher_cache(teacher, ds, teacher_tokenizer=tok_t, student_tokenizer=tok_s, progress=False)
    live = _train(tok_s, tiny_bert(vocab=len(tok_s), seed=4), teacher, ds, tmp_out, teacher_tokenizer=tok_t)
    cached = _train(tok_s, tiny_bert(vocab=len(tok_s), seed=4), cache, ds, tmp_out)
    losses = [[h["kd_embedding_mse"] for h in t.state.log_history if "kd_embedding_mse" in h] for t in (live, cached)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(live.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_wider_cached_teacher_trains_through_a_projector(tokenizers, tmp_out, caplog):
    caplog.set_level("INFO", logger="kd_plugins.distill")
    tok_s, tok_t = tokenizers
    ds = Texts(tok_s, _texts(8))
    cache = build_teacher_cache(
        tiny_bert(vocab=len(tok_t), hidden=48, seed=3),
        ds,
        teacher_tokenizer=tok_t,
        student_tokenizer=tok_s,
        progress=False,
    )
    assert cache.tensors["embeddings"].shape == (8, 48)
    trainer = _train(tok_s, tiny_bert(vocab=len(tok_s), seed=4), cache, ds, tmp_out)
    assert "(32 -> 48)" in caplog.text and "projector_lr" in caplog.text  # the advice for a fresh projector
    assert all(
        torch.isfinite(torch.tensor(h["kd_embedding_mse"]))
        for h in trainer.state.log_history
        if "kd_embedding_mse" in h
    )


def test_bad_retokenized_cache_requests(tokenizers):
    tok_s, tok_t = tokenizers
    ds = Texts(tok_s, _texts(4))
    encoder = tiny_bert(vocab=len(tok_t), seed=3)
    with pytest.raises(ValueError, match="needs student_tokenizer"):
        build_teacher_cache(encoder, ds, teacher_tokenizer=tok_t, progress=False)
    llama, both = tiny_llama(vocab=len(tok_t)), dict(teacher_tokenizer=tok_t, student_tokenizer=tok_s, progress=False)
    with pytest.raises(ValueError, match="lowrank.*per-token rows need one tokenizer"):
        build_teacher_cache(llama, ds, kind="lowrank", **both)
    with pytest.raises(ValueError, match="per-token logits.*loss_terms='alm'"):
        build_teacher_cache(llama, ds, kind="topk", **both)
    with pytest.raises(ValueError, match="teacher_max_length applies to re-tokenized inputs"):
        build_teacher_cache(encoder, ds, teacher_max_length=8, progress=False)


def test_retokenized_cache_round_trips_and_refuses_other_tokenizers(tokenizers, tmp_path):
    tok_s, tok_t = tokenizers
    teacher = tiny_bert(vocab=len(tok_t), hidden=48, seed=3).eval()
    texts = _texts(6)
    ds = Texts(tok_s, texts)
    cache = build_teacher_cache(teacher, ds, teacher_tokenizer=tok_t, student_tokenizer=tok_s, progress=False)
    save_teacher_cache(cache, tmp_path / "c")
    loaded = load_teacher_cache(tmp_path / "c", teacher=teacher, dataset=ds, tokenizer=tok_s, teacher_tokenizer=tok_t)
    batch = dict(tok_s(texts, padding=True, return_tensors="pt"))
    assert torch.equal(loaded.lookup(batch)["pooled_embedding"], cache.lookup(batch)["pooled_embedding"])
    other = _tokenizer(WORDS + ["x9"])
    with pytest.raises(ValueError, match="teacher read its inputs with another tokenizer"):
        load_teacher_cache(tmp_path / "c", teacher_tokenizer=other)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        load_teacher_cache(tmp_path / "c", tokenizer=other)
    plain = build_teacher_cache(tiny_bert(vocab=len(tok_s), seed=3), ds, progress=False)
    save_teacher_cache(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="not built with a teacher_tokenizer"):
        load_teacher_cache(tmp_path / "plain", teacher_tokenizer=tok_t)
