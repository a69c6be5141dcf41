"""HAD (Hybrid Architecture Distillation): grouped masking, the visible-token feature term, HADCallback in a Trainer."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import tiny_bert, tiny_llama, training_args

from kd_plugins import HADCallback, HADCollator, HADConfig, grouped_mask, had_feature_loss, visible_feature_loss
from kd_plugins.distill.had import check_had_batch, check_same_vocabulary, unmasked_input_ids
from kd_plugins.distill.projectors import STATE_FILE, ProjectorBank

VOCAB = 96
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_tokenizer(extra=(), mask=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))] + list(extra)
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=raw, **names, **({"mask_token": "[MASK]"} if mask else {}))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def examples(tokenizer, n=8, lengths=(12, 20), seed=0):
    """Tokenized rows ``[CLS] w.. [SEP]`` of alternating lengths (the shorter ones get padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        body = torch.randint(len(SPECIALS), VOCAB, (lengths[i % len(lengths)] - 2,), generator=g).tolist()
        out.append({"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id]})
    return out


def runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    lengths, current = [], 0
    for v in row.tolist() + [False]:
        if v:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths


# ----------------------------------------------------------------------------------------------------- masking
def test_grouped_mask_ratio_groups_and_seed():
    g = torch.Generator().manual_seed(0)
    maskable = torch.rand(64, 50, generator=g) > 0.1
    maskable[:, 0] = maskable[:, -1] = False
    masked = grouped_mask(maskable, 0.15, 4, generator=torch.Generator().manual_seed(1))
    assert not (masked & ~maskable).any()
    group_runs = []
    for row, ok in zip(masked, maskable):
        n = int(ok.sum())
        target = max(1, round(0.15 * n))
        assert int(row.sum()) == target  # the ratio, exactly (up to rounding)
        lengths = runs(row[ok])  # runs among the maskable tokens
        assert len(lengths) <= target // 4 + 3  # whole groups: at most the groups drawn (plus cut edge groups)
        group_runs += lengths
    token_runs = [n for row, ok in zip(grouped_mask(maskable, 0.15, 1), maskable) for n in runs(row[ok])]
    assert sum(group_runs) / len(group_runs) > 2.5 > 1.5 > sum(token_runs) / len(token_runs)
    again = grouped_mask(maskable, 0.15, 4, generator=torch.Generator().manual_seed(1))
    other = grouped_mask(maskable, 0.15, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(masked, again) and not torch.equal(masked, other)
    assert not grouped_mask(torch.zeros(2, 5, dtype=torch.bool), 0.15, 3).any()  # nothing maskable: nothing masked


def test_collator_masks_groups_never_specials_or_padding(tokenizer):
    rows = examples(tokenizer, n=16)
    batch = HADCollator(tokenizer, seed=0, group_size=3)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "had_visible"}
    original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        original[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    masked = batch["labels"] != -100
    special = (original == tokenizer.cls_token_id) | (original == tokenizer.sep_token_id)
    padding = batch["attention_mask"] == 0
    assert padding.any() and not (masked & (special | padding)).any()
    assert torch.equal(batch["labels"][masked], original[masked])  # labels: the original tokens, -100 elsewhere
    assert (batch["input_ids"][masked] == tokenizer.mask_token_id).all()
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    assert torch.equal(batch["had_visible"], batch["attention_mask"].bool() & ~masked)
    assert torch.equal(unmasked_input_ids(batch["input_ids"], batch["labels"]), original)
    for row, ok in zip(masked, ~(special | padding)):
        assert int(row.sum()) == max(1, round(0.15 * int(ok.sum())))
    again = HADCollator(tokenizer, seed=0, group_size=3)(rows)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    plain = HADCollator(tokenizer, seed=0, return_visible=False)(rows)
    assert "had_visible" not in plain


def test_collator_bert_replacement_rule(tokenizer):
    batch = HADCollator(tokenizer, seed=0, mask_ratio=0.5, mask_replace_prob=0.8, random_replace_prob=0.1)(
        examples(tokenizer, n=64, lengths=(40,))
    )
    masked = batch["labels"] != -100
    share = float((batch["input_ids"][masked] == tokenizer.mask_token_id).float().mean())
    assert 0.75 < share < 0.85
    assert not (batch["had_visible"] & masked).any()  # a masked token left unchanged is still not "visible"


# ------------------------------------------------------------------------------------------------ feature term
def test_feature_term_covers_visible_tokens_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    visible = torch.rand(2, 7, generator=g) > 0.4
    visible[0, 0], visible[1, 3] = True, False
    for loss in ("cosine", "mse"):
        base = visible_feature_loss(s, t, visible, loss=loss)
        t2 = t.clone()
        t2[~visible] = 100.0  # teacher features at masked / padded positions
        assert torch.allclose(visible_feature_loss(s, t2, visible, loss=loss), base)
        t3 = t.clone()
        t3[0, 0] += 1.0  # at a visible position
        assert not torch.allclose(visible_feature_loss(s, t3, visible, loss=loss), base)
        assert float(visible_feature_loss(t, t, visible, loss=loss)) == pytest.approx(0.0, abs=1e-6)
    expected = (1 - torch.cosine_similarity(s[visible], t[visible], dim=-1)).mean()
    assert torch.allclose(visible_feature_loss(s, t, visible), expected)


def test_projector_when_widths_differ():
    s = torch.randn(2, 5, 8, requires_grad=True)
    t = torch.randn(2, 5, 12)
    visible = torch.ones(2, 5, dtype=torch.bool)
    bank = ProjectorBank()
    loss = had_feature_loss((s, s), (t, t, t), visible, HADConfig(layers="-1=-1,0=1"), bank)
    assert len(bank) == 2
    loss.backward()
    assert s.grad is not None and all(p.grad is not None for p in bank.modules.parameters())
    with pytest.raises(ValueError, match="projector=False"):
        had_feature_loss((s,), (t,), visible, HADConfig(projector=False), ProjectorBank(enabled=False))
    with pytest.raises(ValueError, match="hidden_states index 5"):
        had_feature_loss((s,), (t,), visible, HADConfig(layers="5=-1"), bank)


# ------------------------------------------------------------------------------------------------ the Trainer
def _trainer(tmp_path, tokenizer, student, callback, collator=None, **kw):
    from transformers import Trainer

    return Trainer(
        model=student,
        args=training_args(str(tmp_path), remove_unused_columns=False, **kw),
        train_dataset=examples(tokenizer, n=16),
        eval_dataset=examples(tokenizer, n=4, seed=1),
        data_collator=collator or HADCollator(tokenizer, seed=0),
        callbacks=[callback],
    )


def test_trainer_trains_with_had_and_logs_both_components(tmp_path, tokenizer):
    student = tiny_bert("BertForMaskedLM", vocab=VOCAB, hidden=32)
    teacher = tiny_bert("BertModel", vocab=VOCAB, hidden=48, layers=3, seed=1)  # features only, wider: projector
    cb = HADCallback(teacher, feature_weight=2.0)
    trainer = _trainer(
        tmp_path, tokenizer, student, cb, max_steps=4, logging_steps=2, save_strategy="steps", save_steps=4
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["had_mlm_loss"] > 0 and h["had_feature_loss"] > 0
        expected = h["had_mlm_loss"] + 2.0 * h["had_feature_loss"]
        assert h["loss"] == pytest.approx(expected, rel=0.05)  # the logged loss is the weighted sum
    assert len(cb.projectors) == 1 and cb.projectors.optimizer.state  # stepped with the student
    assert os.path.isfile(tmp_path / "checkpoint-4" / STATE_FILE)  # saved beside the checkpoint
    metrics = trainer.evaluate()
    assert metrics["eval_had_feature_loss"] > 0 and metrics["eval_had_mlm_loss"] > 0


def test_teacher_sees_full_or_masked_input(tokenizer):
    teacher = tiny_bert("BertModel", vocab=VOCAB, hidden=32, seed=1)
    batch = HADCollator(tokenizer, seed=0)(examples(tokenizer, n=2))
    batch.pop("had_visible")
    for mode, expected in (("full", unmasked_input_ids(batch["input_ids"], batch["labels"])), ("masked", None)):
        cb = HADCallback(teacher, teacher_input=mode)
        seen = {}
        forward = cb.teacher.forward_batch

        def spy(b, seen=seen, forward=forward, **kw):
            seen.update(b)
            return forward(b, **kw)

        cb.teacher.forward_batch = spy
        states = cb._teacher_states(batch, batch["labels"])
        assert len(states) == 3 and "labels" not in seen
        assert torch.equal(seen["input_ids"], batch["input_ids"] if expected is None else expected)


def test_gradient_accumulation_gives_the_same_step(tmp_path, tokenizer):
    """One optimizer step on 4 rows: batch 4 vs 2 micro-batches of 2 (SGD: the update is the gradient)."""
    from transformers import default_data_collator

    collate = HADCollator(tokenizer, seed=0)
    rows = [{k: v[0] for k, v in collate([ex]).items()} for ex in examples(tokenizer, n=4, lengths=(16,))]
    teacher = tiny_bert("BertModel", vocab=VOCAB, hidden=32, seed=1, **NO_DROPOUT)
    params = []
    for bs, ga in ((4, 1), (2, 2)):
        from transformers import Trainer

        student = tiny_bert("BertForMaskedLM", vocab=VOCAB, hidden=32, **NO_DROPOUT)
        args = training_args(
            str(tmp_path / f"ga{ga}"),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            remove_unused_columns=False,
        )
        cb = HADCallback(teacher, feature_weight=5.0)
        Trainer(
            model=student, args=args, train_dataset=rows, data_collator=default_data_collator, callbacks=[cb]
        ).train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


# ----------------------------------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path, tokenizer):
    from transformers import DataCollatorForLanguageModeling

    teacher = tiny_bert("BertModel", vocab=VOCAB, hidden=32, seed=1)
    with pytest.raises(ValueError, match="no LM head"):
        _trainer(tmp_path, tokenizer, tiny_bert("BertModel", vocab=VOCAB), HADCallback(teacher))
    with pytest.raises(ValueError, match="causal"):
        _trainer(tmp_path, tokenizer, tiny_llama(vocab=VOCAB), HADCallback(teacher))
    with pytest.raises(ValueError, match="another vocabulary"):
        other = tiny_bert("BertModel", vocab=VOCAB + 8, hidden=32)
        _trainer(tmp_path, tokenizer, tiny_bert("BertForMaskedLM", vocab=VOCAB), HADCallback(other))
    mlm = DataCollatorForLanguageModeling(tokenizer)  # labels, but no visible mask
    trainer = _trainer(tmp_path, tokenizer, tiny_bert("BertForMaskedLM", vocab=VOCAB), HADCallback(teacher), mlm)
    with pytest.raises(ValueError, match="no visible-token mask 'had_visible'.*HADCollator"):
        trainer.train()
    with pytest.raises(TypeError, match="teacher comes first"):
        HADCallback(HADConfig())
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            HADConfig(mask_ratio=bad)
    with pytest.raises(ValueError, match="layers"):
        HADConfig(layers="last")


def test_batch_and_tokenizer_checks(tokenizer):
    labels = torch.tensor([[-100, 7, -100]])
    with pytest.raises(ValueError, match="MLM 'labels'"):
        check_had_batch({"had_visible": torch.ones(1, 3, dtype=torch.bool)}, "had_visible")
    with pytest.raises(ValueError, match="marks masked tokens"):
        check_had_batch({"labels": labels, "had_visible": torch.ones(1, 3, dtype=torch.bool)}, "had_visible")
    _, visible = check_had_batch({"labels": labels, "had_visible": torch.tensor([[1, 0, 1]])}, "had_visible")
    assert visible.dtype == torch.bool
    student, teacher = tiny_bert("BertForMaskedLM", vocab=VOCAB), tiny_bert("BertModel", vocab=VOCAB)
    check_same_vocabulary(student, teacher, tokenizer, tokenizer)
    with pytest.raises(ValueError, match="teacher's tokenizer"):
        check_same_vocabulary(student, teacher, tokenizer, make_tokenizer(extra=["extra"]))
    no_mask = make_tokenizer(mask=False)
    with pytest.raises(ValueError, match="no mask token"):
        HADCollator(no_mask)


def test_config_parses_layers_and_overrides():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(HADConfig).parse_args_into_dataclasses(
        args=["--layers", "2=4,-1=-1", "--group_size", "6"]
    )
    assert cfg.layers == [(2, 4), (-1, -1)] and cfg.group_size == 6
    cb = HADCallback(tiny_bert("BertModel", vocab=VOCAB), config=cfg, feature_loss="mse")
    assert cb.config.feature_loss == "mse" and cb.config.layers == [(2, 4), (-1, -1)] and cfg.feature_loss == "cosine"
