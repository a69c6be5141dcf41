"""Weight inheritance: shallower students built from the teacher's own layers."""

import pytest
import torch
import transformers
from tiny import tiny_bert, tiny_llama

from kd_plugins import inherit_student
from kd_plugins.distill import find_layer_container, select_layer_indices


def tiny_mpnet(seed=0, layers=4):
    torch.manual_seed(seed)
    cfg = transformers.MPNetConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=66,
    )
    return transformers.MPNetModel(cfg)


def test_layer_selection_strategies():
    assert select_layer_indices(6, 3, "uniform") == [0, 2, 4]
    assert select_layer_indices(30, 10, "uniform") == list(range(0, 30, 3))
    assert select_layer_indices(6, 3, "first") == [0, 1, 2]
    assert select_layer_indices(6, 2, "last") == [4, 5]
    assert select_layer_indices(6, None, [0, 3, 5]) == [0, 3, 5]
    with pytest.raises(ValueError, match="out of range"):
        select_layer_indices(6, None, [0, 6])
    with pytest.raises(ValueError, match="strictly increasing"):
        select_layer_indices(6, None, [2, 1])
    with pytest.raises(ValueError, match=r"num_layers must lie in \[1, 6\]"):
        select_layer_indices(6, 7)


@pytest.mark.parametrize("family", ["bert", "bert_cls", "mpnet", "llama"])
def test_inherited_student_matches_teacher_layers_and_round_trips(family, tmp_path):
    teacher = {
        "bert": lambda: tiny_bert("BertModel", layers=4),
        "bert_cls": lambda: tiny_bert("BertForSequenceClassification", layers=4),
        "mpnet": tiny_mpnet,
        "llama": lambda: tiny_llama(layers=4),
    }[family]()
    teacher.eval()
    student = inherit_student(teacher, num_layers=2, strategy=[1, 3]).eval()
    _, t_layers = find_layer_container(teacher)
    _, s_layers = find_layer_container(student)
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for si, ti in enumerate([1, 3]):
        for (k, a), b in zip(s_layers[si].state_dict().items(), t_layers[ti].state_dict().values()):
            assert torch.equal(a, b), k
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    x = torch.randint(3, 90, (2, 9))
    with torch.no_grad():
        a, b = student(x), reloaded(x)
    key = "logits" if "logits" in a else "last_hidden_state"
    torch.testing.assert_close(a[key], b[key])
    # all layers selected: identical to the teacher
    full = inherit_student(teacher, num_layers=4, strategy="first").eval()
    with torch.no_grad():
        torch.testing.assert_close(full(x)[key], teacher(x)[key])


def test_llama_student_generates_with_kv_cache():
    teacher = tiny_llama(layers=4).eval()
    student = inherit_student(teacher, num_layers=2).eval()
    assert [l.self_attn.layer_idx for l in student.model.layers] == [0, 1]
    out = student.generate(torch.randint(3, 90, (1, 5)), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_unsupported_family_names_what_was_tried():
    with pytest.raises(ValueError, match="Could not locate the transformer layers of Linear; tried: encoder.layer"):
        inherit_student(torch.nn.Linear(3, 3), 1)


def test_student_of_a_frozen_teacher_is_trainable():
    # A DistillationCallback freezes its teacher; a second student inherited from it must still train.
    teacher = tiny_bert().requires_grad_(False)
    student = inherit_student(teacher, num_layers=1)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
