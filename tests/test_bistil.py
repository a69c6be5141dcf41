"""BiStil's phases as DistillationConfigs (kd_plugins.bistil_config): layer maps, the phase-2 objective computed by
hand, and phase 2 under a lottery-ticket sparse fine-tuning in one Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, SparseFTCallback, bistil_config, inherit_student, regular_layer_map
from kd_plugins.sparseft import select_mask

torch.set_num_threads(1)
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "attn_implementation": "eager"}


def test_regular_layer_map_keeps_the_last_layer_of_each_group():
    assert regular_layer_map(12) == [1, 3, 5, 7, 9, 11]  # BiStil's 12 -> 6 fixture
    assert regular_layer_map(12, factor=3) == [2, 5, 8, 11]
    assert regular_layer_map(4, factor=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="divide"):
        regular_layer_map(12, factor=5)


def test_phase_configs_pair_embeddings_and_layers_on_each_models_names(tmp_path):
    from transformers import BertForSequenceClassification

    teacher = tiny_bert("BertModel", layers=4, **NO_DROPOUT)
    student = inherit_student(teacher, strategy=regular_layer_map(4))
    one = bistil_config(student, teacher, 1)
    assert one.feature_pairs == {
        "embeddings": "embeddings",
        "encoder.layer.0": "encoder.layer.1",
        "encoder.layer.1": "encoder.layer.3",
    }
    assert one.attention_layer_map == {0: 1, 1: 3}
    assert one.loss_terms == {"hidden_mse": 1.0, "attention_mse": 1.0} and one.hard_label_weight == 0
    # a classification student (prefix "bert.") against a bare teacher encoder: names resolved per model
    cls_student = tiny_bert("BertForSequenceClassification", layers=2, **NO_DROPOUT)
    two = bistil_config(cls_student, teacher, 2, teacher_layers=[1, 3])
    assert two.feature_pairs == {
        "bert.embeddings": "embeddings",
        "bert.encoder.layer.0": "encoder.layer.1",
        "bert.encoder.layer.1": "encoder.layer.3",
    }
    assert two.loss_terms == {"soft_ce": 1.0, "hidden_mse": 1.0, "attention_mse": 1.0}
    assert two.loss_kwargs == {"soft_ce": {"t2_scale": False}} and two.temperature == 2.0
    assert "embeddings" not in str(bistil_config(student, teacher, 1, include_embeddings=False).feature_pairs)
    # phase 1's student saved and reloaded with a task head still knows its teacher layers (phase 2's default)
    student.save_pretrained(tmp_path / "phase1")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "phase1", num_labels=3)
    assert bistil_config(reloaded, teacher, 2).attention_layer_map == {0: 1, 1: 3}
    # a zero weight drops the term and its pairs (DistillationConfig would add a default hidden term for bare pairs)
    no_hidden = bistil_config(cls_student, teacher, 2, teacher_layers=[1, 3], hidden_weight=0.0)
    assert no_hidden.loss_terms == {"soft_ce": 1.0, "attention_mse": 1.0} and not no_hidden.feature_pairs
    no_attn = bistil_config(student, teacher, 1, attention_weight=0.0)
    assert no_attn.loss_terms == {"hidden_mse": 1.0} and not no_attn.attention_layer_map
    llama = tiny_llama(layers=4)
    pairs = bistil_config(inherit_student(llama, strategy=[1, 3]), llama, 1).feature_pairs
    assert pairs == {
        "model.embed_tokens": "model.embed_tokens",
        "model.layers.0": "model.layers.1",
        "model.layers.1": "model.layers.3",
    }


def test_bistil_config_errors_name_the_fix():
    teacher = tiny_bert("BertModel", layers=4)
    plain = tiny_bert("BertModel", layers=2)
    with pytest.raises(ValueError, match="inherit_student"):
        bistil_config(plain, teacher, 1)
    with pytest.raises(ValueError, match="one teacher layer per student layer"):
        bistil_config(plain, teacher, 1, teacher_layers=[1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        bistil_config(plain, teacher, 1, teacher_layers=[1, 4])
    with pytest.raises(ValueError, match="phases 1"):
        bistil_config(plain, teacher, 3, teacher_layers=[1, 3])


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


@torch.no_grad()
def _phase2_by_hand(student, teacher, batch, pairs, temperature=2.0):
    """BiStil's phase-2 loss written out: soft CE at T (no T^2) + mean hidden MSE + mean attention MSE."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    soft_ce = -(F.softmax(t.logits / temperature, -1) * F.log_softmax(s.logits / temperature, -1)).sum(-1).mean()
    m = batch["attention_mask"].float()
    # hidden_states[0] is the embeddings' output, [i + 1] layer i's
    hidden = torch.stack(
        [
            _masked_mean((s.hidden_states[si] - t.hidden_states[ti]).pow(2).mean(-1), m)
            for si, ti in [(0, 0)] + [(i + 1, j + 1) for i, j in pairs.items()]
        ]
    ).mean()
    keep = (m[:, :, None] * m[:, None, :])[:, None]
    attention = torch.stack(
        [
            ((s.attentions[si] - t.attentions[ti]).pow(2) * keep).sum() / (keep.sum() * s.attentions[si].shape[1])
            for si, ti in pairs.items()
        ]
    ).mean()
    return soft_ce + hidden + attention


def test_phase2_objective_matches_the_hand_computed_loss_and_trains_only_the_sparse_entries(tmp_path):
    teacher = tiny_bert("BertForSequenceClassification", layers=4, seed=1, **NO_DROPOUT).eval()
    student = inherit_student(teacher, strategy=regular_layer_map(4))
    with torch.no_grad():  # a student that differs from the teacher's layers, and a fresh head
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    data = TokenDataset(n=8, labels="seq", pad_last=3)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask")}
    config = bistil_config(student, teacher, 2)
    expected = _phase2_by_hand(student, teacher, batch, config.attention_layer_map)

    base = copy.deepcopy(student)
    mask = select_mask(student, None, density=0.1, selection="random", dense_targets="classifier")
    sparse = SparseFTCallback(mask)
    args = training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=8, weight_decay=0.1)
    trainer = Trainer(
        model=student, args=args, train_dataset=data, callbacks=[DistillationCallback(teacher, config), sparse]
    )
    trainer.train()
    first = [h for h in trainer.state.log_history if "loss" in h][0]
    assert first["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert {"kd_soft_ce", "kd_hidden_mse", "kd_attention_mse"} <= set(first)
    for (n, p), q in zip(student.named_parameters(), base.parameters()):
        frozen = ~mask.masks[n] if n in mask.masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p[frozen], q[frozen]), n
    assert sparse.diff.num_entries == mask.num_trainable
