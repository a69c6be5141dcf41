"""MST-Distill: top-1 routing from the student's logits, the balance term, specialised (masked) teachers, the
router's gradients and training, the Trainer glue, bad input."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import TokenDataset, tiny_bert, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, DistillationEngine
from kd_plugins.distill.mst import (
    MaskNet,
    MSTConfig,
    MSTTeacherSet,
    SpecialisedTeacher,
    mask_alignment_loss,
    mst_balance_loss,
    mst_route,
    train_masks,
)

CLASSES, DIM = 10, 16


# ---------------------------------------------------------------------- routing and the balance term
def test_routing_picks_one_teacher_per_row_with_a_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.randn(8, 3, requires_grad=True)
    r = mst_route(logits)
    assert r.index.shape == (8, 1) and torch.equal(r.index[:, 0], logits.argmax(-1))
    assert torch.equal(r.weights.detach(), F.one_hot(logits.argmax(-1), 3).float())  # value: exactly one-hot
    divergences = torch.tensor([1.0, 2.0, 3.0]).expand(8, 3)
    (r.weights * divergences).sum().backward()
    g = logits.softmax(-1).detach()
    expected = g * (divergences - (g * divergences).sum(-1, keepdim=True))  # d/dz sum_i g_i D_i
    torch.testing.assert_close(logits.grad, expected)
    two = mst_route(logits.detach(), top_k=2, gate_gradient="none")
    assert two.index.shape == (8, 2) and torch.allclose(two.weights.sum(-1), torch.ones(8))
    assert set(two.weights.unique().tolist()) == {0.0, 0.5} and not two.weights.requires_grad


def test_balance_term_hand_values_and_minimum_at_uniform():
    balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(mst_balance_loss(balanced)) == pytest.approx(0.0, abs=1e-7)
    assert float(mst_balance_loss(torch.full((5, 4), 0.25))) == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert float(mst_balance_loss(skewed)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)  # KL(u || [.75, .25])
    assert float(mst_balance_loss(balanced, "cv")) == pytest.approx(0.0, abs=1e-7)
    assert float(mst_balance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "cv")) == pytest.approx(math.sqrt(2))
    torch.manual_seed(0)
    for _ in range(20):  # uniform is the minimum
        assert float(mst_balance_loss(torch.rand(6, 3).softmax(-1))) > 0
    assert math.isfinite(float(mst_balance_loss(torch.tensor([[1.0, 0.0]]))))  # an unused teacher: finite


# ---------------------------------------------------------------------- toy teachers and students
class _Oracle(nn.Module):
    """Knows the class from the nearest prototype; right on ``right`` classes, on the others it names the class
    ``shift`` away (confidently wrong)."""

    def __init__(self, prototypes, right, shift):
        super().__init__()
        self.register_buffer("prototypes", prototypes)
        self.right, self.shift = set(right), shift
        self.scale = nn.Parameter(torch.tensor(6.0))  # a parameter, so the test can check it never trains

    def forward(self, pixel_values):
        true = torch.cdist(pixel_values, self.prototypes).argmin(-1)
        wrong = (true + self.shift) % CLASSES
        said = torch.where(torch.tensor([int(c) in self.right for c in true]), true, wrong)
        return {"logits": self.scale * F.one_hot(said, CLASSES).float()}


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(DIM, CLASSES)

    def forward(self, pixel_values):
        return {"logits": self.net(pixel_values)}


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES, DIM, generator=g) * 2
    teachers = {"low": _Oracle(prototypes, range(5), 5), "high": _Oracle(prototypes, range(5, 10), 5)}
    return prototypes, teachers


def _sample(prototypes, n, g):
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return prototypes[y] + 0.3 * torch.randn(n, DIM, generator=g), y


def _engine(tset, student, **cfg):
    engine = DistillationEngine(tset, DistillationConfig(task="seq_classification", **{"loss_terms": "kl", **cfg}))
    engine.setup(student)
    return engine


def test_loss_is_the_selected_teachers_divergence_plus_the_balance_term():
    prototypes, teachers = _toy()
    torch.manual_seed(0)
    student = _Student()
    tset = MSTTeacherSet(teachers, balance_weight=0.5)
    engine = _engine(tset, student, temperature=4.0)
    x, _ = _sample(prototypes, 12, torch.Generator().manual_seed(1))
    s = student(x)["logits"]
    result = engine.compute({"pixel_values": x}, {"logits": s})
    t = torch.stack([teachers[n](x)["logits"] for n in ("low", "high")])  # [K, B, C]
    gate = tset.gate(s.detach()).softmax(-1)
    pick = gate.argmax(-1)
    log_q = F.log_softmax(s / 4, -1)
    p = F.softmax(t[pick, torch.arange(12)] / 4, -1)
    kd = (16 * (p * (p.log() - log_q)).sum(-1)).mean()
    balance = (torch.log(torch.tensor(0.5)) - gate.mean(0).log()).mean()
    torch.testing.assert_close(result.loss, kd + 0.5 * balance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.terms["kl"], kd.detach(), rtol=1e-5, atol=1e-6)
    assert result.metrics["mst_balance"] == pytest.approx(float(balance.detach()), rel=1e-5)
    shares = [result.metrics["mst_route_low"], result.metrics["mst_route_high"]]
    assert sum(shares) == pytest.approx(1.0) and shares[0] == pytest.approx(float((pick == 0).float().mean()))


def test_rows_with_ignored_labels_count_in_neither_term():
    prototypes, teachers = _toy()
    torch.manual_seed(0)
    student = _Student()
    engine = _engine(MSTTeacherSet(teachers), student)
    x, y = _sample(prototypes, 10, torch.Generator().manual_seed(8))
    y[:4] = -100
    with torch.no_grad():
        masked = engine.compute({"pixel_values": x, "labels": y}, student(x))
        kept = engine.compute({"pixel_values": x[4:], "labels": y[4:]}, student(x[4:]))
    torch.testing.assert_close(masked.loss, kept.loss)
    assert masked.metrics == pytest.approx(kept.metrics)


def test_gradients_reach_the_router_and_the_student_never_the_teachers():
    prototypes, teachers = _toy()
    torch.manual_seed(0)
    student = _Student()
    tset = MSTTeacherSet(teachers)
    engine = _engine(tset, student)
    x, _ = _sample(prototypes, 16, torch.Generator().manual_seed(2))
    engine.compute({"pixel_values": x}, student(x)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tset.gate.parameters())
    for t in teachers.values():
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    router_ids = {id(p) for p in tset.gate.parameters()}
    assert router_ids == {id(p) for p in engine.projectors.parameters()}  # the router is what the bank trains
    assert not router_ids & {id(p) for p in student.parameters()}
    before = [p.detach().clone() for p in tset.gate.parameters()]
    engine.projector_step(lr=1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(before, tset.gate.parameters()))


def test_the_router_is_saved_and_restored_with_the_engine_state(tmp_path):
    prototypes, teachers = _toy()
    x, _ = _sample(prototypes, 8, torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    student = _Student()
    first = MSTTeacherSet(teachers)
    engine = _engine(first, student)
    engine.compute({"pixel_values": x}, student(x)).loss.backward()
    engine.projector_step(lr=1e-2)
    assert engine.save(str(tmp_path))
    torch.manual_seed(1)
    second = MSTTeacherSet(teachers)
    resumed = _engine(second, student)
    assert resumed.load(str(tmp_path))
    resumed.compute({"pixel_values": x}, student(x))  # the router is built here and takes the saved state
    for a, b in zip(first.gate.state_dict().values(), second.gate.state_dict().values()):
        assert torch.equal(a, b)


def test_reference_gate_gradient_reaches_the_router_only_through_the_balance_term():
    prototypes, teachers = _toy()
    x, _ = _sample(prototypes, 16, torch.Generator().manual_seed(3))
    for weight, expect_grad in ((0.0, False), (1.0, True)):
        torch.manual_seed(0)
        student = _Student()
        tset = MSTTeacherSet(teachers, gate_gradient="none", balance_weight=weight)
        engine = _engine(tset, student)
        engine.compute({"pixel_values": x}, student(x)).loss.backward()
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in tset.gate.parameters())
        assert got == expect_grad


def test_the_router_learns_to_send_rows_to_the_right_teacher():
    """Teacher "low" is right on classes 0-4 (and names c+5 otherwise), "high" on 5-9: after a short training on
    labels + MST, most rows go to the teacher that is right on their class (chance: 0.5). The labels weigh more than
    the routed KD here: the router follows the teacher the student agrees with, so a class whose rows start on the
    wrong teacher can pull the student to that teacher's answer and stay there (docs/multi_teacher.md)."""
    prototypes, teachers = _toy()
    torch.manual_seed(0)
    student = _Student()
    tset = MSTTeacherSet(teachers)
    engine = _engine(tset, student, temperature=2.0)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    for _ in range(150):
        x, y = _sample(prototypes, 64, g)
        out = student(x)
        loss = F.cross_entropy(out["logits"], y) + 0.3 * engine.compute({"pixel_values": x}, out).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.projector_step(lr=1e-2)
    x, y = _sample(prototypes, 400, g)
    with torch.no_grad():
        picked = tset.gate(student(x)["logits"]).argmax(-1)
    right = (y >= 5).long()  # 0: "low", 1: "high"
    accuracy = float((picked == right).float().mean())
    assert accuracy > 0.75, accuracy  # 0.9 when written (9 of 10 classes)


# ---------------------------------------------------------------------- specialised teachers (masks)
class _MLPTeacher(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(DIM, 12), nn.ReLU())
        self.head = nn.Linear(12, CLASSES)

    def forward(self, pixel_values):
        return {"logits": self.head(self.body(pixel_values))}


def test_masks_multiply_the_layer_output_and_leave_the_base_teacher_unchanged():
    teacher = _MLPTeacher()
    x = torch.randn(5, DIM)
    base = teacher(x)["logits"]
    special = SpecialisedTeacher(teacher, "body.0", heads=2)
    assert special.mask.channels == 12
    h = teacher.body[0](x)
    mask = special.mask(h)
    assert mask.shape == (5, 12) and bool(((mask > 0) & (mask < 1)).all())
    expected = teacher.head(torch.relu(h * mask))
    torch.testing.assert_close(special(x, labels=None)["logits"], expected)  # unknown keys are dropped
    torch.testing.assert_close(teacher(x)["logits"], base)  # the hook is gone after the call
    nn.init.zeros_(special.mask.head.weight)
    nn.init.constant_(special.mask.head.bias, 30.0)  # mask = 1: the base teacher
    torch.testing.assert_close(special(x)["logits"], base)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16, CLASSES))
    out = SpecialisedTeacher(conv, "0", heads=2)(torch.randn(2, 1, 4, 4))
    assert out.shape == (2, CLASSES)


def test_train_masks_moves_masked_teachers_towards_the_student_and_only_the_masks_train():
    torch.manual_seed(0)
    student = _Student()
    teacher = _MLPTeacher(seed=1)
    special = [SpecialisedTeacher(teacher, "body.0", heads=2), SpecialisedTeacher(teacher, "head", heads=2)]
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    batches = [{"pixel_values": torch.randn(32, DIM, generator=g), "labels": torch.zeros(32)} for _ in range(8)]
    history = train_masks(special, student, batches, mask_lr=1e-2, mask_epochs=4)
    assert len(history) == 4 and history[-1] < history[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert all(not p.requires_grad for m in special for p in m.mask.parameters())  # frozen again
    x = batches[0]["pixel_values"]
    with torch.no_grad():
        loss = mask_alignment_loss(special[0](x)["logits"], student(x)["logits"])
    assert float(loss) >= 0


def test_specialised_teachers_route_through_the_engine():
    prototypes, _ = _toy()
    teacher = _MLPTeacher(seed=1)
    tset = MSTTeacherSet({"a": SpecialisedTeacher(teacher, "body.0"), "b": SpecialisedTeacher(teacher, "head")})
    student = _Student()
    engine = _engine(tset, student)
    x, _ = _sample(prototypes, 8, torch.Generator().manual_seed(6))
    engine.compute({"pixel_values": x}, student(x)).loss.backward()
    assert all(p.grad is None for m in tset.modules for p in m.parameters())  # teachers and masks frozen
    assert tset.last_routing.index.shape == (8, 1)


# ---------------------------------------------------------------------- the Trainer glue
def test_callback_trains_the_router_and_logs_the_routing(tmp_path):
    teachers = [tiny_bert("BertForSequenceClassification", seed=s) for s in (1, 2)]
    student = tiny_bert("BertForSequenceClassification", seed=3)
    tset = MSTTeacherSet(teachers)
    cb = DistillationCallback(tset, DistillationConfig(loss_terms="kl", temperature=4.0))
    args = training_args(str(tmp_path), max_steps=2)
    trainer = Trainer(model=student, args=args, train_dataset=TokenDataset(n=8, labels="seq"), callbacks=[cb])
    trainer.train()
    assert tset.gate is not None
    gate_ids = {id(p) for p in tset.gate.parameters()}
    assert not gate_ids & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert gate_ids == {id(p) for p in cb.engine.bank.optimizer.param_groups[0]["params"]}
    assert cb.engine.bank.optimizer.state  # stepped after each optimizer step
    logs = [h for h in trainer.state.log_history if "mst_balance" in h]
    assert logs and {"mst_route_0", "mst_route_1", "kd_kl"} <= set(logs[0])


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,words",
    [
        ({"top_k": 0}, ["top_k", "0"]),
        ({"balance": "entropy"}, ["balance", "entropy", "'kl'"]),
        ({"gate_gradient": "gumbel"}, ["gate_gradient", "gumbel", "straight_through"]),
        ({"balance_weight": -1.0}, ["balance_weight", "-1"]),
        ({"mask_temperature": 0.0}, ["mask_temperature", "0"]),
        ({"router_hidden": 0}, ["router_hidden", "0"]),
    ],
)
def test_bad_config_values_name_field_value_and_fix(kw, words):
    with pytest.raises(ValueError) as e:
        MSTConfig(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_sets_and_inputs_raise_clear_errors():
    prototypes, teachers = _toy()
    with pytest.raises(ValueError, match="at least 2"):
        MSTTeacherSet([teachers["low"]])
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 teachers"):
        MSTTeacherSet(teachers, top_k=3)
    with pytest.raises(TypeError, match="did you mean 'top_k'"):
        MSTTeacherSet(teachers, topk=1)
    student = _Student()
    with pytest.raises(ValueError, match="logit terms only"):
        engine = DistillationEngine(MSTTeacherSet(teachers), DistillationConfig(task="encoder"))
        engine.setup(student)
    with pytest.raises(ValueError, match="no module 'body.9'"):
        SpecialisedTeacher(_MLPTeacher(), "body.9")
    with pytest.raises(ValueError, match="channels="):
        SpecialisedTeacher(_MLPTeacher(), "body.1")  # a ReLU has no declared width
    with pytest.raises(ValueError, match="top_k must be in 1..2"):
        mst_route(torch.zeros(3, 2), top_k=3)
    with pytest.raises(ValueError, match="mask_alignment_loss"):
        mask_alignment_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="SpecialisedTeacher"):
        train_masks([_MLPTeacher()], student, [])
    with pytest.raises(ValueError, match="MaskNet hidden=5"):
        MaskNet(8, heads=2, hidden=5)


def test_language_model_logits_are_refused():
    from tiny import tiny_llama

    tset = MSTTeacherSet([tiny_llama(seed=1), tiny_llama(seed=2)])
    student = tiny_llama(seed=3)
    engine = DistillationEngine(tset, DistillationConfig(loss_terms="kl"))
    engine.setup(student)
    ds = TokenDataset(n=2)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ds[0]}
    with pytest.raises(ValueError, match="whole rows"):
        engine.compute(batch, student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
