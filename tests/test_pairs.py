"""Pair batches (anchor + positive groups padded separately): collator, engine terms, cache, Trainer wiring."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_bert, training_args
from torch.utils.data import Dataset
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, PairCollator, build_teacher_cache
from kd_plugins.distill import DistillationEngine
from kd_plugins.distill.pairs import split_pairs
from kd_plugins.losses import get_loss, infonce, mean_pool
from kd_plugins.losses.pair import pair_kl

PAIR_CFG = dict(loss_terms={"embedding_mse": 1.0, "infonce": 0.5}, task="encoder", pooling="mean")


class _Tok:
    """The bits of a HF tokenizer PairCollator uses (right padding with id 0)."""

    def pad(self, feats, padding=True, pad_to_multiple_of=None, return_tensors="pt"):
        width = max(len(f["input_ids"]) for f in feats)
        out = {k: torch.zeros(len(feats), width, dtype=torch.long) for k in feats[0]}
        for i, f in enumerate(feats):
            for k, v in f.items():
                out[k][i, : len(v)] = torch.as_tensor(v)
        return out


class PairDataset(Dataset):
    """Short anchors (3-5 tokens) and long positives (9-14 tokens), random ids."""

    def __init__(self, n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            la, lp = int(torch.randint(3, 6, (1,), generator=g)), int(torch.randint(9, 15, (1,), generator=g))
            a, p = torch.randint(4, 96, (la,), generator=g), torch.randint(4, 96, (lp,), generator=g)
            self.items.append(
                {
                    "input_ids": a.tolist(),
                    "attention_mask": [1] * la,
                    "positive_input_ids": p.tolist(),
                    "positive_attention_mask": [1] * lp,
                }
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_collator_pads_each_group_to_its_own_length():
    ds = PairDataset()
    batch = PairCollator(_Tok())([ds[i] for i in range(4)])
    la = max(len(ds[i]["input_ids"]) for i in range(4))
    lp = max(len(ds[i]["positive_input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, la) and batch["positive_input_ids"].shape == (4, lp)
    anchors, positives = split_pairs(batch)
    assert set(anchors) == {"input_ids", "attention_mask"} and set(positives) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="positive_input_ids"):
        PairCollator(_Tok())([{"input_ids": [5, 6]}])


def test_infonce_matches_hand_computation_and_properties():
    torch.manual_seed(0)
    a, p = torch.randn(5, 8), torch.randn(5, 8)
    logits = F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T / 0.1
    expect = F.cross_entropy(logits, torch.arange(5))
    assert torch.allclose(infonce(a, p, temperature=0.1), expect, atol=1e-6)
    same = torch.ones(4, 8)  # identical embeddings: uniform softmax over the batch
    assert torch.allclose(infonce(same, same), torch.log(torch.tensor(4.0)), atol=1e-5)
    eye = torch.eye(4)  # orthogonal, perfectly matched pairs at a low temperature -> ~0
    assert float(infonce(eye, eye, temperature=0.01)) < 1e-6
    sym = infonce(a, p, temperature=0.1, symmetric=True)
    assert torch.allclose(sym, 0.5 * (expect + F.cross_entropy(logits.T, torch.arange(5))), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        infonce(a[:1], p[:1])


def test_pair_kl_matches_hand_computation_and_properties():
    torch.manual_seed(0)
    a, p, ta, tp = (torch.randn(5, 8) for _ in range(4))
    cos = lambda x, y: F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T  # noqa: E731
    t = F.softmax(cos(ta, tp) / 0.1, -1)
    expect = (t * (t.log() - F.log_softmax(cos(a, p) / 0.1, -1))).sum(-1)
    assert torch.allclose(pair_kl(a, p, ta, tp, temperature=0.1, reduction="none"), expect, atol=1e-5)
    assert float(pair_kl(ta, tp, ta, tp)) < 1e-6  # zero when the student scores like the teacher
    assert float(pair_kl(3 * ta, 0.5 * tp, ta, tp)) < 1e-6  # cosine scores: invariant to embedding scale
    assert float(pair_kl(a, p, ta, tp)) > 0
    sharper = pair_kl(a, p, ta, tp, temperature=0.1, teacher_temperature=0.01, reduction="none")
    t_sharp = F.softmax(cos(ta, tp) / 0.01, -1)
    ref = (t_sharp * (t_sharp.clamp_min(1e-30).log() - F.log_softmax(cos(a, p) / 0.1, -1))).sum(-1)
    assert torch.allclose(sharper, ref, atol=1e-4)
    a.requires_grad_(True)
    pair_kl(a, p, ta, tp).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="teacher pairs"):
        pair_kl(a, p, ta[:4], tp[:4])
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        pair_kl(a, p, ta, tp, teacher_temperature=0.0)
    with pytest.raises(ValueError, match="teacher's anchor and positive"):
        get_loss("pair_kl")(a, p)


def _engine(teacher_or_cache, student, **cfg):
    engine = DistillationEngine(teacher_or_cache, DistillationConfig(**{**PAIR_CFG, **cfg}))
    engine.setup(student)
    return engine


def test_pair_batch_terms_equal_the_hand_computed_objective():
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1, layers=1)
    batch = PairCollator(_Tok())([PairDataset()[i] for i in range(4)])
    anchors, positives = split_pairs(batch)
    s_a, s_p = student(**anchors), student(**positives)
    result = _engine(teacher, student).compute(batch, s_a, positive_outputs=s_p)
    with torch.no_grad():
        t_a, t_p = teacher.eval()(**anchors), teacher(**positives)
    pool = [mean_pool(o.last_hidden_state, g["attention_mask"]) for o, g in ((s_a, anchors), (s_p, positives))]
    tpool = [mean_pool(o.last_hidden_state, g["attention_mask"]) for o, g in ((t_a, anchors), (t_p, positives))]
    mse = F.mse_loss(torch.cat(pool), torch.cat(tpool))
    nce = get_loss("infonce")(pool[0], pool[1])
    assert torch.allclose(result.terms["embedding_mse"], mse, atol=1e-6)
    assert torch.allclose(result.terms["infonce"], nce, atol=1e-6)
    assert torch.allclose(result.loss, mse + 0.5 * nce, atol=1e-6)
    kl = _engine(teacher, student, loss_terms={"pair_kl": 1.0}).compute(batch, s_a, positive_outputs=s_p)
    assert torch.allclose(kl.terms["pair_kl"], pair_kl(pool[0], pool[1], tpool[0], tpool[1]), atol=1e-6)


def test_pair_cache_is_built_from_both_groups_and_matches_the_live_teacher():
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1, layers=1)
    ds = PairDataset()
    cache = build_teacher_cache(teacher, ds, batch_size=5, progress=False)
    assert len(cache) == 2 * len(ds)
    batch = PairCollator(_Tok())([ds[i] for i in (3, 0, 7, 5)])
    anchors, positives = split_pairs(batch)
    s_a, s_p = student(**anchors), student(**positives)
    live = _engine(teacher, student).compute(batch, s_a, positive_outputs=s_p)
    cached = _engine(cache, student).compute(batch, s_a, positive_outputs=s_p)
    for name in ("embedding_mse", "infonce"):
        assert torch.allclose(cached.terms[name], live.terms[name], rtol=1e-5, atol=1e-6), name


def test_pair_errors_are_clear():
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1, layers=1)
    plain = {"input_ids": torch.randint(4, 96, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match="PairCollator"):
        _engine(teacher, student).compute(plain, student(**plain))
    batch = PairCollator(_Tok())([PairDataset()[i] for i in range(3)])
    anchors, _ = split_pairs(batch)
    with pytest.raises(ValueError, match="positive_outputs"):
        _engine(teacher, student).compute(batch, student(**anchors))
    clf = tiny_bert("BertForSequenceClassification", seed=2)
    with pytest.raises(ValueError, match="bare encoder"):
        DistillationEngine(tiny_bert("BertForSequenceClassification"), DistillationConfig(loss_terms="infonce")).setup(
            clf
        )


def test_pair_dataset_trains_on_an_unmodified_trainer_from_a_cache(tmp_out):
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1, layers=1)
    ds = PairDataset()
    cache = build_teacher_cache(teacher, ds, progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = training_args(tmp_out, max_steps=2, remove_unused_columns=False)
    trainer = Trainer(
        model=student,
        args=args,
        train_dataset=ds,
        data_collator=PairCollator(_Tok()),
        callbacks=[DistillationCallback(cache, DistillationConfig(**PAIR_CFG))],
    )
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "kd_loss" in h)
    assert {"kd_embedding_mse", "kd_infonce", "teacher_cosine"} <= set(logs)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
