"""Every bad input raises an error that names the problem and the fix (issue 2, item 8)."""

import pytest
import torch
from test_hf_integration import _word_tokenizer
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig


def _train(teacher, student, cfg, out, ds=None, **kw):
    trainer = Trainer(
        model=student,
        args=training_args(out, max_steps=1, **kw),
        train_dataset=ds or TokenDataset(),
        callbacks=[DistillationCallback(teacher, cfg)],
    )
    trainer.train()
    return trainer


def test_different_tokenizers(tmp_out):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok_s = _word_tokenizer()
    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"v{i}" for i in range(93)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_t = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    cb = DistillationCallback(tiny_llama(seed=1), DistillationConfig(), teacher_tokenizer=tok_t)
    trainer = Trainer(
        model=tiny_llama(seed=2),
        args=training_args(tmp_out, max_steps=1),
        train_dataset=TokenDataset(),
        processing_class=tok_s,
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match="tokenizers differ.*same tokenizer"):
        trainer.train()


def test_padded_vocab_sizes_need_vocab_alignment(tmp_out):
    with pytest.raises(ValueError, match="vocab_size 96 differs from teacher vocab_size 100.*vocab_alignment"):
        _train(tiny_llama(seed=1, vocab=100), tiny_llama(seed=2), DistillationConfig(), tmp_out)
    # truncate: compare the shared first 96 entries
    tr = _train(
        tiny_llama(seed=1, vocab=100), tiny_llama(seed=2), DistillationConfig(vocab_alignment="truncate"), tmp_out
    )
    assert [h["kd_kl"] for h in tr.state.log_history if "kd_kl" in h]
    # pad: a larger student gets -inf teacher columns, i.e. is taught to put no mass there
    tr = _train(tiny_llama(seed=1), tiny_llama(seed=2, vocab=100), DistillationConfig(vocab_alignment="pad"), tmp_out)
    assert all(torch.isfinite(torch.tensor(h["kd_kl"])) for h in tr.state.log_history if "kd_kl" in h)


def test_hard_label_weight_without_labels(tmp_out):
    with pytest.raises(ValueError, match="hard_label_weight > 0 but the batch has no 'labels'.*hard_label_weight=0"):
        _train(
            tiny_llama(seed=1),
            tiny_llama(seed=2),
            DistillationConfig(hard_label_weight=0.5),
            tmp_out,
            ds=TokenDataset(labels=None),
        )


def test_unknown_feature_module_lists_close_matches(tmp_out):
    cfg = DistillationConfig(feature_pairs={"model.layer.1": "model.layers.1"})
    with pytest.raises(ValueError, match="no module named 'model.layer.1'.*Close matches: model.layers.1"):
        _train(tiny_llama(seed=1), tiny_llama(seed=2), cfg, tmp_out)


def test_width_mismatch_without_projector(tmp_out):
    cfg = DistillationConfig(feature_pairs={"model.layers.1": "model.layers.1"}, feature_projector=False)
    with pytest.raises(ValueError, match="widths differ.*feature_projector=False"):
        _train(tiny_llama(seed=1, hidden=48), tiny_llama(seed=2, hidden=32), cfg, tmp_out)


def test_teacher_on_another_device(tmp_out):
    teacher = tiny_llama(seed=1).to("meta")
    with pytest.raises(ValueError, match="teacher is on meta but the student trains on cpu.*teacher_device='student'"):
        _train(teacher, tiny_llama(seed=2), DistillationConfig(), tmp_out)


def test_non_finite_loss_names_step_and_term(tmp_out):
    teacher = tiny_llama(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 0: term 'kl'"):
        _train(teacher, tiny_llama(seed=2), DistillationConfig(), tmp_out)


def test_teacher_is_student_or_shares_weights(tmp_out):
    student = tiny_llama(seed=2)
    with pytest.raises(ValueError, match="teacher is the student"):
        _train(student, student, DistillationConfig(), tmp_out)


def test_logit_loss_on_bare_encoder_and_label_mismatch(tmp_out):
    with pytest.raises(ValueError, match="bare encoder.*embedding losses"):
        _train(
            tiny_bert("BertModel", seed=1),
            tiny_bert("BertModel", seed=2),
            DistillationConfig(loss_terms="kl"),  # named explicitly (unset terms are chosen by the student)
            tmp_out,
            ds=TokenDataset(labels=None),
            remove_unused_columns=False,
        )
    with pytest.raises(ValueError, match="Student has 3 labels but the teacher has 5"):
        _train(
            tiny_bert("BertForSequenceClassification", seed=1, num_labels=5),
            tiny_bert("BertForSequenceClassification", seed=2, num_labels=3),
            DistillationConfig(),
            tmp_out,
            ds=TokenDataset(labels="seq"),
        )


def test_config_errors():
    with pytest.raises(ValueError, match="vocab_alignment"):
        DistillationConfig(vocab_alignment="shrink")
    with pytest.raises(ValueError, match="loss_kwargs names 'jsd'"):
        DistillationConfig(loss_terms="kl", loss_kwargs={"jsd": {"beta": 0.1}})
    with pytest.raises(ValueError, match="Nothing to optimise"):
        DistillationConfig(loss_terms="")
    with pytest.raises(ValueError, match="Ranking losses|attention_layer_map"):
        DistillationConfig(loss_terms="attention_kl")
