"""TopicAwareBatches: batches drawn from clusters of the cached teacher embeddings (TAS)."""

from types import SimpleNamespace

import pytest
import torch
from test_pairs import PAIR_CFG, PairDataset, _Tok
from tiny import tiny_bert, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig, PairCollator, TopicAwareBatches, build_teacher_cache
from kd_plugins.distill import TeacherCache, spherical_kmeans


def _blobs(n_per=10, centers=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(centers, dim, generator=g), dim=1) * 5
    x = torch.cat([c[i] + 0.1 * torch.randn(n_per, dim, generator=g) for i in range(centers)])
    return x, torch.arange(centers).repeat_interleave(n_per)


def test_spherical_kmeans_recovers_separated_clusters_deterministically():
    x, truth = _blobs()
    labels = spherical_kmeans(x, 3, seed=1)
    for c in range(3):  # each true blob maps to one label, all labels distinct
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 3
    assert torch.equal(labels, spherical_kmeans(x, 3, seed=1))
    assert spherical_kmeans(x, 1).unique().tolist() == [0]
    dup = torch.cat([x[:1].repeat(5, 1), x[-1:]])  # 5 identical rows + 1: seeding runs out of distinct rows
    torch.manual_seed(123)
    first = spherical_kmeans(dup, 4, seed=2)
    torch.manual_seed(456)  # the global RNG must not matter
    assert torch.equal(first, spherical_kmeans(dup, 4, seed=2))
    assert first.unique().numel() == 4  # two empty clusters re-seeded, each with a row of its own
    with pytest.raises(ValueError, match="n_clusters"):
        spherical_kmeans(x, 31)
    with pytest.raises(ValueError, match="non-empty"):
        spherical_kmeans(torch.zeros(0, 4), 1)


def _cache_over(ds, emb):
    """An embedding cache whose entry for example i is emb[i] (keys from the anchors and the positives)."""
    cache = build_teacher_cache(tiny_bert(seed=0), ds, progress=False)
    tensors = dict(cache.tensors)
    tensors["embeddings"] = tensors["embeddings"].clone()
    for i in range(len(ds)):
        for side in ("", "positive_"):
            ids = torch.tensor([ds[i][side + "input_ids"]])
            tensors["embeddings"][cache.rows_of(ids)[0], : emb.shape[1]] = emb[i]
            tensors["embeddings"][cache.rows_of(ids)[0], emb.shape[1] :] = 0
    return TeacherCache(tensors, cache.metadata)


def test_each_pass_yields_every_example_once_in_single_topic_batches():
    ds = PairDataset(n=30, seed=3)
    x, truth = _blobs(n_per=10, centers=3)
    batches = TopicAwareBatches(ds, _cache_over(ds, x), batch_size=4, n_clusters=3, seed=0)
    assert sorted(batches.cluster_sizes) == [10, 10, 10] and len(batches) == 30
    order0 = batches.batches(0)
    assert sorted(i for b in order0 for i in b) == list(range(30))
    pure = [b for b in order0 if truth[b].unique().numel() == 1]
    assert len(pure) >= 3 * (10 // 4)  # every full batch of a cluster is single-topic; only leftovers mix
    assert batches.batches(1) != order0 and batches.batches(0) == order0  # new order per pass, reproducible
    first = [ex["input_ids"] for ex in batches]  # iteration walks pass 0, then pass 1
    assert first == [ds[i]["input_ids"] for b in order0 for i in b]
    second = [ex["input_ids"] for ex in batches]
    assert second == [ds[i]["input_ids"] for b in batches.batches(1) for i in b]
    batches.set_epoch(0)
    assert [ex["input_ids"] for ex in batches] == first


def test_topic_batches_refuse_bad_input_with_the_fix():
    ds = PairDataset(n=8)
    cache = build_teacher_cache(tiny_bert(seed=0), ds, progress=False)
    with pytest.raises(ValueError, match="side must be one of"):
        TopicAwareBatches(ds, cache, 2, side="title")
    with pytest.raises(ValueError, match="batch_size"):
        TopicAwareBatches(ds, cache, 0)
    with pytest.raises(ValueError, match=r"n_clusters must be in \[1, 8\]"):
        TopicAwareBatches(ds, cache, 2, n_clusters=9)
    with pytest.raises(ValueError, match="kind='embedding'"):
        TopicAwareBatches(ds, SimpleNamespace(kind="topk"), 2)
    with pytest.raises(KeyError, match="not in the teacher cache"):
        TopicAwareBatches(PairDataset(n=8, seed=5), cache, 2)


def test_topic_batches_train_on_an_unmodified_trainer(tmp_out):
    teacher, student = tiny_bert(seed=0), tiny_bert(seed=1, layers=1)
    ds = PairDataset(n=16)
    cache = build_teacher_cache(teacher, ds, progress=False)
    data = TopicAwareBatches(ds, cache, batch_size=4, n_clusters=2, side="both")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = training_args(tmp_out, max_steps=5, per_device_train_batch_size=4, remove_unused_columns=False)
    trainer = Trainer(
        model=student,
        args=args,
        train_dataset=data,
        data_collator=PairCollator(_Tok()),
        callbacks=[DistillationCallback(cache, DistillationConfig(**PAIR_CFG))],
    )
    trainer.train()  # 5 steps over 4 batches per pass: crosses a pass boundary
    assert trainer.state.global_step == 5
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
