"""kd_plugins.speculative.frequent_vocab: a draft whose LM head keeps only the frequent tokens (FR-Spec)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_llama

from kd_plugins.speculative import (
    SubsetLMHead,
    expected_acceptance,
    frequent_token_ids,
    measure_speculative,
    restrict_draft_vocab,
)


def _no_eos(model):
    model.generation_config.eos_token_id = None
    return model


def test_frequent_token_ids_counts_ranks_and_keeps_the_always_ids():
    rows = [[5, 5, 5, 7, 7, 9], torch.tensor([7, 5, 3])]
    assert frequent_token_ids(rows, 2, vocab_size=12).tolist() == [5, 7]  # 5: 4 times, 7: 3 times
    assert frequent_token_ids(rows, 2, vocab_size=12, always=[11]).tolist() == [5, 7, 11]
    assert frequent_token_ids(rows, 3, vocab_size=12).tolist() == [3, 5, 7]  # tie between 3 and 9: the lower id
    batch = {
        "input_ids": torch.tensor([[4, 4, 0, 0], [6, 4, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0]] * 2),
    }
    assert frequent_token_ids([batch], 2, vocab_size=8).tolist() == [4, 6]  # padding (0) not counted
    assert frequent_token_ids(batch, 2, vocab_size=8).tolist() == [4, 6]  # one batch
    assert frequent_token_ids(torch.tensor([[1, 1, 2]]), 1, vocab_size=3).tolist() == [1]
    for bad, match in [
        (dict(data=rows, num_tokens=0, vocab_size=12), "num_tokens"),
        (dict(data=[[1, -100]], num_tokens=1, vocab_size=12), "-100"),
        (dict(data=[[1, 12]], num_tokens=1, vocab_size=12), "vocab_size"),
        (dict(data=[[]], num_tokens=1, vocab_size=12), "no token ids"),
        (dict(data=rows, num_tokens=1, vocab_size=12, always=[12]), "always"),
    ]:
        with pytest.raises(ValueError, match=match):
            frequent_token_ids(**bad)


def test_subset_head_matches_the_full_head_on_kept_tokens_and_excludes_the_rest():
    head = torch.nn.Linear(8, 20, bias=True)
    keep = torch.tensor([1, 4, 5, 19])
    sub = SubsetLMHead(head, keep)
    x = torch.randn(2, 3, 8)
    full, cut = head(x), sub(x)
    assert cut.shape == full.shape
    torch.testing.assert_close(cut[..., keep], full[..., keep])
    others = torch.ones(20, dtype=torch.bool)
    others[keep] = False
    assert bool((cut[..., others] == torch.finfo(cut.dtype).min).all())
    assert torch.softmax(cut, -1)[..., others].max() == 0
    with pytest.raises(ValueError, match="repeated"):
        SubsetLMHead(head, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep_ids"):
        SubsetLMHead(head, torch.tensor([20]))


def test_restricted_draft_serves_assisted_generation_losslessly():
    target = _no_eos(tiny_llama(vocab=96, layers=2, seed=0))
    draft = _no_eos(copy.deepcopy(target))
    embed_before = draft.get_input_embeddings().weight.clone()
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    outputs = [
        target.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
        )[0, len(p) :]
        for p in prompts
    ]
    seqs = [torch.cat([torch.tensor(p), o])[None] for p, o in zip(prompts, outputs)]
    with torch.no_grad():  # the target's greedy choice at every position of the texts
        choices = [target(s).logits.argmax(-1) for s in seqs]
    distinct = len(set(torch.cat(choices, 1).tolist()[0]))
    keep = frequent_token_ids(choices, distinct, vocab_size=96)
    assert keep.numel() == distinct < 96
    restrict_draft_vocab(draft, keep)
    assert isinstance(draft.get_output_embeddings(), SubsetLMHead) and not draft.config.tie_word_embeddings
    torch.testing.assert_close(draft.get_input_embeddings().weight, embed_before)  # the embeddings are not cut
    report = measure_speculative(target, draft, prompts, num_draft_tokens=3, max_new_tokens=12)
    assert report.all_lossless
    # A copy of the target cut to the target's greedy choices on these texts: every draft token accepted.
    assert report.acceptance_rate == 1.0
    assert expected_acceptance(target, draft, seqs, temperature=None).mean == 1.0
    # Where the target's next token is cut from the draft, the draft cannot agree with it.
    narrow = restrict_draft_vocab(_no_eos(copy.deepcopy(target)), torch.tensor([0, 1]))
    assert expected_acceptance(target, narrow, seqs, temperature=None).mean < 1.0


def test_restricted_draft_refuses_to_save_and_to_be_restricted_twice(tmp_path):
    draft = restrict_draft_vocab(tiny_llama(vocab=96, layers=1), torch.arange(10))
    with pytest.raises(RuntimeError, match="Save the draft before restricting it"):
        draft.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="already restricted"):
        restrict_draft_vocab(draft, torch.arange(5))
    with pytest.raises(ValueError, match="nn.Linear"):
        restrict_draft_vocab(torch.nn.Linear(2, 2), torch.arange(1))
