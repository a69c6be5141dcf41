"""KDTask with a TeacherSet: one teacher bit for bit, both aggregations against hand-computed values, routing, offload,
per-member normalisation, clear errors."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from kd_plugins import TeacherSet
from kd_plugins.integrations.timm import KDTask

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 3, 7, 9])
T = 2.0


def cnn(seed=1, num_classes=10):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes).eval()


def make(teacher, **kw):
    kw.setdefault("loss_terms", {"kl": 1.0})
    kw.setdefault("temperature", T)
    return KDTask(student_model=cnn(seed=0), teacher_model=teacher, verbose=False, **kw)


def kl_rows(student, teacher):
    return (F.softmax(teacher / T, -1) * (F.log_softmax(teacher / T, -1) - F.log_softmax(student / T, -1))).sum(-1)


def test_one_teacher_set_is_the_single_teacher_bit_for_bit():
    results = []
    for wrap in (False, True):
        teacher = cnn(seed=1)
        task = make(TeacherSet([teacher]) if wrap else teacher)
        assert task.teacher_set is None  # unwrapped: the single-teacher path itself
        res = task(X, Y)
        res["loss"].backward()
        grads = [p.grad.clone() for p in task.get_trainable_module().parameters()]
        results.append((res["loss"].detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("aggregation", ["mixture", "sum_of_divergences"])
def test_two_teachers_match_the_hand_computed_objective(aggregation):
    t1, t2 = cnn(seed=1), cnn(seed=2)
    w = torch.tensor([0.25, 0.75])
    task = make(TeacherSet([t1, t2], weights=w.tolist(), aggregation=aggregation))
    res = task(X, Y)
    with torch.no_grad():
        s = task.get_eval_model()(X)
        z1, z2 = t1(X), t2(X)  # same normalisation as the student (default pretrained_cfg): input unchanged
    if aggregation == "mixture":
        p_mix = w[0] * F.softmax(z1 / T, -1) + w[1] * F.softmax(z2 / T, -1)
        expected = (p_mix * (p_mix.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    else:
        expected = (w[0] * kl_rows(s, z1) + w[1] * kl_rows(s, z2)).mean() * T**2
    torch.testing.assert_close(res["kd_kl"], expected, rtol=1e-4, atol=1e-6)
    res["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())


def test_mixture_is_no_larger_than_the_sum_of_divergences():
    t1, t2 = cnn(seed=1), cnn(seed=2)
    values = [make(TeacherSet([t1, t2], aggregation=a))(X, Y)["kd_kl"] for a in ("mixture", "sum_of_divergences")]
    assert values[0] <= values[1] + 1e-6  # KL is convex in the teacher distribution


def test_router_runs_each_teacher_on_its_rows_only():
    t1, t2 = cnn(seed=1), cnn(seed=2)
    seen = {1: [], 2: []}
    t1.register_forward_hook(lambda m, i, o: seen[1].append(i[0].shape[0]))
    t2.register_forward_hook(lambda m, i, o: seen[2].append(i[0].shape[0]))
    calls = []

    def router(batch):
        calls.append(sorted(batch))
        return F.one_hot((batch["labels"] >= 5).long(), 2).float()  # classes 0-4 -> teacher 0, 5-9 -> teacher 1

    task = make(TeacherSet([t1, t2], router=router, aggregation="sum_of_divergences"))
    res = task(X, Y)
    assert calls == [["labels", "pixel_values"]] and seen == {1: [2], 2: [2]}
    with torch.no_grad():
        s = task.get_eval_model()(X)
        expected = torch.cat([kl_rows(s[:2], t1(X[:2])), kl_rows(s[2:], t2(X[2:]))]).mean() * T**2
    torch.testing.assert_close(res["kd_kl"], expected, rtol=1e-4, atol=1e-6)
    # routed rows: the mixture equals the sum of divergences
    mix = make(TeacherSet([t1, t2], router=router))(X, Y)["kd_kl"]
    torch.testing.assert_close(mix, res["kd_kl"], rtol=1e-4, atol=1e-6)


def test_offload_gives_the_resident_result_and_parks_teachers_on_cpu():
    t1, t2 = cnn(seed=1), cnn(seed=2)
    resident = make(TeacherSet([t1, t2]))(X, Y)["kd_kl"]
    task = make(TeacherSet([t1, t2], offload=True))
    torch.testing.assert_close(task(X, Y)["kd_kl"], resident)
    assert all(p.device.type == "cpu" for p in task.teacher.parameters())


def test_each_member_gets_its_own_normalisation():
    t1, t2 = cnn(seed=1), cnn(seed=2)
    t2.pretrained_cfg = {**t2.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    seen = {}
    t1.register_forward_hook(lambda m, i, o: seen.__setitem__(1, i[0]))
    t2.register_forward_hook(lambda m, i, o: seen.__setitem__(2, i[0]))
    make(TeacherSet([t1, t2]))(X, Y)
    assert torch.equal(seen[1], X)
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[2], ((X * std + mean) - 0.5) / 0.5)


def test_teachers_stay_out_of_the_optimizer_and_in_eval_mode():
    task = make(TeacherSet([cnn(seed=1), cnn(seed=2)]))
    opt = create_optimizer_v2(task.get_trainable_module(), opt="sgd", lr=0.1)
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in task.teacher.parameters()}
    task.train()
    assert task.get_trainable_module().training and not task.teacher.training
    assert not any(m.training for m in task.teacher.modules())


def test_clear_errors():
    t1, t2 = cnn(seed=1), cnn(seed=2)
    with pytest.raises(ValueError, match="no columns"):
        make(TeacherSet([t1, t2], teacher_column="teacher"))
    with pytest.raises(ValueError, match=r"\['hidden_mse'\] are not logit terms"):
        make(TeacherSet([t1, t2]), loss_terms={"kl": 1.0, "hidden_mse": 1.0}, feature_pairs={-1: -1})
    with pytest.raises(ValueError, match="logit terms only"):
        make(TeacherSet([t1, t2]), patch_embed_weight=1.0)
    with pytest.raises(ValueError, match="raw logits"):
        make(TeacherSet([t1, t2]), loss_terms={"logit_mse": 1.0})
    with pytest.raises(ValueError, match="Class-count mismatch"):
        make(TeacherSet([t1, cnn(seed=3, num_classes=5)]))
    with pytest.raises(ValueError, match="apply to one teacher"):
        make(TeacherSet([t1, t2]), teacher_checkpoint="x.safetensors")
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        make(TeacherSet([t1, t2], router=lambda b: torch.ones(4, 3)))(X, Y)


def test_class_weighted_set_matches_the_formula():
    t_ref, t1, t2 = cnn(seed=1), cnn(seed=2), cnn(seed=3)
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    task = make(TeacherSet.class_weighted([t_ref, t1, t2], scores, tau=0.2, reference=0))
    res = task(X, Y)
    with torch.no_grad():
        s = task.get_eval_model()(X)
        zs = [t(X) for t in (t_ref, t1, t2)]
    w = torch.softmax(torch.softmax(zs[0].double(), -1) @ scores.double().T / 0.2, -1).float()
    p_mix = sum(w[:, i : i + 1] * F.softmax(zs[i] / T, -1) for i in range(3))
    expected = (p_mix * (p_mix.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
    torch.testing.assert_close(res["kd_kl"], expected, rtol=1e-4, atol=1e-6)
