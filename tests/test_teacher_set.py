"""TeacherSet: several teachers as one teacher source (mixture / sum of divergences, routing, offload), and the
DistillNearest / DistillWeighted scores."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, DistillationEngine, DistillationTrainer, TeacherSet
from kd_plugins.distill import score_features, score_teachers
from kd_plugins.distill.teacher import Teacher
from kd_plugins.distill.teacher_set import softmax_weights

CFG = dict(loss_terms="kl", temperature=2.0)


def _batch(ds, idx, **extra):
    items = [ds[i] for i in idx]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch.update(extra)
    return batch


def _loss_and_grads(teacher, student, batch, **cfg):
    engine = DistillationEngine(teacher, DistillationConfig(**{**CFG, **cfg}))
    engine.setup(student)
    student.zero_grad(set_to_none=True)
    s_in = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    result = engine.compute(batch, student(**s_in))
    result.loss.backward()
    result.loss = result.loss.detach()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return result, grads


def _assert_same(a, b):
    (ra, ga), (rb, gb) = a, b
    assert torch.equal(ra.loss, rb.loss), (float(ra.loss), float(rb.loss))
    assert set(ga) == set(gb) and all(torch.equal(ga[n], gb[n]) for n in ga)


# ---------------------------------------------------------------------- one teacher = the single-teacher result
def test_one_teacher_set_is_bit_identical_through_the_engine():
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    ds = TokenDataset(pad_last=3)
    batch = _batch(ds, [0, 1, 2, 3])
    single = _loss_and_grads(teacher, student, batch)
    routed = _batch(ds, [0, 1, 2, 3], route=["t", "t", "t", "t"])
    for tset, b in (
        (TeacherSet([teacher]), batch),
        (TeacherSet([teacher], offload=True), batch),  # through the set's own forward
        (TeacherSet([teacher], [3.0], aggregation="sum_of_divergences", offload=True), batch),
        (TeacherSet({"t": teacher}, teacher_column="route", offload=True), routed),
    ):
        _assert_same(single, _loss_and_grads(tset, student, b))


def _train(tmp_out, teacher, ds, trainer_cls=Trainer, **cfg):
    student = tiny_llama(seed=2)
    args = training_args(tmp_out, max_steps=2, remove_unused_columns=False)
    config = DistillationConfig(**{**CFG, **cfg})
    if trainer_cls is Trainer:
        trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[DistillationCallback(teacher, config)])
    else:
        trainer = trainer_cls(
            model=student, args=args, train_dataset=ds, teacher_model=teacher, distillation_config=config
        )
    trainer.train()
    logs = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    return logs, {k: v.detach().clone() for k, v in student.state_dict().items()}


class _Routed(torch.utils.data.Dataset):
    def __init__(self, ds, routes):
        self.ds, self.routes = ds, routes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "teacher_id": self.routes[i % len(self.routes)]}


def test_one_teacher_set_is_bit_identical_through_the_callback_and_trainer(tmp_out):
    teacher = tiny_llama(seed=1)
    ds = TokenDataset(pad_last=3)
    # a resident one-teacher set takes the single-teacher path, fused linear+KD included (fused_loss=None)
    (set_logs, set_w), (ref_logs, ref_w) = (
        _train(tmp_out + "set", TeacherSet([teacher]), ds),
        _train(tmp_out, teacher, ds),
    )
    assert set_logs == ref_logs and all(torch.equal(set_w[k], ref_w[k]) for k in ref_w)
    # offloaded / routed sets feed the plain path: the same as a single teacher on the plain path
    ref_logs, ref_w = _train(tmp_out + "ref_plain", teacher, ds, fused_loss=False)
    runs = {
        "offload_column": (TeacherSet([teacher], teacher_column="teacher_id", offload=True), _Routed(ds, [0]), Trainer),
        "trainer": (TeacherSet([teacher], offload=True), ds, DistillationTrainer),
    }
    for name, (tset, data, cls) in runs.items():
        logs, w = _train(tmp_out + name, tset, data, cls)
        assert logs == ref_logs, name
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), name


# ---------------------------------------------------------------------- several teachers
def _two_teachers():
    return tiny_llama(seed=1), tiny_llama(seed=3)


def _student_logits(student, batch):
    with torch.no_grad():
        return student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _kl_rows(t_logp, s_logits, temperature):
    s_logp = torch.log_softmax(s_logits / temperature, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1) * temperature**2


def test_mixture_and_sum_of_divergences_are_the_formulas_and_differ():
    t1, t2 = _two_teachers()
    student = tiny_llama(seed=2)
    batch = _batch(TokenDataset(), [0, 1, 2])  # no padding: every shifted position counts
    w, T = torch.tensor([0.3, 0.7]), 2.0
    mix, _ = _loss_and_grads(TeacherSet([t1, t2], w), student, batch)
    summed, _ = _loss_and_grads(TeacherSet([t1, t2], w, aggregation="sum_of_divergences"), student, batch)
    s = _student_logits(student, batch)[:, :-1]
    logps = [torch.log_softmax(_student_logits(t, batch)[:, :-1] / T, -1) for t in (t1, t2)]
    log_mix = torch.logsumexp(torch.stack([w[i].log() + logps[i] for i in range(2)]), 0)
    expect_mix = _kl_rows(log_mix, s, T).mean()
    expect_sum = sum(w[i] * _kl_rows(logps[i], s, T) for i in range(2)).mean()
    assert float(mix.loss) == pytest.approx(float(expect_mix), rel=1e-4)  # float32 round trip through T log p_mix
    assert float(summed.loss) == pytest.approx(float(expect_sum), rel=1e-5)
    assert float(mix.loss) < float(summed.loss) - 1e-4  # KL is convex in the teacher: they differ


def test_routing_column_runs_each_teacher_on_its_rows_only():
    t1, t2 = _two_teachers()
    student = tiny_llama(seed=2)
    seen = {"a": [], "b": []}
    for name, t in (("a", t1), ("b", t2)):
        t.register_forward_hook(
            lambda m, a, k, out, name=name: seen[name].append(k["input_ids"].shape[0]), with_kwargs=True
        )
    ds = TokenDataset(pad_last=3)
    routes = ["a", "b", "b", "a", "b"]
    batch = _batch(ds, range(5), teacher=routes)
    tset = TeacherSet({"a": t1, "b": t2}, teacher_column="teacher")
    routed, _ = _loss_and_grads(tset, student, batch)
    assert seen == {"a": [2], "b": [3]}
    # the routed loss is the token-weighted mean of each teacher's KL on its own rows
    per = {}
    for name, t in (("a", t1), ("b", t2)):
        rows = [i for i, r in enumerate(routes) if r == name]
        sub = {k: v[rows] for k, v in batch.items() if k != "teacher"}
        per[name] = (_loss_and_grads(t, student, sub)[0].loss, int(sub["labels"][:, 1:].ne(-100).sum()))
    expect = sum(loss * n for loss, n in per.values()) / sum(n for _, n in per.values())
    assert float(routed.loss) == pytest.approx(float(expect), rel=1e-5)
    by_index, _ = _loss_and_grads(
        TeacherSet([t1, t2], teacher_column="teacher"), student, {**batch, "teacher": torch.tensor([0, 1, 1, 0, 1])}
    )
    assert float(by_index.loss) == pytest.approx(float(routed.loss), rel=1e-6)
    summed = TeacherSet({"a": t1, "b": t2}, teacher_column="teacher", aggregation="sum_of_divergences")
    assert float(_loss_and_grads(summed, student, batch)[0].loss) == pytest.approx(float(routed.loss), rel=1e-5)


def test_router_gives_per_row_weights():
    t1, t2 = _two_teachers()
    student = tiny_llama(seed=2)
    batch = _batch(TokenDataset(), [0, 1])
    one_hot = TeacherSet([t1, t2], router=lambda inputs: torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    column = TeacherSet([t1, t2], teacher_column="teacher")
    a = _loss_and_grads(one_hot, student, batch)[0].loss
    b = _loss_and_grads(column, student, {**batch, "teacher": [0, 1]})[0].loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    bad = TeacherSet([t1, t2], router=lambda inputs: torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[2, 2\] tensor"):
        _loss_and_grads(bad, student, batch)


def test_bad_routing_and_bad_sets_raise_clear_errors():
    t1, t2 = _two_teachers()
    student = tiny_llama(seed=2)
    batch = _batch(TokenDataset(), [0, 1])
    tset = TeacherSet({"a": t1, "b": t2}, teacher_column="teacher")
    with pytest.raises(ValueError, match="unknown teacher 'c'.*a, b"):
        _loss_and_grads(tset, student, {**batch, "teacher": ["a", "c"]})
    with pytest.raises(ValueError, match="index 5"):
        _loss_and_grads(tset, student, {**batch, "teacher": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        _loss_and_grads(tset, student, batch)
    with pytest.raises(ValueError, match="one of weights, router, teacher_column and class_relevance"):
        TeacherSet([t1, t2], [0.5, 0.5], teacher_column="teacher")
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        TeacherSet([t1, t2, t1], [0.5, 0.5])
    with pytest.raises(ValueError, match="aggregation"):
        TeacherSet([t1, t2], aggregation="mean")


def test_teachers_with_different_vocabularies_are_refused():
    student = tiny_llama(seed=2)
    tset = TeacherSet([tiny_llama(seed=1), tiny_llama(seed=3, vocab=128)])
    with pytest.raises(ValueError, match="different vocabularies.*cross-tokenizer"):
        DistillationEngine(tset, DistillationConfig(**CFG, vocab_alignment="truncate")).setup(student)


def test_hidden_terms_with_several_teachers_are_refused_and_fine_with_one():
    t1, t2 = tiny_bert("BertModel", seed=1), tiny_bert("BertModel", seed=3)
    student = tiny_bert("BertModel", seed=2, layers=1).eval()  # no dropout: forwards compared
    cfg = DistillationConfig(
        task="encoder", loss_terms="embedding_mse", feature_pairs="encoder.layer.0=encoder.layer.1"
    )
    with pytest.raises(ValueError, match="not logit or embedding terms.*nearest"):
        DistillationEngine(TeacherSet([t1, t2]), cfg).setup(student)
    batch = _batch(TokenDataset(labels=None, pad_last=2), [0, 1, 2])
    results = []
    for teacher in (TeacherSet([t1]), t1):
        engine = DistillationEngine(teacher, cfg)
        engine.setup(student)
        results.append(engine.compute(batch, student(**batch)).loss)
    assert torch.equal(*results)


def test_embedding_terms_get_one_projector_per_teacher():
    t1, t2 = tiny_bert("BertModel", seed=1, hidden=48), tiny_bert("BertModel", seed=3, hidden=64)
    student = tiny_bert("BertModel", seed=2, layers=1).eval()  # no dropout: forwards compared
    batch = _batch(TokenDataset(labels=None, pad_last=2), [0, 1, 2, 3])
    cfg = DistillationConfig(task="encoder", loss_terms="embedding_mse")
    engine = DistillationEngine(TeacherSet({"a": t1, "b": t2}, [0.25, 0.75]), cfg)
    engine.setup(student)
    result = engine.compute(batch, student(**batch))
    assert sorted(engine.projectors) == ["embedding__embedding_mse__a", "embedding__embedding_mse__b"]
    result.loss.backward()
    assert all(p.grad is not None for p in engine.projectors.parameters())

    def pooled(model):
        hidden = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)

    with torch.no_grad():
        s = pooled(student)
        expect = sum(
            w * ((engine.projectors[f"embedding__embedding_mse__{n}"](s) - pooled(t)) ** 2).mean()
            for n, t, w in (("a", t1, 0.25), ("b", t2, 0.75))
        )
    assert float(result.loss.detach()) == pytest.approx(float(expect), rel=1e-5)


def test_offload_moves_a_teacher_in_and_back():
    module = nn.Linear(2, 2)
    runner = Teacher(module, device="cpu")
    runner.place(nn.Linear(2, 2))
    with runner.moved_to("cpu"):
        assert runner.device == torch.device("cpu")
    assert runner.device == torch.device("cpu") and not any(p.requires_grad for p in module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves teachers between CPU and a GPU")
def test_offloaded_teachers_visit_the_gpu_only_for_their_rows():
    t1, t2 = _two_teachers()
    student = tiny_llama(seed=2).cuda()
    batch = {k: v.cuda() for k, v in _batch(TokenDataset(), [0, 1, 2]).items()}
    resident = TeacherSet([t1.cuda(), t2.cuda()], [0.4, 0.6])
    expect = _loss_and_grads(resident, student, batch)[0].loss
    offloaded = TeacherSet([t1.cpu(), t2.cpu()], [0.4, 0.6], offload=True)
    got = _loss_and_grads(offloaded, student, batch)[0].loss
    assert all(p.device.type == "cpu" for t in (t1, t2) for p in t.parameters())
    torch.testing.assert_close(got, expect)


def test_fused_loss_true_with_several_teachers_is_refused():
    with pytest.raises(ValueError, match="fused_loss=True needs one resident teacher"):
        DistillationEngine(TeacherSet(list(_two_teachers())), DistillationConfig(**CFG, fused_loss=True))


# ---------------------------------------------------------------------- DistillNearest / DistillWeighted
def _synthetic(n=120, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, 16, generator=g) * 3
    relevant = centres[labels] + torch.randn(n, 16, generator=g)
    noise = torch.randn(n, 16, generator=g)
    return relevant, noise, labels


@pytest.mark.parametrize("score", ["knn", "linear_probe", "logme"])
def test_every_score_ranks_the_relevant_features_first(score):
    relevant, noise, labels = _synthetic()
    assert score_features(relevant, labels, score) > score_features(noise, labels, score)


class _Features(nn.Module):
    """A teacher whose 'features' are a fixed table (looked up by example index)."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, index):
        return self.table[index]


def test_score_teachers_weights_and_nearest():
    relevant, noise, labels = _synthetic()
    teachers = {"noise": _Features(noise), "relevant": _Features(relevant)}
    data = [(idx, labels[idx]) for idx in torch.arange(len(labels)).chunk(4)]
    for score in ("knn", "linear_probe", "logme"):
        scores = score_teachers(teachers, data, score)
        assert scores[1] > scores[0], score
    scores = score_teachers(teachers, data, "knn")
    nearest = TeacherSet.nearest(teachers, scores)
    assert nearest.names == ["relevant"] and nearest.runs_as_single
    weighted = TeacherSet.weighted(teachers, scores, tau=0.1)
    assert float(weighted.weights.sum()) == pytest.approx(1.0) and weighted.weights[1] > weighted.weights[0]
    assert torch.equal(softmax_weights(scores, 1e-6), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(softmax_weights(scores, math.inf), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(softmax_weights(scores, 1e6), torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="tau must be > 0"):
        TeacherSet.weighted(teachers, scores, tau=0.0)
    with pytest.raises(ValueError, match="score must be one of"):
        score_teachers(teachers, data, "leep")


def test_accuracy_score_uses_the_teachers_own_predictions():
    """A teacher trained on the target's labels is judged by its predictions, whatever its representation."""
    labels = torch.arange(40) % 4

    class Predictor(nn.Module):
        def __init__(self, errors: int):
            super().__init__()
            wrong = labels.clone()
            wrong[:errors] = (wrong[:errors] + 1) % 4
            self.register_buffer("logits", F.one_hot(wrong, 4).float() * 5)

        def forward(self, index):
            return {"logits": self.logits[index]}

    teachers = {"good": Predictor(errors=2), "bad": Predictor(errors=20)}
    data = [(idx, labels[idx]) for idx in torch.arange(40).chunk(3)]
    assert score_teachers(teachers, data, "accuracy") == pytest.approx([38 / 40, 20 / 40])
    assert score_features(torch.eye(4)[labels], labels, "accuracy") == 1.0
    with pytest.raises(ValueError, match="another label space"):
        score_features(torch.randn(40, 3), labels, "accuracy")
    with pytest.raises(ValueError, match=r"one prediction per example"):
        score_teachers([tiny_llama()], [(torch.randint(0, 96, (2, 5)), torch.tensor([0, 1]))], "accuracy")


def _logme_reference(features, labels):
    """LogME as its authors' NumPy code computes it (You et al. 2021: SVD of F^T F, fixed point on alpha, beta)."""
    import numpy as np

    f, n, d = features.T, features.shape[0], features.shape[1]
    v, s, vh = np.linalg.svd(f @ features, full_matrices=True)
    out = []
    for c in range(labels.max() + 1):
        y = (labels == c).astype(float)
        alpha, beta, lam, tmp = 1.0, 1.0, 1.0, vh @ (f @ y)
        for _ in range(100):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / alpha_de
            beta_de = ((y - features @ m) ** 2).sum()
            beta = (n - gamma) / beta_de
            if abs(alpha / beta - lam) / lam < 1e-6:
                break
            lam = alpha / beta
        ev = d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
        out.append((ev - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi)) / n)
    return float(np.mean(out))


def test_logme_matches_the_reference_algorithm():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.arange(200) % 3
    features = rng.normal(size=(200, 12))
    features[:, 0] += 2 * labels
    ours = score_features(torch.tensor(features), torch.tensor(labels), "logme", tol=1e-6)
    assert ours == pytest.approx(_logme_reference(features, labels), rel=1e-6)


# ---------------------------------------------------------------------- per-class DistillWeighted
class _Linear(nn.Module):
    """A classifier on ``pixel_values`` (plain module: the engine's ``seq_classification`` path)."""

    def __init__(self, seed, classes=4, width=6):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(width, classes)

    def forward(self, pixel_values):
        return {"logits": self.fc(pixel_values)}


def _classifier_loss(teacher, student, x, **cfg):
    engine = DistillationEngine(teacher, DistillationConfig(**{**CFG, "task": "seq_classification", **cfg}))
    engine.setup(student)
    return engine.compute({"pixel_values": x}, student(pixel_values=x)).loss


def test_per_class_scores_are_per_class_correctness():
    from kd_plugins.distill import score_teachers_per_class
    from kd_plugins.distill.teacher_scores import score_features_per_class

    labels = torch.arange(40) % 4

    class Predictor(nn.Module):
        def __init__(self, wrong_classes):
            super().__init__()
            pred = labels.clone()
            for c in wrong_classes:
                pred[labels == c] = (c + 1) % 4
            self.register_buffer("logits", F.one_hot(pred, 4).float() * 5)

        def forward(self, index):
            return {"logits": self.logits[index]}

    teachers = {"low": Predictor([2, 3]), "high": Predictor([0, 1])}
    data = [(idx, labels[idx]) for idx in torch.arange(40).chunk(3)]
    scores = score_teachers_per_class(teachers, data)
    assert torch.equal(scores, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64))
    # balanced classes: the per-class scores average to the global score; LogME's columns average to its score
    relevant, _, y = _synthetic()
    for score in ("knn", "linear_probe", "logme"):
        per_class = score_features_per_class(relevant, y, score)
        assert per_class.shape == (4,)
        assert float(per_class.mean()) == pytest.approx(score_features(relevant, y, score), rel=1e-9), score
    with pytest.raises(ValueError, match=r"classes \[4\] have none"):
        score_features_per_class(relevant, y, "knn", num_classes=5)
    with pytest.raises(ValueError, match="outside num_classes"):
        score_features_per_class(relevant, y, "knn", num_classes=3)


def test_class_weighted_set_is_the_formula_and_runs_the_reference_once():
    ref, a, b = _Linear(1), _Linear(2), _Linear(3)
    student = _Linear(4)
    calls = {"ref": 0, "a": 0, "b": 0}
    for name, t in (("ref", ref), ("a", a), ("b", b)):
        t.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[0.6, 0.6, 0.6, 0.6], [1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 0.8]])
    teachers = {"ref": ref, "a": a, "b": b}
    for aggregation in ("mixture", "sum_of_divergences"):
        tset = TeacherSet.class_weighted(teachers, scores, tau=0.1, aggregation=aggregation)
        assert tset.class_relevance.reference == 0  # the best mean score
        calls.update(ref=0, a=0, b=0)
        loss = _classifier_loss(tset, student, x).detach()
        assert calls == {"ref": 1, "a": 1, "b": 1}  # the reference once, its outputs reused
        with torch.no_grad():
            zs = [t(x)["logits"] for t in (ref, a, b)]
            w = torch.softmax(torch.softmax(zs[0].double(), -1) @ scores.double().T / 0.1, -1).float()
            s = student(x)["logits"]
        logps = torch.stack([torch.log_softmax(z / 2.0, -1) for z in zs], 1)  # [B, K, C] at T = 2
        if aggregation == "mixture":
            expected = _kl_rows(torch.logsumexp(w.log().unsqueeze(-1) + logps, 1), s, 2.0).mean()
        else:
            expected = sum(w[:, i] * _kl_rows(logps[:, i], s, 2.0) for i in range(3)).mean()
        assert float(loss) == pytest.approx(float(expected), rel=1e-5), aggregation
    assert "class relevance" in repr(tset)
    with pytest.raises(ValueError, match="weights_and_reference"):
        tset.row_weights({"pixel_values": x}, 5)


def test_class_weighted_with_equal_class_scores_is_weighted():
    t1, t2, student = _Linear(1), _Linear(2), _Linear(4)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    flat = torch.tensor([[0.8] * 4, [0.6] * 4])
    a = _classifier_loss(TeacherSet.class_weighted([t1, t2], flat, tau=0.1), student, x)
    b = _classifier_loss(TeacherSet.weighted([t1, t2], [0.8, 0.6], tau=0.1), student, x)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    one = _classifier_loss(TeacherSet.class_weighted([t1], flat[:1]), student, x)
    assert torch.equal(one, _classifier_loss(t1, student, x))  # one teacher: the single-teacher path


def test_class_weighted_bad_input_is_refused():
    t1, t2 = _Linear(1), _Linear(2)
    scores = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"\[teachers, classes\] = \[2, C\]"):
        TeacherSet.class_weighted([t1, t2], torch.rand(3, 4))
    with pytest.raises(ValueError, match="not one of the teachers"):
        TeacherSet.class_weighted({"a": t1, "b": t2}, scores, reference="c")
    with pytest.raises(ValueError, match="tau must be > 0"):
        TeacherSet.class_weighted([t1, t2], scores, tau=0.0)
    with pytest.raises(ValueError, match="outside 0..1"):
        TeacherSet.class_weighted([t1, t2], scores, reference=2)
    relevance = TeacherSet.class_weighted([t1, t2], scores).class_relevance
    with pytest.raises(ValueError, match="one of weights, router, teacher_column and class_relevance"):
        TeacherSet([t1, t2], [0.5, 0.5], class_relevance=relevance)
    with pytest.raises(ValueError, match=r"\[B, 6\] class prediction"):  # scores over 6 classes, logits over 4
        _classifier_loss(TeacherSet.class_weighted([t1, t2], torch.rand(2, 6)), _Linear(4), torch.randn(3, 6))
    student = tiny_llama(seed=2)
    lm = TeacherSet.class_weighted([tiny_llama(seed=1), tiny_llama(seed=3)], torch.rand(2, 96))
    with pytest.raises(ValueError, match="token-level tasks"):  # [B, L, V] logits: not one prediction per row
        _loss_and_grads(lm, student, _batch(TokenDataset(), [0, 1]))
