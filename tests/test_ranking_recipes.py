"""FIRST prompt/identifier/inference helpers on a tiny causal LM, the Trans-Encoder loop and the retrieval recipe
(tiny random models; one small real-tokenizer check)."""

import pytest
import torch
from tiny import tiny_bert, tiny_llama

from kd_plugins.losses import get_loss_function
from kd_plugins.ranking import (
    BiEncoder,
    CrossEncoder,
    RerankGroups,
    build_listwise_prompt,
    collate_first,
    distill_loss_fn,
    first_model_loss,
    first_rerank,
    first_scores,
    first_training_example,
    identifier_token_ids,
    mine_candidates,
    rerank_metrics,
    sliding_window_rerank,
    train_bi_encoder,
    train_cross_encoder,
    trans_encoder,
)
from kd_plugins.ranking.trans_encoder import bi_encoder_scores, cross_encoder_scores

CORPUS = [
    "the bank raised interest rates again",
    "shares fell on the stock market",
    "the team won the cup final",
    "a new phone was launched today",
    "the minister announced an election",
    "the film won an award",
    "rank the passages based on their relevance to the search query",
    "passages above all should be included",
    "the output format should be identifiers in descending order of relevance",
] * 3


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained in milliseconds on a toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from benchmarks.data import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


# ---------------------------------------------------------------- FIRST


def test_prompt_builder():
    p = build_listwise_prompt("rates", ["the bank raised rates", "the team won"], max_passage_words=3)
    assert p.endswith("\n[") and "[A] the bank raised\n[B] the team won" in p
    assert "Search Query: rates." in p and "2 passages" in p
    with pytest.raises(ValueError, match="sliding_window_rerank"):
        build_listwise_prompt("q", ["x"] * 21)
    with pytest.raises(ValueError, match="distinct"):
        build_listwise_prompt("q", ["x", "y"], identifiers=["A", "A"])


def test_identifier_tokens(bpe_tokenizer, minilm_tokenizer):
    ids = identifier_token_ids(bpe_tokenizer, list("ABCDE"))
    assert len(set(ids)) == 5
    for letter, i in zip("ABCDE", ids):
        assert bpe_tokenizer.encode("[" + letter, add_special_tokens=False)[-1] == i
    with pytest.raises(ValueError, match="'XQZW' is not a single"):
        identifier_token_ids(bpe_tokenizer, ["A", "XQZW"])
    # a real WordPiece tokenizer: letters are single tokens, a rare word is not
    assert len(identifier_token_ids(minilm_tokenizer, list("ABCDEFGHIJKLMNOPQRST"))) == 20
    with pytest.raises(ValueError, match="zebroidal"):
        identifier_token_ids(minilm_tokenizer, ["zebroidal"])
    with pytest.raises(ValueError, match="repeated"):
        identifier_token_ids(minilm_tokenizer, ["A", "a"])  # uncased: same token


def test_first_rerank_is_one_forward_pass(bpe_tokenizer):
    model = tiny_llama(vocab=len(bpe_tokenizer), hidden=32, layers=2, seed=0).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    passages = ["the bank raised rates", "the team won the cup", "a new phone", "the film won"]
    order, scores = first_rerank(model, bpe_tokenizer, "interest rates", passages)
    assert len(calls) == 1
    ids = identifier_token_ids(bpe_tokenizer, list("ABCD"))
    enc = bpe_tokenizer(build_listwise_prompt("interest rates", passages), return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits[0, -1, ids]
    assert torch.allclose(scores, ref, atol=1e-5)
    assert order == torch.argsort(ref, descending=True, stable=True).tolist()
    # batched scoring with right padding reads each row's last real token
    enc2 = bpe_tokenizer(
        [build_listwise_prompt("interest rates", passages), build_listwise_prompt("x", passages)],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        batch = first_scores(model, enc2["input_ids"], ids, attention_mask=enc2["attention_mask"])
    assert torch.allclose(batch[0], ref, atol=1e-4)


def test_first_training_overfits_target_order(bpe_tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(bpe_tokenizer), hidden=32, layers=1, seed=1)
    passages = ["the bank raised rates", "the team won the cup", "a new phone", "the film won"]
    target = [2, 0, 3, 1]
    ex = first_training_example(bpe_tokenizer, "phones", passages, target)
    ids = identifier_token_ids(bpe_tokenizer, list("ABCD"))
    assert ex.input_ids[ex.score_position + 1] == ids[2]  # the first target token is the top identifier
    assert ex.labels[: ex.score_position + 1] == [-100] * (ex.score_position + 1)
    assert ex.labels[-1] == bpe_tokenizer.eos_token_id and ex.target_ranks == [2, 4, 1, 3]
    ex2 = first_training_example(bpe_tokenizer, "banks", passages[:3], [0, 1, 2])
    batch = collate_first([ex, ex2], bpe_tokenizer.pad_token_id)
    assert batch["candidate_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    total, lm, rank = first_model_loss(model, batch, ids, return_parts=True)
    assert torch.isfinite(total) and total.item() == pytest.approx(lm.item() + 10 * rank.item(), rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    one = collate_first([ex], bpe_tokenizer.pad_token_id)
    for _ in range(25):
        loss = first_model_loss(model, one, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    order, _ = first_rerank(model, bpe_tokenizer, "phones", passages)
    assert order == target
    with pytest.raises(ValueError, match="permutation"):
        first_training_example(bpe_tokenizer, "q", passages, [0, 1, 1, 2])


def test_sliding_window():
    score = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.0, 0.7, 0.4, 0.6])
    seen = []

    def oracle(idx):
        seen.append(list(idx))
        return sorted(idx, key=lambda i: -score[i].item())

    order = sliding_window_rerank(oracle, 10, window=4, stride=2)
    assert sorted(order) == list(range(10))
    assert order[:2] == [3, 5]  # the top `stride` items bubble to the front
    assert seen[0] == [6, 7, 8, 9] and len(seen) == 4
    assert sliding_window_rerank(oracle, 3, window=20, stride=10) == [1, 2, 0]
    with pytest.raises(ValueError, match="permutation"):
        sliding_window_rerank(lambda idx: list(idx)[:-1], 5, window=4, stride=2)


# ---------------------------------------------------------------- Trans-Encoder

PAIRS = [
    ("the bank raised rates", "interest rates went up"),
    ("the team won", "a cup final victory"),
    ("a new phone", "the film won an award"),
    ("the minister spoke", "an election was announced"),
    ("shares fell", "the stock market dropped"),
    ("a new phone", "the team won"),
]


def _bi(tok, seed):
    return BiEncoder(tiny_bert(vocab=tok.vocab_size, hidden=32, layers=1, seed=seed).eval(), tok, max_length=16)


def _cross(tok, seed, **kw):
    m = tiny_bert("BertForSequenceClassification", vocab=tok.vocab_size, hidden=32, layers=2, seed=seed, num_labels=1)
    return CrossEncoder(m, tok, max_length=32, **kw)


def test_trans_encoder_mutual_cycle(minilm_tokenizer):
    tok = minilm_tokenizer
    bis = [_bi(tok, 0), _bi(tok, 1)]
    crosses = [_cross(tok, 2), _cross(tok, 3)]
    expected_bi = (1 + torch.stack([bi_encoder_scores(b, PAIRS) for b in bis]).mean(0)) / 2
    hist = trans_encoder(
        bis,
        crosses,
        PAIRS,
        cycles=1,
        cross_epochs=3,
        bi_epochs=3,
        cross_batch_size=4,
        bi_batch_size=4,
        cross_lr=1e-3,
        bi_lr=1e-3,
        evaluate=lambda c: {"score": float(c)},
    )
    assert torch.allclose(hist.bi_labels[0], expected_bi, atol=1e-6)  # averaged, affine-mapped cosines
    assert ((hist.bi_labels[0] >= 0) & (hist.bi_labels[0] <= 1)).all()
    assert torch.allclose(
        hist.cross_labels[0], torch.stack([cross_encoder_scores(c, PAIRS) for c in crosses]).mean(0), atol=1e-6
    )
    assert hist.best_cycle == 0


def test_trans_encoder_steps_move_towards_pseudo_labels(minilm_tokenizer):
    from kd_plugins.ranking.trans_encoder import train_bi_on_labels, train_cross_on_labels

    tok = minilm_tokenizer
    cross = _cross(tok, 4)
    y = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    before = torch.nn.functional.binary_cross_entropy(cross_encoder_scores(cross, PAIRS, symmetric=False), y)
    train_cross_on_labels(cross, PAIRS, y, epochs=8, batch_size=6, lr=3e-3)
    after = torch.nn.functional.binary_cross_entropy(cross_encoder_scores(cross, PAIRS, symmetric=False), y)
    assert after < before
    bi = _bi(tok, 5)
    mse0 = (bi_encoder_scores(bi, PAIRS) - y).pow(2).mean()
    train_bi_on_labels(bi, PAIRS, y, epochs=8, batch_size=6, lr=3e-3)
    assert (bi_encoder_scores(bi, PAIRS) - y).pow(2).mean() < mse0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_cross_on_labels(cross, PAIRS, y - 0.5)
    with pytest.raises(ValueError, match="target_map"):
        trans_encoder(bi, cross, PAIRS, target_map="tanh")


# ---------------------------------------------------------------- retrieval recipe


def test_mine_candidates_and_metrics():
    q = torch.eye(4)
    d = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0.8, 0, 0.2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    g = mine_candidates(q, d, 3, relevant=[1, 2, 4, 5], queries=list("abcd"))
    assert g.candidates[0].tolist() == [0, 1, 3] and g.positive.tolist() == [1, 0, 0, 0]
    topics_q, topics_d = ["x", "x", "y", "y"], ["x", "x", "x", "y", "y", "y"]
    g2 = mine_candidates(
        q,
        d,
        3,
        relevant=[1, 2, 4, 5],
        queries=list("abcd"),
        query_topics=topics_q,
        doc_topics=topics_d,
        force_positive=True,
    )
    assert g2.candidates[0].tolist() == [1, 0, 2] and (g2.positive == 0).all()
    assert set(g2.candidates[2].tolist()) == {3, 4, 5}
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.0, 0.0, 1.0]])
    m = rerank_metrics(scores, torch.tensor([0, 0, -1]))
    assert m["mrr"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["ndcg@10"] == pytest.approx((1 / torch.log2(torch.tensor(4.0)).item() + 1) / 3)
    # ties are pessimistic
    assert rerank_metrics(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))["mrr"] == 0.5


def test_distill_loss_fn_routing():
    s = torch.randn(3, 5, dtype=torch.float64)
    t = torch.randn(3, 5, dtype=torch.float64)
    pos = torch.tensor([0, 1, 4])
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[torch.arange(3), pos] = False
    assert distill_loss_fn("cprd")(s, t, pos).item() == pytest.approx(
        get_loss_function("cprd")(s[keep].reshape(3, 4), t[keep].reshape(3, 4)).item()
    )
    assert distill_loss_fn("pld")(s, t, pos).item() == pytest.approx(get_loss_function("pld")(s, t, labels=pos).item())
    assert distill_loss_fn("margin_mse")(s, t, pos).item() == pytest.approx(
        get_loss_function("margin_mse")(s, t, positive_index=pos).item()
    )


def test_cross_encoder_cache_and_students(minilm_tokenizer):
    tok = minilm_tokenizer
    docs = [
        "interest rates went up",
        "the stock market dropped",
        "a cup final victory",
        "the film won an award",
        "an election was announced",
        "the phone has a camera",
    ]
    queries = ["bank rates", "shares fell", "team won", "new film"]
    groups = RerankGroups(
        queries, torch.tensor([[0, 1, 2], [1, 0, 3], [2, 4, 5], [3, 2, 1]]), torch.zeros(4, dtype=torch.long)
    )
    cross = _cross(tok, 6, freeze_layers=1)
    assert cross.supports_cache
    cross.eval()
    with torch.no_grad():
        full = cross(["bank rates", "team won"], ["interest rates went up", "a cup final victory now"])
        cached = cross.upper(
            *cross.lower(["bank rates", "team won"], ["interest rates went up", "a cup final victory now"])
        )
    assert torch.allclose(full, cached, atol=1e-5)
    frozen = [n for n, p in cross.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("layer.0." in n for n in frozen)
    assert not any("layer.1." in n for n in frozen)
    losses, scores = train_cross_encoder(cross, groups, docs, steps=6, batch_queries=2, lr=1e-3, return_scores=True)
    assert torch.allclose(scores, cross.score_groups(groups, docs), atol=1e-5)
    assert all(torch.isfinite(torch.tensor(losses)))
    student_model = tiny_bert(vocab=tok.vocab_size, hidden=32, layers=1, seed=7)
    state = {k: v.clone() for k, v in student_model.state_dict().items()}
    for name in ("margin_mse", "ranknet", "pld", "cprd", "listnet", None):
        student_model.load_state_dict(state)
        losses = train_bi_encoder(
            student_model,
            tok,
            groups,
            docs,
            steps=2,
            batch_queries=2,
            max_length=16,
            teacher_scores=scores,
            distill=name,
        )
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # frozen document tower
    doc_emb = torch.nn.functional.normalize(torch.randn(len(docs), 32), dim=-1)
    train_bi_encoder(
        student_model,
        tok,
        groups,
        docs,
        steps=1,
        batch_queries=2,
        doc_emb=doc_emb,
        teacher_scores=scores,
        distill="listnet",
    )
    with pytest.raises(ValueError, match="teacher_scores"):
        train_bi_encoder(student_model, tok, groups, docs, steps=1, distill="listnet")
    bad = scores.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        train_bi_encoder(
            student_model, tok, groups, docs, steps=1, batch_queries=4, teacher_scores=bad, distill="margin_mse"
        )
