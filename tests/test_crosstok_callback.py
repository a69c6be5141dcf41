"""Cross-tokenizer distillation through the core: DistillationCallback / DistillationTrainer with ``alm`` / ``uld`` on
an unmodified Trainer, two tiny Llamas reading the same text through two different trained BPEs."""

from __future__ import annotations

import copy

import pytest
import torch
from crosstok_tokenizers import byte_bpe, metaspace_bpe
from tiny import tiny_bert, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, DistillationEngine, DistillationTrainer
from kd_plugins.crosstok import CrossTokenizerTeacher, RoundTripError, cross_tokenizer_loss
from kd_plugins.distill.scaling import LossScaling

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A single man  in possession\nof a good fortune, naïve café 👍.",
    "Shares rose 5% to £3.20, analysts said.",
    "It is a truth universally acknowledged.",
]


@pytest.fixture(scope="module")
def toks():
    return byte_bpe(320), metaspace_bpe(520, bos=True)  # student: GPT-2 style, no BOS; teacher: SentencePiece + BOS


class TextRows(torch.utils.data.Dataset):
    """Texts tokenized by the student tokenizer, right-padded to one length, labels = ids (-100 at padding)."""

    def __init__(self, tok, texts=TEXTS):
        enc = tok(texts, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        self.items = [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(texts))
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pair(toks, seed=0):
    s_tok, t_tok = toks
    return tiny_llama(vocab=len(s_tok), seed=seed + 1), tiny_llama(vocab=len(t_tok), seed=seed + 2, layers=3)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch(tok, texts=TEXTS):
    ds = TextRows(tok, texts)
    return {k: torch.stack([it[k] for it in ds.items]) for k in ds.items[0]}


CFG = dict(loss_terms="alm:1.0,uld:0.5", hard_label_weight=1.0)


def test_callback_trains_a_student_with_another_tokenizer(toks, tmp_out):
    s_tok, t_tok = toks
    student, teacher = _pair(toks)
    t_before = _params(teacher)
    cb = DistillationCallback(teacher, DistillationConfig(**CFG), teacher_tokenizer=t_tok)
    trainer = Trainer(
        model=student,
        args=training_args(tmp_out, per_device_train_batch_size=2),
        train_dataset=TextRows(s_tok),
        processing_class=s_tok,
        callbacks=[cb],
    )
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(hist) == 3
    for h in hist:
        assert {"kd_alm", "kd_uld", "task_loss", "crosstok_skipped_rows"} <= set(h)
        assert h["kd_alm"] > 0 and h["kd_uld"] > 0 and h["crosstok_skipped_rows"] == 0
        assert h["kd_loss"] == pytest.approx(h["kd_alm"] + 0.5 * h["kd_uld"], rel=1e-4)
        assert h["loss"] == pytest.approx(h["task_loss"] + h["kd_loss"], rel=1e-4)
    assert any("cross-tokenizer terms" in r for r in cb.fused_reasons)  # the fused path stood aside, with a reason
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_callback_loss_equals_cross_tokenizer_loss_by_hand(toks, tmp_out):
    s_tok, t_tok = toks
    student, teacher = _pair(toks, seed=10)
    cb = DistillationCallback(teacher, DistillationConfig(**CFG), teacher_tokenizer=t_tok)
    trainer = Trainer(model=student, args=training_args(tmp_out), processing_class=s_tok, callbacks=[cb])
    batch = _batch(s_tok)
    loss = trainer.compute_loss(student, batch)  # the patched compute_loss: task loss + distillation terms

    source = CrossTokenizerTeacher(copy.deepcopy(teacher), s_tok, t_tok)
    out = student(**batch)
    t_out = source(batch, need_logits=True)
    tokens = int((batch["labels"][:, 1:] != -100).sum())  # the count the task loss divides by
    alm = cross_tokenizer_loss(out.logits, batch, t_out, "alm", reduction="sum") / tokens
    uld = cross_tokenizer_loss(out.logits, batch, t_out, "uld", reduction="mean", num_items_in_batch=tokens)
    assert int(t_out["chunk_mask"].sum()) > 20 and int(t_out["uld_mask"].sum()) > 5
    expected = out.loss + alm + 0.5 * uld
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_chunk_hidden_through_the_callback_equals_the_loss_by_hand(toks, tmp_out):
    """chunk_hidden: the student runs with hidden states, the teacher's are gathered at chunk ends; the callback's
    loss is the task loss + ALM + 0.5 x chunk_hidden computed by hand."""
    s_tok, t_tok = toks
    student, teacher = _pair(toks, seed=70)
    cfg = DistillationConfig(loss_terms="alm:1.0,chunk_hidden:0.5", hard_label_weight=1.0)
    cb = DistillationCallback(teacher, cfg, teacher_tokenizer=t_tok)
    trainer = Trainer(model=student, args=training_args(tmp_out), processing_class=s_tok, callbacks=[cb])
    batch = _batch(s_tok)
    loss = trainer.compute_loss(student, batch)

    source = CrossTokenizerTeacher(copy.deepcopy(teacher), s_tok, t_tok)  # hidden_layers="last"
    out = student(**batch, output_hidden_states=True)
    t_out = source(batch, need_hidden=True)
    assert t_out["teacher_hidden_aligned"].shape[:3] == (1, *t_out["chunk_mask"].shape)
    assert t_out["hidden_layer_ids"] == (teacher.config.num_hidden_layers,)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    alm = cross_tokenizer_loss(out.logits, batch, t_out, "alm", reduction="sum") / tokens
    hid = cross_tokenizer_loss(
        out.logits, batch, t_out, "chunk_hidden", reduction="sum", student_hidden_states=out.hidden_states
    )
    assert hid.item() > 0
    assert loss.item() == pytest.approx((out.loss + alm + 0.5 * hid / tokens).item(), rel=1e-5)
    # by hand: the last student / teacher token of every scored chunk, channel-normalised squared error
    pos, mask = t_out["student_positions_last"], t_out["chunk_mask"]
    h_s = out.hidden_states[-1][torch.arange(pos.shape[0])[:, None], pos.clamp(min=0)][mask]
    teacher_out = teacher(
        input_ids=t_out["teacher_input_ids"], attention_mask=t_out["teacher_attention_mask"], output_hidden_states=True
    )
    chunks_t = t_out["chunk_ids_teacher"]
    h_t = []
    for b, k in mask.nonzero().tolist():
        last = int((chunks_t[b] == k).nonzero().max())
        h_t.append(teacher_out.hidden_states[-1][b, last])
    h_t = torch.stack(h_t).detach()
    by_hand = ((h_s - h_t) ** 2 / (h_t.pow(2).mean(0) + 1e-6)).mean(-1).sum()
    assert hid.item() == pytest.approx(by_hand.item(), rel=1e-4)


def test_chunk_hidden_is_zero_for_the_same_model_and_tokenizer(toks):
    """A model against itself through one tokenizer: every chunk is one token, every layer's state the same."""
    s_tok, _ = toks
    model = tiny_llama(vocab=len(s_tok), seed=80)
    source = CrossTokenizerTeacher(copy.deepcopy(model), s_tok, s_tok, hidden_layers="all")
    batch = _batch(s_tok)
    out = model(**batch, output_hidden_states=True)
    t_out = source(batch, need_hidden=True)
    assert t_out["hidden_layer_ids"] == (1, 2)
    value = cross_tokenizer_loss(out.logits, batch, t_out, "chunk_hidden", student_hidden_states=out.hidden_states)
    assert int(t_out["chunk_mask"].sum()) > 20 and value.item() == pytest.approx(0.0, abs=1e-10)
    deeper = CrossTokenizerTeacher(tiny_llama(vocab=len(s_tok), seed=81, layers=3), s_tok, s_tok, hidden_layers="all")
    with pytest.raises(ValueError, match="different depths.*hidden_layers='last'"):
        cross_tokenizer_loss(
            out.logits, batch, deeper(batch, need_hidden=True), "chunk_hidden", student_hidden_states=out.hidden_states
        )
    with pytest.raises(ValueError, match="need_hidden=True"):
        cross_tokenizer_loss(out.logits, batch, source(batch), "chunk_hidden", student_hidden_states=out.hidden_states)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        cross_tokenizer_loss(out.logits, batch, t_out, "chunk_hidden")


def test_engine_without_labels_and_options(toks):
    """No labels: the term is its chunk sum over the non-padding positions; options reach the teacher source."""
    s_tok, t_tok = toks
    student, teacher = _pair(toks, seed=20)
    cfg = DistillationConfig(loss_terms="alm", cross_tokenizer_options="max_teacher_length=8,uld_positions=chunk_start")
    engine = DistillationEngine(teacher, cfg, teacher_tokenizer=t_tok, student_tokenizer=s_tok)
    engine.setup(student)
    assert engine.crosstok.source.max_teacher_length == 8 and engine.crosstok.source.uld_positions == "chunk_start"
    batch = {k: v for k, v in _batch(s_tok).items() if k != "labels"}
    out = student(**batch)
    res = engine.compute(batch, out, scaling=LossScaling())
    t_out = engine.crosstok.source(batch)
    positions = int(batch["attention_mask"][:, 1:].sum())
    ref = cross_tokenizer_loss(out.logits, batch, t_out, "alm", reduction="sum") / positions
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # the default truncation follows the teacher's position limit
    engine2 = DistillationEngine(teacher, DistillationConfig(loss_terms="alm"), teacher_tokenizer=t_tok)
    engine2.set_student_tokenizer(s_tok)
    engine2.setup(student)
    assert engine2.crosstok.source.max_teacher_length == teacher.config.max_position_embeddings


def test_gradient_accumulation_matches_one_large_batch(toks, tmp_out):
    """GA=2 x batch 2 gives the same update as batch 4: chunk sums are divided by the accumulated label tokens."""
    s_tok, t_tok = toks
    finals = []
    for bs, ga in ((4, 1), (2, 2)):
        student, teacher = _pair(toks, seed=30)
        args = training_args(
            tmp_out + str(ga),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        cb = DistillationCallback(teacher, DistillationConfig(**CFG), teacher_tokenizer=t_tok)
        trainer = Trainer(
            model=student, args=args, train_dataset=TextRows(s_tok), processing_class=s_tok, callbacks=[cb]
        )
        trainer.train()
        finals.append(_params(student))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-6)
    start = _params(_pair(toks, seed=30)[0])
    assert all(not torch.equal(finals[0][k], start[k]) for k in finals[0] if k.endswith("embed_tokens.weight"))


def test_distillation_trainer_takes_the_teacher_tokenizer(toks, tmp_out):
    s_tok, t_tok = toks
    student, teacher = _pair(toks, seed=40)
    trainer = DistillationTrainer(
        model=student,
        args=training_args(tmp_out, max_steps=2),
        train_dataset=TextRows(s_tok),
        processing_class=s_tok,
        teacher_model=teacher,
        distillation_config=DistillationConfig(loss_terms="alm"),
        teacher_tokenizer=t_tok,
    )
    trainer.train()
    logged = [h["kd_alm"] for h in trainer.state.log_history if "kd_alm" in h]
    assert len(logged) == 2 and all(v > 0 for v in logged)


def _setup_error(toks, cfg, *, teacher_tok="teacher", student=None, **engine_kw):
    s_tok, t_tok = toks
    s, teacher = _pair(toks, seed=50)
    tt = {"teacher": t_tok, "student": s_tok, None: None}[teacher_tok]
    engine = DistillationEngine(teacher, DistillationConfig(**cfg), teacher_tokenizer=tt, **engine_kw)
    engine.set_student_tokenizer(s_tok)
    engine.setup(student if student is not None else s)


def test_bad_setups_name_the_fix(toks, tmp_out):
    s_tok, _ = toks
    with pytest.raises(ValueError, match="need the teacher's tokenizer.*teacher_tokenizer="):
        _setup_error(toks, {"loss_terms": "alm"}, teacher_tok=None)
    with pytest.raises(ValueError, match="tokenizers are the same.*loss_terms='kl'"):
        _setup_error(toks, {"loss_terms": "alm"}, teacher_tok="student")
    with pytest.raises(ValueError, match="tokenizers differ.*'alm' / 'uld'"):
        _setup_error(toks, {"loss_terms": "kl"})
    with pytest.raises(ValueError, match=r"terms \['kl'\] are token-level.*Keep only 'alm' / 'uld'"):
        _setup_error(toks, {"loss_terms": "kl,alm"})
    with pytest.raises(ValueError, match="fused_loss=True cannot compute the cross-tokenizer terms"):
        _setup_error(toks, {"loss_terms": "alm", "fused_loss": True})
    with pytest.raises(ValueError, match="causal language models.*'seq_classification'"):
        _setup_error(toks, {"loss_terms": "alm"}, student=tiny_bert("BertForSequenceClassification"))
    with pytest.raises(ValueError, match="unknown key 'max_length'"):
        _setup_error(toks, {"loss_terms": "alm", "cross_tokenizer_options": "max_length=8"})
    with pytest.raises(ValueError, match="names no cross-tokenizer term"):
        _setup_error(toks, {"loss_terms": "kl", "cross_tokenizer_options": "max_teacher_length=8"})
    with pytest.raises(ValueError, match="sets 'reduction'"):
        _setup_error(toks, {"loss_terms": "alm", "loss_kwargs": {"alm": {"reduction": "mean"}}})
    with pytest.raises(ValueError, match="hidden size is 48 and the teacher's 32"):
        _setup_error(toks, {"loss_terms": "chunk_hidden"}, student=tiny_llama(vocab=len(s_tok), hidden=48))
    with pytest.raises(ValueError, match="no 'chunk_hidden' term"):
        _setup_error(toks, {"loss_terms": "alm", "cross_tokenizer_options": "hidden_layers=all"})
    with pytest.raises(ValueError, match="hidden_layers must be 'last', 'all' or"):
        _setup_error(toks, {"loss_terms": "chunk_hidden", "cross_tokenizer_options": "hidden_layers=first"})
    with pytest.raises(ValueError, match=r"unknown keys \['beta'\]"):
        _setup_error(toks, {"loss_terms": "uld", "loss_kwargs": {"uld": {"beta": 0.5}}})
    # the callback: no teacher tokenizer -> the error at train start names the fix
    student, teacher = _pair(toks, seed=60)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="alm"))
    trainer = Trainer(
        model=student,
        args=training_args(tmp_out),
        train_dataset=TextRows(s_tok),
        processing_class=s_tok,
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match="teacher_tokenizer="):
        trainer.train()


def test_round_trip_failures_raise_or_are_skipped_and_logged(toks):
    s_tok, t_tok = toks
    split = [s_tok.convert_tokens_to_ids(ch) for ch in "The"]  # not what encode gives: does not round-trip
    good = s_tok("The lazy dog.")["input_ids"]
    n = len(good)
    ids = torch.tensor([split + [0] * (n - len(split)), good])
    mask = (torch.arange(n)[None] < torch.tensor([[len(split)], [n]])).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    for opts in (None, "on_round_trip_error=skip_row"):
        student, teacher = _pair(toks, seed=70)
        cfg = DistillationConfig(loss_terms="alm", cross_tokenizer_options=opts)
        engine = DistillationEngine(teacher, cfg, teacher_tokenizer=t_tok, student_tokenizer=s_tok)
        engine.setup(student)
        out = student(**batch)
        if opts is None:
            with pytest.raises(RoundTripError, match="cross_tokenizer_options='on_round_trip_error=skip_row'"):
                engine.compute(batch, out)
        else:
            res = engine.compute(batch, out)
            assert res.metrics["crosstok_skipped_rows"] == 1 and torch.isfinite(res.loss) and res.loss > 0
