"""ProC-KD: prototype losses, prototype memory, augmentation, ProCKDTask with mismatched label spaces, bad input."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_plugins.integrations.timm import ProCKDTask
from kd_plugins.losses import get_loss, get_loss_function, prototype_kl, prototype_mse
from kd_plugins.losses.prototype import prototype_reconstruction
from kd_plugins.vision.prockd import ProCKDConfig, PrototypeAugmentation, PrototypeMemory, feature_feeds_head

X = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 4])  # the student's 5-class label space


def resnet(num_classes, seed):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def make(student=None, teacher=None, **kw):
    kw.setdefault("verbose", False)
    kw.setdefault("input_size", 64)
    kw.setdefault("num_prototypes", 8)
    student = student if student is not None else resnet(5, 1)
    return ProCKDTask(student_model=student, teacher_model=teacher or resnet(10, 2).eval(), **kw)


def rows(n=12, c=6, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- losses
def test_prototype_kl_zero_at_identity_and_scale_free():
    t, p = rows(), rows(4, seed=1)
    assert prototype_kl(t, t, prototypes=p).abs() < 1e-6
    s = rows(seed=2)
    value = prototype_kl(s, t, prototypes=p)
    assert value > 0
    torch.testing.assert_close(prototype_kl(3.0 * s, 0.5 * t, prototypes=p), value)


def test_prototype_mse_zero_on_the_teacher_reconstruction():
    t, p = rows(), rows(4, seed=1)
    recon = prototype_reconstruction(t, p, 0.1)
    assert prototype_mse(2.0 * recon, t, prototypes=p).abs() < 1e-6
    per_row = prototype_mse(rows(seed=3), t, prototypes=p, reduction="none")
    assert per_row.shape == (12,) and (per_row >= 0).all() and (per_row <= 4 + 1e-6).all()


@pytest.mark.parametrize("fn", [prototype_kl, prototype_mse])
def test_prototype_losses_masking_gradients_and_registry(fn):
    s = rows(seed=2).view(3, 4, 6).requires_grad_(True)
    t, p = rows().view(3, 4, 6), rows(4, seed=1)
    mask = torch.tensor([[1, 1, 0, 0]] * 3).bool()
    masked = fn(s, t, prototypes=p, mask=mask)
    torch.testing.assert_close(masked, fn(s[:, :2], t[:, :2], prototypes=p))
    masked.backward()
    assert torch.isfinite(s.grad).all() and s.grad[:, 2:].abs().sum() == 0 and s.grad[:, :2].abs().sum() > 0
    name = fn.__name__
    assert get_loss_function(name) is fn
    module = get_loss(name, temperature=0.3)
    torch.testing.assert_close(module(s, t, prototypes=p), fn(s, t, prototypes=p, temperature=0.3))


def test_prototype_losses_reject_bad_input():
    s, t, p = rows(), rows(), rows(4, seed=1)
    with pytest.raises(ValueError, match="needs prototypes="):
        prototype_kl(s, t)
    with pytest.raises(ValueError, match="width 6 but the prototypes have width 5"):
        prototype_mse(s, t, prototypes=rows(4, 5))
    with pytest.raises(ValueError, match="resize the student map"):
        prototype_kl(s[:5], t, prototypes=p)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        get_loss("prototype_kl", temperature=0.0)


# ---------------------------------------------------------------------------------------------------- memory
def clustered_map(centres, n_per=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.cat([c + noise * torch.randn(n_per, len(c), generator=g) for c in centres])
    return pts.T.reshape(1, len(centres[0]), 1, -1)  # one NCHW map, one position per point


def test_memory_seeds_from_teacher_rows_and_recovers_clusters():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    memory = PrototypeMemory(4, 8, momentum=0.5, restart_steps=3)
    with pytest.raises(RuntimeError, match="memory is empty"):
        memory.checked()
    memory.update(clustered_map(centres))
    assert memory.initialized and memory.num_updates == 1
    for step in range(30):
        memory.update(clustered_map(centres, seed=step + 1))
    p = memory.checked()
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(4))
    best = (centres @ p.T).max(-1).values
    assert (best > 0.98).all(), best


def test_memory_momentum_zero_is_the_batch_centroid_and_restart_reseeds():
    memory = PrototypeMemory(2, 3, momentum=0.0, restart_steps=2)
    memory.prototypes.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
    memory.num_updates += 1
    batch = torch.tensor([[1.0, 1, 0], [1.0, -1, 0], [1.0, 0, 1]])  # all nearest to prototype 0
    memory.update(batch.T.reshape(1, 3, 1, 3))
    torch.testing.assert_close(memory.prototypes[0], F.normalize(F.normalize(batch, dim=-1).sum(0), dim=0))
    torch.testing.assert_close(memory.prototypes[1], torch.tensor([-1.0, 0, 0]))  # unassigned: unchanged
    assert memory.idle_steps.tolist() == [0, 1]
    memory.update(batch.T.reshape(1, 3, 1, 3))
    assert memory.idle_steps.tolist() == [0, 0]  # re-seeded after 2 idle updates, now a row of the batch
    assert (F.normalize(batch, dim=-1) @ memory.prototypes[1]).max() > 1 - 1e-6


def test_memory_rejects_bad_maps():
    memory = PrototypeMemory(8, 4)
    with pytest.raises(ValueError, match="4 channels"):
        memory.update(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="fewer than num_prototypes=8"):
        memory.update(torch.randn(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------------- augmentation
def test_augmentation_starts_as_identity_and_trains_its_parts():
    torch.manual_seed(0)
    aug = PrototypeAugmentation(6, 10, temperature=0.1)
    s = torch.randn(2, 6, 3, 3, requires_grad=True)
    p = F.normalize(torch.randn(4, 10), dim=-1).requires_grad_(True)
    out = aug(s, p)
    assert out["query"].shape == (2, 10, 3, 3) and out["projected"].shape == (2, 10, 3, 3)
    torch.testing.assert_close(out["augmented"], s)  # gate 0: the plain student at the start
    (out["projected"].sum() + out["query"].pow(2).sum()).backward()
    assert aug.gate.grad.abs().sum() > 0 and aug.query.weight.grad is not None and s.grad is not None
    assert p.grad is None  # the student never moves the teacher's prototypes
    with pytest.raises(ValueError, match="6 channels"):
        aug(torch.randn(2, 5, 3, 3), p)


# ---------------------------------------------------------------------------------------------------- task
def test_task_trains_a_student_with_another_label_space():
    task = make()
    assert task.prockd.augmented_task_weight == 1.0  # -1 of resnet10t is the map its head reads
    task.train()
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    before = None
    for _ in range(3):
        res = task(X, Y)
        assert res["output"].shape == (4, 5) and torch.isfinite(res["loss"])
        assert {"kd_prototype_kl", "kd_prototype_mse", "kd_augmented_task"} <= set(res)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        if before is None:
            before = task.prockd.memory.prototypes.clone()
    assert not torch.equal(before, task.prockd.memory.prototypes)  # the teacher's features moved the prototypes
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    trainable = task.get_trainable_module()
    assert trainable.prockd["augment"].gate.grad.abs().sum() > 0
    frozen = task.prockd.memory.prototypes.clone()
    task.eval()
    task(X, Y)
    assert torch.equal(frozen, task.prockd.memory.prototypes)  # no update outside training


def test_student_checkpoint_is_plain_timm_and_task_state_round_trips():
    task = make()
    task.train()
    task(X, Y)["loss"].backward()
    student = task.get_eval_model()
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    plain.load_state_dict(student.state_dict())  # strict: no ProC-KD module in the student
    torch.testing.assert_close(plain.eval()(X), student.eval()(X))
    state = task.get_task_state()
    assert any(k.endswith("memory.prototypes") for k in state["kd_modules"])
    other = make()
    other.load_task_state(state)
    torch.testing.assert_close(other.prockd.memory.prototypes, task.prockd.memory.prototypes)


def test_non_head_feature_resolves_the_augmented_term_off():
    student = resnet(5, 1)
    assert feature_feeds_head(student, 4, (64, 64)) and not feature_feeds_head(student, 3, (64, 64))
    task = make(student, student_feature="-2", teacher_feature="-2")
    assert task.prockd.augmented_task_weight == 0.0
    task.train()
    res = task(X, Y)
    assert "kd_augmented_task" not in res and "kd_prototype_kl" in res
    with pytest.raises(ValueError, match="not the map the head reads"):
        make(resnet(5, 1), student_feature="-2", augmented_task_weight=1.0)


# ---------------------------------------------------------------------------------------------------- bad input
class PlainCNN(nn.Module):
    """A teacher without ``forward_intermediates``: its features are reachable by module name only."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def test_clear_errors_for_bad_input():
    with pytest.raises(ValueError, match="not spatial"):
        make(input_size=32)  # resnet10t's last map is 1x1 at 32x32
    with pytest.raises(ValueError, match="out of range"):
        make(teacher_feature="9")
    with pytest.raises(TypeError, match="num_prototypes"):
        make(num_prototype=4)
    plain = PlainCNN()
    with pytest.raises(ValueError, match="no forward_intermediates"):
        make(teacher=plain)
    task = make(teacher=plain, teacher_feature="act", num_prototypes=4096)  # module names work; too few positions
    with pytest.raises(ValueError, match="fewer than num_prototypes=4096"):
        task.train()(X, Y)
    assert torch.isfinite(make(teacher=plain, teacher_feature="act").train()(X, Y)["loss"])


def test_vit_student_reads_prototypes_without_the_augmented_head_term():
    torch.manual_seed(3)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48, num_heads=2, num_classes=5
    )
    task = make(vit, teacher_feature="-2")  # ViT 4x4 patch grid vs resnet10t's 4x4 third stage
    assert task.prockd.augmented_task_weight == 0.0  # a ViT head reads tokens, not the NCHW grid
    res = task.train()(X, Y)
    res["loss"].backward()
    assert torch.isfinite(res["loss"]) and vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_prototypes": 1}, "num_prototypes"),
        ({"temperature": 0.0}, "temperature"),
        ({"momentum": 1.0}, "momentum"),
        ({"restart_steps": -1}, "restart_steps"),
        ({"feature_weight": -1.0}, "feature_weight"),
        ({"student_feature": " "}, "student_feature"),
        ({"assignment_weight": 0, "feature_weight": 0, "augmented_task_weight": 0}, "Nothing to distil"),
    ],
)
def test_config_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ProCKDConfig(**kw)


def test_config_parses_with_hf_argument_parser():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(ProCKDConfig).parse_args_into_dataclasses(
        ["--num_prototypes", "16", "--teacher_feature", "layer3", "--augmented_task_weight", "0.5"]
    )
    assert (cfg.num_prototypes, cfg.teacher_feature, cfg.augmented_task_weight) == (16, "layer3", 0.5)
