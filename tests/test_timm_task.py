"""KDTask: the TrainingTask contract, loss variants, task state, teacher handling, bad inputs, entry point."""

import os

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.task import LogitDistillationTask

from kd_plugins.distill.config import DistillationConfig
from kd_plugins.integrations.timm import KDTask

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 3, 7, 9])


def cnn(seed=1, num_classes=10):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def vit(seed=2, num_classes=10, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=num_classes)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


def make(student=None, teacher=None, **kw):
    kw.setdefault("verbose", False)
    return KDTask(student_model=student if student is not None else vit(), teacher_model=teacher or cnn().eval(), **kw)


def step(task):
    res = task(X, Y)
    assert {"loss", "output", "task_loss", "kd_loss"} <= set(res)
    assert torch.isfinite(res["loss"])
    res["loss"].backward()
    return res


@pytest.mark.parametrize("terms", [{"kl": 1.0}, {"dkd": 1.0}, {"jsd": 1.0, "tvd": 0.5}, {"reverse_kl": 1.0}])
def test_logit_variants(terms):
    task = make(loss_terms=terms, temperature=2.0)
    res = step(task)
    assert res["output"].shape == (4, 10)
    assert all(f"kd_{n}" in res for n in terms)
    student = task.get_eval_model()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())


def test_kl_matches_timm_logit_distillation_task():
    student, teacher = vit(), cnn().eval()
    ours = make(student, teacher, loss_terms={"kl": 1.0}, temperature=4.0, criterion=nn.CrossEntropyLoss())
    ref = LogitDistillationTask(
        student_model=student, teacher_model=teacher, criterion=nn.CrossEntropyLoss(), temperature=4.0, verbose=False
    )
    a, b = ours(X, Y), ref(X, Y)
    torch.testing.assert_close(a["kd_loss"], b["kd_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)


def test_weighting_modes():
    assert (make(distill_loss_weight=2.0).task_loss_weight, make(distill_loss_weight=2.0).distill_loss_weight) == (
        1.0,
        2.0,
    )
    t = make(task_loss_weight=0.3)
    assert (t.task_loss_weight, t.distill_loss_weight) == (0.3, pytest.approx(0.7))
    cfg = DistillationConfig(
        loss_terms="kl:1.0,hidden_mse:0.5", feature_pairs="1=2", hard_label_weight=0.5, temperature=2.0
    )
    t = make(config=cfg, input_size=32)
    assert t.task_loss_weight == 0.5 and t.hidden_terms == {"hidden_mse": 0.5}
    step(t)


def test_teacher_excluded_from_optimizer_and_eval_mode():
    task = make(loss_terms={"kl": 1.0, "hidden_mse": 1.0}, feature_pairs={1: 2}, input_size=32)
    opt = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in task.teacher.parameters()}
    projector_ids = {id(p) for n, p in task.get_trainable_module().named_parameters() if n.startswith("projectors")}
    assert projector_ids and projector_ids <= opt_ids
    task.train()
    assert task.get_trainable_module().training and not task.teacher.training
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_feature_kd_projector_is_task_state_and_student_reloads(tmp_path):
    task = make(loss_terms={"kl": 1.0, "hidden_mse": 1.0}, feature_pairs={0: 2, -1: -1}, input_size=32)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.5)
    step(task)
    opt.step()
    ckpt = task.get_checkpoint_state()
    sd, ts = ckpt["state_dict"], ckpt["task_state"]["kd_modules"]
    assert not any(k.startswith(("projectors", "student.")) for k in sd)
    assert any(k.startswith("projectors.") for k in ts) and not any(k.startswith("student.") for k in ts)
    path = str(tmp_path / "ckpt.pth")
    torch.save(ckpt, path)
    loaded = torch.load(path, weights_only=True)
    plain = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=2,
        num_classes=10,
    )
    plain.load_state_dict(loaded["state_dict"])  # strict: a plain timm model
    fresh = make(vit(seed=5), loss_terms={"kl": 1.0, "hidden_mse": 1.0}, feature_pairs={0: 2, -1: -1}, input_size=32)
    fresh.load_checkpoint_state(loaded["state_dict"], loaded["task_state"])
    task.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(X, Y)["loss"], task(X, Y)["loss"])
    with pytest.raises(RuntimeError, match="state mismatch"):
        make(loss_terms={"kl": 1.0}).load_task_state(loaded["task_state"])


def test_ofa_heterogeneous_both_directions():
    task = make(loss_terms={"ofa": 1.0}, loss_kwargs={"ofa": {"eps": 1.5}}, temperature=4.0, input_size=32)
    tm = task.get_trainable_module()
    assert tm.branch_specs and all(type(b).__name__ == "TokenExitBranch" for b in tm.branches)
    assert task.logit_losses["ofa"].temperature == 1.0  # OFA keeps T=1
    res = step(task)
    assert "kd_ofa_branches" in res
    assert all(p.grad is not None for p in tm.branches.parameters())
    # reverse: ViT teacher, CNN student -> conv branches at the last four stages
    rev = make(cnn(3), vit().eval(), loss_terms={"ofa": 1.0, "kl": 1.0}, input_size=32)
    rtm = rev.get_trainable_module()
    assert rtm.branch_specs == [1, 2, 3, 4] and type(rtm.branches[0]).__name__ == "ConvExitBranch"
    step(rev)
    assert not any(k.startswith("branches") for k in rev.get_checkpoint_state()["state_dict"])
    assert any(k.startswith("branches") for k in rev.get_task_state()["kd_modules"])


def test_transkd_csf_and_patch_embedding_alignment():
    teacher = vit(seed=7, embed_dim=64, depth=4).eval()
    task = make(
        vit(),
        teacher,
        loss_terms={"kl": 1.0, "hidden_mse": 1.0},
        feature_pairs={0: 1, 1: 3},
        feature_align="csf",
        patch_embed_weight=1.0,
        input_size=32,
    )
    tm = task.get_trainable_module()
    assert tm.csf is not None and tm.pe_names == ["patch_embed"]
    res = step(task)
    assert res["kd_patch_embed"] > 0
    assert all(p.grad is not None for p in tm.csf.parameters())


def test_hook_fallback_module_names():
    task = make(loss_terms={"hidden_cosine": 1.0}, feature_pairs={"blocks.1": "layer3"}, input_size=32)
    step(task)


def test_teacher_input_renormalisation_and_resize():
    student, teacher = vit(), cnn().eval()  # student mean/std 0.5, teacher ImageNet mean/std
    task = make(student, teacher, loss_terms={"kl": 1.0}, teacher_input_size=48)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    task(X, Y)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    expected = torch.nn.functional.interpolate(
        (X * 0.5 + 0.5 - mean) / std, size=(48, 48), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(seen["x"], expected)
    same = make(vit(), vit(seed=9).eval(), loss_terms={"kl": 1.0})
    torch.testing.assert_close(same.teacher_input(X), X)  # identical normalisation: untouched
    custom = make(
        student,
        teacher,
        loss_terms={"kl": 1.0},
        student_mean=(0.0, 0.0, 0.0),
        student_std=(1.0, 1.0, 1.0),
        teacher_mean=(0.0, 0.0, 0.0),
        teacher_std=(2.0, 2.0, 2.0),
    )
    torch.testing.assert_close(custom.teacher_input(X), X / 2)


def test_soft_targets_and_ema_checkpoint_state():
    task = make(loss_terms={"dkd": 1.0}, criterion=lambda o, t: -(t * o.log_softmax(-1)).sum(-1).mean())
    soft = torch.nn.functional.one_hot(Y, 10).float() * 0.9 + 0.01
    step_res = task(X, soft)
    assert torch.isfinite(step_res["loss"])
    task.setup_ema(decay=0.5)
    task.update_ema()
    state = task.get_checkpoint_state(ema=True)
    assert "state_dict_ema" in state and "cls_token" in state["state_dict_ema"]


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Class-count mismatch.*1000 classes|Class-count mismatch"):
        make(teacher=cnn(num_classes=5), loss_terms={"kl": 1.0})
    with pytest.raises(ValueError, match="Unknown timm model name 'resnet10x'.*resnet10t"):
        make(teacher="resnet10x", loss_terms={"kl": 1.0}, teacher_checkpoint="unused.pth")
    with pytest.raises(ValueError, match="student feature index 7 is out of range.*2 feature levels"):
        make(loss_terms={"hidden_mse": 1.0}, feature_pairs={7: 1})
    with pytest.raises(ValueError, match="teacher feature index -9 is out of range"):
        make(loss_terms={"hidden_mse": 1.0}, feature_pairs={0: -9})
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        make(loss_terms={"hidden_mse": 1.0}, feature_pairs={"blocks.0": "layer9"})
    with pytest.raises(KeyError, match="Unknown loss"):
        make(loss_terms={"kll": 1.0})
    with pytest.raises(ValueError, match="needs teacher_checkpoint"):
        make(teacher="resnet10t", loss_terms={"kl": 1.0})
    wrong = str(tmp_path / "wrong.pth")
    torch.save(timm.create_model("resnet14t", num_classes=10).state_dict(), wrong)
    with pytest.raises(ValueError, match="does not match the architecture resnet10t.*(missing|shape)"):
        make(teacher="resnet10t", loss_terms={"kl": 1.0}, teacher_checkpoint=wrong)
    heads = str(tmp_path / "heads.pth")
    torch.save(cnn(num_classes=5).state_dict(), heads)
    with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(5, 512\) vs model \(10, 512\)"):
        make(teacher="resnet10t", loss_terms={"kl": 1.0}, teacher_checkpoint=heads)
    ok = str(tmp_path / "ok.pth")
    torch.save({"state_dict": cnn().state_dict()}, ok)  # timm training-checkpoint layout
    step(make(teacher="resnet10t", loss_terms={"kl": 1.0}, teacher_checkpoint=ok))


# ---------------------------------------------------------------- entry point


def _image_folder(root, n_train=4, n_val=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_val)):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.png")
                )


def test_train_entry_point_two_steps(tmp_path, caplog):
    from kd_plugins.integrations.timm.train import main

    data = str(tmp_path / "data")
    _image_folder(data)
    teacher = str(tmp_path / "teacher.pth")
    torch.save(cnn(num_classes=2).state_dict(), teacher)
    out = main(
        [
            data,
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",  # as in timm's train.py: the data pipeline's size ...
            "32",
            "--model-kwargs",  # ... and the model's
            "img_size=32",
            "patch_size=8",
            "depth=2",
            "embed_dim=48",
            "num_heads=2",
            "--num-classes",
            "2",
            "--kd-model-name",
            "resnet10t",
            "--kd-teacher-checkpoint",
            teacher,
            "--kd-loss",
            "kl:1.0,hidden_mse:0.5",
            "--kd-feature-pairs",
            "1=2",
            "--kd-temperature",
            "2",
            "--distill-loss-weight",
            "1.0",
            "-b",
            "4",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "-j",
            "0",
            "--opt",
            "adamw",
            "--lr",
            "1e-3",
            "--output",
            str(tmp_path / "out"),
            "--experiment",
            "smoke",
            "--log-interval",
            "1",
        ]
    )
    assert out["best_metric"] is not None
    ckpt_path = os.path.join(out["output_dir"], "last.pth.tar")
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["epoch"] == 0 and "task_state" in ckpt
    assert any(k.startswith("projectors") for k in ckpt["task_state"]["kd_modules"])
    student = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=2,
        num_classes=2,
    )
    student.load_state_dict(ckpt["state_dict"])
    assert ckpt["optimizer"]["state"]  # two optimizer steps happened


def test_train_entry_point_multi_exit_with_teacher_and_export(tmp_path):
    """``--exit-layers``: MultiExitTask through the entry point; the checkpoint reloads after ``add_exits`` and
    every exported truncation equals its exit."""
    import argparse
    import json

    from safetensors.torch import load_file

    from kd_plugins.integrations.timm.train import main
    from kd_plugins.multiexit import add_exits, exit_outputs

    data = str(tmp_path / "data")
    _image_folder(data)
    teacher = str(tmp_path / "teacher.pth")
    torch.save(cnn(num_classes=2).state_dict(), teacher)
    out = main(
        [
            data,
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--model-kwargs",
            '{"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
            "--num-classes",
            "2",
            "--exit-layers",
            "1,3",
            "--exit-weights",
            "0.5,1",
            "--exit-export",
            "--kd-model-name",
            "resnet10t",
            "--kd-teacher-checkpoint",
            teacher,
            "--distill-loss-weight",
            "0.5",
            "-b",
            "4",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "-j",
            "0",
            "--opt",
            "adamw",
            "--lr",
            "1e-3",
            "--output",
            str(tmp_path / "out"),
            "--experiment",
            "exits",
            "--log-interval",
            "1",
        ]
    )
    assert out["best_metric"] is not None and sorted(out["exit_exports"]) == [1, 3]
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(os.path.join(out["output_dir"], "last.pth.tar"), weights_only=True)
    assert ckpt["optimizer"]["state"] and not any(k.startswith(("module.", "fn.")) for k in ckpt["state_dict"])
    model = vit(num_classes=2, depth=3)
    add_exits(model, layers=[1, 3], head="separate")
    model.load_state_dict(ckpt["state_dict"])  # the exit heads are part of the checkpoint (architecture change)
    model.eval()
    with torch.no_grad():
        exits = exit_outputs(model, X)
        for k in (1, 3):
            meta = json.load(open(os.path.join(out["output_dir"], "exits", f"exit{k}.json")))
            assert meta["model"] == "vit_tiny_patch16_224" and meta["create_kwargs"]["depth"] == k
            small = timm.create_model(meta["model"], pretrained=False, **meta["create_kwargs"]).eval()
            small.load_state_dict(load_file(out["exit_exports"][k]))
            torch.testing.assert_close(small(X), exits[k], rtol=1e-4, atol=1e-5)


def test_model_task_keeps_teacher_in_eval_mode():
    """ACMTask / MultiExitTask hold the teacher outside their modules: ``task.train()`` must not un-freeze it."""
    from kd_plugins.integrations.timm import MultiExitTask
    from kd_plugins.multiexit import add_exits

    teacher = cnn()
    model = vit(depth=2)
    add_exits(model, layers=[1, 2])
    task = MultiExitTask(model, teacher=teacher)
    teacher.train()
    task.train()
    assert model.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in task.get_trainable_module().parameters()}.isdisjoint(id(p) for p in teacher.parameters())


def test_config_with_keyword_overrides():
    """``config=`` plus keyword arguments: the keywords replace the config's fields (the precedence rule)."""
    cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=0.5)
    task = make(config=cfg, temperature=4.0, loss_terms={"kl": 1.0, "dkd": 0.5})
    assert task.config.temperature == 4.0 and task.logit_losses["kl"].temperature == 4.0
    assert task.logit_terms == {"kl": 1.0, "dkd": 0.5} and task.task_loss_weight == 0.5
    assert cfg.temperature == 2.0 and cfg.loss_terms == {"kl": 1.0}  # the caller's config is untouched
    with pytest.raises(TypeError, match="config must be a DistillationConfig"):
        make(config={"loss_terms": "kl"})
