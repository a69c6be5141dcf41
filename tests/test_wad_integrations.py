"""WAD wired into training: WADTask / WADDataset (timm loops), WADCallback (HF Trainer), WADConfig, teacher features."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import kd_plugins
from kd_plugins import WADCallback, WADConfig, WADDataset, WADTask, WADWeights, wad_weights, wad_weights_from_teacher
from tests.tiny import tiny_bert

torch.set_num_threads(1)

KNOWN, ALL, DIM = 3, 5, 16


def _clusters(per_labelled=4, per_unlabelled=6, seed=0):
    """Five separable clusters in DIM dims: classes 0-2 labelled, the unlabelled pool mixes all five."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(DIM, ALL, generator=g))[0].T * 3

    def sample(c, n):
        return centres[c] + 0.3 * torch.randn(n, DIM, generator=g)

    xl = torch.cat([sample(c, per_labelled) for c in range(KNOWN)])
    yl = torch.arange(KNOWN).repeat_interleave(per_labelled)
    xu = torch.cat([sample(c, per_unlabelled) for c in range(ALL)])
    true_u = torch.arange(ALL).repeat_interleave(per_unlabelled)
    return xl, yl, xu, true_u


class Student(nn.Module):
    def __init__(self, num_classes=KNOWN):
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def _wad(n, weights=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pmi = torch.randn(n, KNOWN, generator=g)
    w = torch.rand(n, generator=g) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return WADWeights(w, pmi.argmax(1), pmi)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------- middle layer
def test_weights_from_teacher_match_direct_call():
    xl, yl, xu, true_u = _clusters()
    teacher = nn.Linear(DIM, DIM)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(DIM))
        teacher.bias.zero_()
    labelled = DataLoader(TensorDataset(xl, yl), batch_size=5)
    unlabelled = DataLoader(TensorDataset(xu), batch_size=7)
    w = wad_weights_from_teacher(teacher, labelled, unlabelled, KNOWN)
    direct = wad_weights(xu, xl, yl, KNOWN)
    assert torch.allclose(w.weights, direct.weights, atol=1e-5)
    assert w.kept().eq(true_u < KNOWN).all()
    assert not teacher.weight.requires_grad  # frozen through Teacher


def test_wad_config_parses_and_validates():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(WADConfig).parse_args_into_dataclasses(args=["--target", "soft", "--wad_weight", "2"])
    assert (cfg.target, cfg.wad_weight) == ("soft", 2.0)
    with pytest.raises(ValueError, match="target must be one of"):
        WADConfig(target="mixed")
    with pytest.raises(ValueError, match="wad_weight must be a number >= 0"):
        WADConfig(wad_weight=-1)
    with pytest.raises(ValueError, match="logit loss"):
        WADConfig(loss="hidden_mse")
    with pytest.raises(TypeError, match="did you mean"):
        WADTask(Student(), _wad(4), wad_weigth=1.0)


# ---------------------------------------------------------------------------------------------- timm
def test_wad_dataset_marks_rows_and_forwards_transform():
    xl, yl, xu, _ = _clusters()
    lab, unl = TensorDataset(xl, yl), TensorDataset(xu)
    lab.transform = unl.transform = None
    ds = WADDataset(lab, unl, labelled_repeats=2)
    assert len(ds) == 2 * len(xl) + len(xu)
    assert ds[0][1].tolist() == [int(yl[0]), -1]
    assert ds[len(xl)][1].tolist() == [int(yl[0]), -1]  # the repeat
    assert ds[2 * len(xl) + 3][1].tolist() == [-100, 3]
    assert torch.equal(ds[-1][0], xu[-1])
    ds.transform = "t"
    assert lab.transform == unl.transform == "t"
    with pytest.raises(ValueError, match="same dataset"):
        WADDataset(lab, lab)


def test_timm_task_trains_a_few_steps():
    xl, yl, xu, true_u = _clusters()
    wad = wad_weights(xu, xl, yl, KNOWN)
    ds = WADDataset(TensorDataset(xl, yl), TensorDataset(xu), labelled_repeats=2)
    task = WADTask(Student(), wad, num_unlabelled=len(xu), target="soft", temperature=2.0)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    before = [p.detach().clone() for p in task.model.parameters()]
    g = torch.Generator().manual_seed(0)
    for x, target in DataLoader(ds, batch_size=8, shuffle=True, generator=g):
        out = task(x, target)
        assert out["loss"].isfinite() and out["output"].shape == (len(x), KNOWN)
        assert torch.allclose(out["loss"], out["task_loss"] + out["kd_loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    assert "wad_weights" not in task.state_dict()  # the weights never enter a checkpoint


def test_timm_zero_weight_instance_gives_no_gradient():
    wad = _wad(3, weights=[0.0, 1.0, 0.5])
    task = WADTask(Student(), wad)
    x = torch.randn(2, DIM)
    target = torch.tensor([[-100, 0], [-100, 1]])
    task(x, target)["loss"].backward()
    g_both = _grads(task.model)
    task.model.zero_grad()
    task(torch.stack([torch.randn(DIM) * 5, x[1]]), target)["loss"].backward()  # row 0 changed: nothing moves
    assert torch.allclose(_grads(task.model), g_both, atol=1e-6)
    task.model.zero_grad()
    task(x[:1], target[:1])["loss"].backward()
    assert _grads(task.model).abs().max() == 0
    # weight 0.5 halves the instance's gradient
    task.model.zero_grad()
    task(x[1:], torch.tensor([[-100, 2]]))["loss"].backward()
    half = _grads(task.model)
    task2 = WADTask(Student(), WADWeights(torch.ones(3), wad.pseudo_labels, wad.pmi))
    task2(x[1:], torch.tensor([[-100, 2]]))["loss"].backward()
    assert torch.allclose(half, 0.5 * _grads(task2.model), atol=1e-6)


def test_timm_labelled_rows_use_the_criterion():
    task = WADTask(Student(), _wad(3), wad_weight=0.0)
    x, y = torch.randn(4, DIM), torch.tensor([0, 1, 2, 0])
    out = task(x, torch.stack([y, torch.full_like(y, -1)], 1))
    assert torch.allclose(out["loss"], F.cross_entropy(task.model(x), y))
    assert torch.allclose(task(x, y)["loss"], out["loss"])  # plain class targets: all labelled


def test_timm_bad_inputs_name_the_fix():
    wad = _wad(4)
    with pytest.raises(ValueError, match="hold 4 rows but the unlabelled set has 5"):
        WADTask(Student(), wad, num_unlabelled=5)
    with pytest.raises(ValueError, match="student head has 4 outputs"):
        WADTask(Student(num_classes=4), wad)
    with pytest.raises(TypeError, match="WADWeights come before the config"):
        WADTask(Student(), WADConfig())
    with pytest.raises(TypeError, match="expected the WADWeights"):
        WADTask(Student(), (wad.weights, wad.pseudo_labels, wad.pmi))
    with pytest.raises(ValueError, match="fields disagree"):
        WADTask(Student(), WADWeights(wad.weights[:3], wad.pseudo_labels, wad.pmi))
    task = WADTask(Student(), wad)
    x = torch.randn(2, DIM)
    with pytest.raises(ValueError, match="labelled example passed as unlabelled"):
        task(x, torch.tensor([[1, 0], [-100, 1]]))
    with pytest.raises(ValueError, match="neither a class label nor a WAD index"):
        task(x, torch.tensor([[-100, -1], [-100, 1]]))
    with pytest.raises(ValueError, match=r"outside the 4 rows .* number the unlabelled examples 0..3"):
        task(x, torch.tensor([[-100, 4], [-100, 1]]))
    with pytest.raises(ValueError, match="outside the 3 known classes"):
        task(x, torch.tensor([[5, -1], [-100, 1]]))
    with pytest.raises(ValueError, match="Mixup/CutMix"):
        task(x, torch.rand(2, KNOWN))


# ---------------------------------------------------------------------------------------------- HF Trainer
def _hf_data(n_lab=6, n_unl=8, seq=8, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    n = n_lab + n_unl
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(4, 96, (n, seq), generator=g).tolist(),
            "attention_mask": [[1] * seq] * n,
            "labels": [i % KNOWN for i in range(n_lab)] + [-100] * n_unl,
            "wad_index": [-1] * n_lab + list(range(n_unl)),
        }
    )


def _trainer(tmp_out, model, data, cb, max_steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tmp_out,
        per_device_train_batch_size=4,
        max_steps=max_steps,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=1e-3,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])


def test_hf_callback_trains_a_few_steps(tmp_out):
    model = tiny_bert("BertForSequenceClassification", num_labels=KNOWN)
    cb = WADCallback(_wad(8), target="soft")
    trainer = _trainer(tmp_out, model, _hf_data(), cb)
    trainer.train()  # remove_unused_columns=True (the default): the callback keeps wad_index
    logs = [h for h in trainer.state.log_history if "wad_loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(0 <= h["wad_weight_mean"] <= 1 for h in logs)


def _hf_loss(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, batch).backward()
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def test_hf_zero_weight_instance_gives_no_gradient(tmp_out):
    model = tiny_bert(
        "BertForSequenceClassification", num_labels=KNOWN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    trainer = _trainer(tmp_out, model, _hf_data(), WADCallback(_wad(2, weights=[0.0, 1.0])))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 96, (2, 8), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([-100, -100]),
        "wad_index": torch.tensor([0, 1]),
    }
    g_both = _hf_loss(trainer, batch)
    batch["input_ids"] = torch.stack([torch.randint(4, 96, (8,), generator=g), ids[1]])
    assert torch.allclose(_hf_loss(trainer, batch), g_both, atol=1e-6)
    only_zero = {k: v[:1] for k, v in batch.items()}
    assert _hf_loss(trainer, only_zero).abs().max() == 0


def test_hf_bad_inputs_name_the_fix(tmp_out):
    model = tiny_bert("BertForSequenceClassification", num_labels=KNOWN)
    with pytest.raises(TypeError, match="WADWeights come first"):
        WADCallback(WADConfig())
    with pytest.raises(ValueError, match="student head has 3 outputs"):
        _trainer(
            tmp_out, model, _hf_data(), WADCallback(WADWeights(torch.ones(8), torch.zeros(8).long(), torch.zeros(8, 4)))
        )
    with pytest.raises(ValueError, match="hold 5 rows but the train dataset's unlabelled examples have 8"):
        _trainer(tmp_out, model, _hf_data(), WADCallback(_wad(5))).train()
    model = tiny_bert("BertForSequenceClassification", num_labels=KNOWN)
    with pytest.raises(ValueError, match="no 'wad_index' column"):
        _trainer(tmp_out, model, _hf_data().remove_columns("wad_index"), WADCallback(_wad(8))).train()
    trainer = _trainer(tmp_out, model, _hf_data(), WADCallback(_wad(8)))
    ids = torch.randint(4, 96, (2, 8))
    batch = {"input_ids": ids, "labels": torch.tensor([1, -100]), "wad_index": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="labelled example passed as unlabelled"):
        _hf_loss(trainer, batch)
    with pytest.raises(ValueError, match="missing indices"):
        _hf_loss(trainer, {"input_ids": ids, "labels": torch.tensor([1, 2])})


def test_top_level_exports():
    for name in ("WADCallback", "WADTask", "WADDataset", "WADConfig", "wad_weights_from_teacher"):
        assert getattr(kd_plugins, name) is not None
