"""Vision methods: OFA-KD loss fixtures and exit branches, DisWOT ranking, ViT weight inheritance, TransKD modules."""

import copy

import pytest
import timm
import torch

from kd_plugins.losses import get_loss, list_losses
from kd_plugins.vision import (
    ConvExitBranch,
    CrossSelectiveFusion,
    TokenExitBranch,
    hcl_loss,
    inherit_vit_student,
    ofa_loss,
    rank_students,
)
from kd_plugins.vision.diswot import diswot_score
from kd_plugins.vision.ofa import default_ofa_stages


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


# ---------------------------------------------------------------- OFA-KD


@pytest.mark.parametrize("eps,expected", [(1.0, 1.0986), (1.5, 1.4695), (2.0, 2.1313)])
def test_ofa_loss_fixtures(eps, expected):
    teacher = torch.tensor([[0.7, 0.2, 0.1]]).log()
    student = torch.zeros(1, 3)
    y = torch.tensor([0])
    assert ofa_loss(student, teacher, labels=y, eps=eps).item() == pytest.approx(expected, abs=1e-4)
    assert get_loss("ofa", eps=eps)(student, teacher, labels=y).item() == pytest.approx(expected, abs=1e-4)


def test_ofa_registered_and_needs_labels():
    assert "ofa" in list_losses("logits")
    with pytest.raises(ValueError, match="labels"):
        get_loss("ofa")(torch.zeros(2, 3), torch.zeros(2, 3))
    # eps = 1 is the soft-target cross-entropy -sum p log q
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    ref = -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(ofa_loss(s, t, labels=y, eps=1.0), ref)


def test_exit_branch_shapes():
    conv = ConvExitBranch(16, 64, num_classes=7, num_down=2)
    assert conv(torch.randn(2, 16, 16, 16)).shape == (2, 7)
    tok = TokenExitBranch(32, 48, num_classes=7, num_merge=1, num_blocks=2)
    assert tok(torch.randn(2, 32, 8, 8)).shape == (2, 7)
    assert tok(torch.randn(2, 65, 32)).shape == (2, 7)  # tokens with a class token
    assert default_ofa_stages(12, plain=True) == [1, 3, 9, 11]
    assert default_ofa_stages(5, plain=False) == [1, 2, 3, 4]


# ---------------------------------------------------------------- DisWOT


def test_diswot_deterministic_under_seed():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cands = {
        "vit_narrow": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
        "resnet10t": "resnet10t",
        "convnext": ("convnext_atto", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))),
    }
    a = rank_students(teacher, cands, images, seed=3)
    b = rank_students(teacher, cands, images, seed=3)
    assert a == b and len(a) == 3
    assert [s for _, s in a] == sorted((s for _, s in a), reverse=True)
    c = dict(rank_students(teacher, cands, images, seed=4))
    assert any(c[k] != v for k, v in a)
    assert all(s <= 0 for _, s in a)


def test_diswot_identity_and_scale_invariance():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10).eval()
    images = torch.randn(4, 3, 32, 32)
    twin = copy.deepcopy(teacher)
    assert diswot_score(teacher, twin, images, student_train_mode=False) == pytest.approx(0.0, abs=1e-5)
    ranked = rank_students(teacher, {"twin": twin}, images, init="none", student_train_mode=False)
    assert ranked[0][1] == pytest.approx(0.0, abs=1e-5)
    other = timm.create_model("resnet10t", num_classes=5)
    with pytest.raises(ValueError, match="classes"):
        diswot_score(teacher, other, images)


# ---------------------------------------------------------------- inheritance


def test_inherit_full_size_reproduces_teacher():
    teacher = tiny_vit().eval()
    student = inherit_vit_student(teacher).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(student(x), teacher(x))


def test_inherit_depth_width_slicing():
    teacher = tiny_vit().eval()
    student = inherit_vit_student(teacher, depth=2, width=32, strategy="uniform").eval()
    info = student.kd_plugins_inherit
    assert info["teacher_layers"] == [0, 2]
    assert student.embed_dim == 32 and len(student.blocks) == 2 and student.blocks[0].attn.num_heads == 2
    x = torch.randn(3, 3, 32, 32)
    assert student(x).shape == (3, 10)
    # q of head 0..1 of teacher block 2 == student block 1 (leading 32 input columns)
    t_qkv = teacher.blocks[2].attn.qkv.weight.reshape(3, 4, 16, 64)
    s_qkv = student.blocks[1].attn.qkv.weight.reshape(3, 2, 16, 32)
    torch.testing.assert_close(s_qkv, t_qkv[:, :2, :, :32])
    torch.testing.assert_close(student.blocks[1].mlp.fc1.weight, teacher.blocks[2].mlp.fc1.weight[:128, :32])
    # re-creatable from the recorded kwargs and a plain state dict
    again = timm.create_model(info["model_name"], pretrained=False, **info["model_kwargs"]).eval()
    again.load_state_dict(student.state_dict())
    torch.testing.assert_close(again(x), student(x))
    assert inherit_vit_student(teacher, depth=2, strategy=[1, 3]).kd_plugins_inherit["teacher_layers"] == [1, 3]
    assert inherit_vit_student(teacher, num_classes=3)(x).shape == (3, 3)


def test_inherit_errors():
    with pytest.raises(ValueError, match="cannot shrink a ResNet"):
        inherit_vit_student(timm.create_model("resnet10t", num_classes=10), depth=2)
    teacher = tiny_vit()
    with pytest.raises(ValueError, match="out of range|must lie"):
        inherit_vit_student(teacher, depth=9)
    with pytest.raises(ValueError, match="no larger than the teacher"):
        inherit_vit_student(teacher, width=128)


# ---------------------------------------------------------------- TransKD


def test_hcl_and_csf():
    f = torch.randn(2, 8, 8, 8)
    assert hcl_loss(f, f).item() == 0.0
    g = f + 1.0  # constant shift: every pooled level differs by exactly 1
    assert hcl_loss(f, g).item() == pytest.approx(1.0, abs=1e-5)
    csf = CrossSelectiveFusion([16, 32], [24, 48], mid_channels=8)
    outs = csf([torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)])
    assert [tuple(o.shape) for o in outs] == [(2, 24, 8, 8), (2, 48, 4, 4)]
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in csf.parameters())
