"""kd_plugins.speculative: analytic acceptance, measured assisted generation, DraftEvalCallback."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny import TokenDataset, tiny_llama, training_args

import kd_plugins
from kd_plugins.losses import total_variation_distance
from kd_plugins.speculative import (
    SpeculativeConfig,
    check_same_vocabulary,
    expected_acceptance,
    expected_tokens_per_round,
    measure_speculative,
    token_acceptance,
)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "assets" / "smollm2-135m-instruct"


def _no_eos(*models):
    """Random tiny models emit their EOS id at random; without it every run has the same length."""
    for m in models:
        m.generation_config.eos_token_id = None
    return models


def _perturbed(model, scale=0.5, seed=3):
    """A draft close to ``model``: same weights with noise on the lm_head (partial agreement)."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = draft.lm_head.weight
        w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return draft


@pytest.fixture(scope="module")
def target():
    return _no_eos(tiny_llama(vocab=96, layers=2, seed=0))[0]


# --------------------------------------------------------------------------------------------- config
def test_config_parses_validates_and_takes_overrides():
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(SpeculativeConfig).parse_args_into_dataclasses(args=["--temperature", "0.7"])
    assert parsed.temperature == 0.7 and parsed.num_draft_tokens == 4
    assert SpeculativeConfig(temperature=0).temperature is None  # 0 means greedy
    with pytest.raises(ValueError, match="temperature"):
        SpeculativeConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpeculativeConfig(num_draft_tokens=0)
    with pytest.raises(TypeError, match="num_draft_tokens"):
        measure_speculative(None, None, ["x"], num_draft_token=3)


# ----------------------------------------------------------------------------------------- analytic
def test_token_acceptance_is_one_minus_tvd_by_hand():
    t = torch.tensor([[2.0, 1.0, 0.1]], dtype=torch.float64)
    s = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    tvd = 0.5 * (p - q).abs().sum()
    alpha = token_acceptance(t, s, temperature=1.0)
    assert alpha.item() == pytest.approx(1 - tvd.item(), abs=1e-12)
    assert alpha.item() == pytest.approx(0.431029, abs=1e-6)  # 1 - TVD of the losses' golden pair
    assert alpha.item() == pytest.approx(1 - total_variation_distance(s, t).item(), abs=1e-12)
    assert token_acceptance(t, s).item() == 0.0 and token_acceptance(t, t * 3).item() == 1.0  # greedy: argmax


def test_acceptance_is_one_for_the_target_itself(target):
    ids = torch.randint(4, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    for temperature in (None, 1.0, 0.5):
        result = expected_acceptance(target, target, [ids], temperature=temperature)
        assert result.mean == pytest.approx(1.0, abs=1e-6) and result.count == 30


def test_acceptance_equals_masked_mean_of_sum_min_by_hand(target):
    draft = _perturbed(target)
    ds = TokenDataset(n=4, seq=9, vocab=96, seed=1, pad_last=3)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    batch["labels"][:, :4] = -100  # a prompt part
    with torch.no_grad():
        p = torch.softmax(target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
        q = torch.softmax(draft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    valid = batch["attention_mask"].bool()
    valid[:, :-1] &= batch["labels"][:, 1:] != -100
    valid[:, -1] = False
    by_hand = (1 - 0.5 * (p - q).abs().sum(-1))[valid].mean().item()
    draft.train()
    result = expected_acceptance(target, draft, [batch], temperature=1.0, per_position=True)
    assert result.mean == pytest.approx(by_hand, abs=1e-6) and result.count == int(valid.sum())
    assert 0.0 < result.mean < 1.0
    assert draft.training  # the draft's train/eval state is restored
    assert not any(p.requires_grad for p in target.parameters())  # the target ran as a frozen Teacher
    (per,) = result.per_position
    assert per.shape == (4, 9) and torch.isnan(per[~valid]).all() and not torch.isnan(per[valid]).any()
    greedy = expected_acceptance(target, draft, [batch])
    assert greedy.mean == pytest.approx((p.argmax(-1) == q.argmax(-1))[valid].float().mean().item())


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


# ------------------------------------------------------------------------------------------- errors
def test_vocabulary_mismatch_and_bad_inputs_are_named(target):
    other = tiny_llama(vocab=128, layers=1, seed=1)
    with pytest.raises(ValueError, match="vocabulary differs"):
        expected_acceptance(target, other, [torch.ones(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="vocabulary differs"):
        measure_speculative(target, other, [[5, 6]])
    with pytest.raises(ValueError, match="tokenizer has 200 tokens"):
        check_same_vocabulary(target, target, tokenizer=type("Tok", (), {"__len__": lambda self: 200})())
    with pytest.raises(ValueError, match="non-empty list"):
        measure_speculative(target, target, [])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        measure_speculative(target, target, [[5, 6], []])
    with pytest.raises(ValueError, match="need the target's tokenizer"):
        measure_speculative(target, target, ["hello"])
    with pytest.raises(ValueError, match="no valid position"):
        all_ignored = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.full((1, 3), -100)}
        expected_acceptance(target, target, [all_ignored])
    with pytest.raises(ValueError, match="T >= 1"):
        expected_acceptance(target, target, [torch.ones(1, 0, dtype=torch.long)])


# -------------------------------------------------------------------------------------- measurement
def _simulated_rounds(per_position: torch.Tensor, prompt_len: int, total_len: int, gamma: int) -> list[int]:
    """Greedy assisted decoding replayed from teacher-forced argmax agreement: a round starting with ``cur`` tokens
    proposes ``min(gamma, total_len - cur - 1)`` tokens and keeps the leading agreeing ones."""
    agree, cur, accepted = per_position[0].tolist(), prompt_len, []
    while cur < total_len:
        proposed = min(gamma, total_len - cur - 1)
        n = 0
        while n < proposed and agree[cur - 1 + n] == 1.0:
            n += 1
        accepted.append(n)
        cur += n + 1
    return accepted


def test_measure_speculative_greedy_is_lossless_and_counts_match_the_analytic_replay(target):
    draft = _no_eos(_perturbed(target))[0]
    prompts, gamma, new = [[5, 6, 7], [8, 9, 10, 11]], 3, 13
    before = {
        k: getattr(draft.generation_config, k, None) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule")
    }
    report = measure_speculative(target, draft, prompts, num_draft_tokens=gamma, max_new_tokens=new)
    assert report.all_lossless and report.lossless == [True, True]
    assert "_get_candidate_generator" not in vars(target)  # the hook is gone
    assert {k: getattr(draft.generation_config, k, None) for k in before} == before
    for proposed, accepted, n_new in zip(report.proposed, report.accepted, report.new_tokens):
        assert all(0 <= a <= p <= gamma for a, p in zip(accepted, proposed))
        assert n_new == new == sum(a + 1 for a in accepted)  # every round adds its accepted tokens and one more
    assert 0.0 < report.acceptance_rate < 1.0
    assert report.tokens_per_target_forward == pytest.approx(1 + report.mean_accepted_per_round)
    # The recorded counts are exactly those replayed from the teacher-forced greedy agreement on the output.
    for ids, accepted in zip(prompts, report.accepted):
        ids = torch.tensor([ids])
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        per = expected_acceptance(target, draft, [out], per_position=True).per_position[0]
        assert accepted == _simulated_rounds(per, ids.shape[1], out.shape[1], gamma)


def test_measure_speculative_with_the_target_as_draft_accepts_everything(target):
    gamma = 4
    report = measure_speculative(
        target, target, [[5, 6, 7]], num_draft_tokens=gamma, max_new_tokens=2 * (gamma + 1) + 2
    )
    (accepted,), (proposed,) = report.accepted, report.proposed
    assert accepted == proposed and accepted[:-1] == [gamma, gamma] and accepted[-1] == 1  # last round: length cap
    assert report.acceptance_rate == 1.0 and report.all_lossless
    report = measure_speculative(target, target, [[5, 6, 7]], num_draft_tokens=gamma, max_new_tokens=3 * (gamma + 1))
    assert report.mean_accepted_per_round == gamma and report.tokens_per_target_forward == gamma + 1


def test_measure_speculative_sampling_reports_counts_without_losslessness(target):
    draft = _no_eos(_perturbed(target))[0]
    torch.manual_seed(0)
    report = measure_speculative(
        target, draft, [[5, 6, 7]], num_draft_tokens=3, max_new_tokens=10, do_sample=True, temperature=1.0
    )
    assert report.lossless is None and report.all_lossless is None
    assert all(0 <= a <= p <= 3 for a, p in zip(report.accepted[0], report.proposed[0]))
    assert report.new_tokens == [10] and report.target_seconds > 0 and report.assisted_seconds > 0
    assert set(report.as_dict()) >= {"speedup", "acceptance_rate", "mean_accepted_per_round", "rounds"}


# ---------------------------------------------------------------------------------------- callback
def _batches(n=2):
    ds = TokenDataset(n=4 * n, seq=10, vocab=96, seed=7)
    return [{k: torch.stack([ds[4 * b + i][k] for i in range(4)]) for k in ds[0]} for b in range(n)]


def test_callback_logs_draft_acceptance_on_an_unmodified_trainer(tmp_path, target):
    from transformers import Trainer

    draft = tiny_llama(vocab=96, layers=1, seed=1)
    batches = _batches()
    cb = kd_plugins.DraftEvalCallback(target, eval_batches=batches, temperature=1.0, every_n_steps=2)
    args = training_args(str(tmp_path), max_steps=4, eval_strategy="steps", eval_steps=4)
    trainer = Trainer(
        model=draft,
        args=args,
        train_dataset=TokenDataset(n=16, vocab=96),
        eval_dataset=TokenDataset(n=4, vocab=96, seed=5),
        callbacks=[cb],
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "draft_acceptance" in h]
    assert [h["step"] for h in train_logs] == [2, 4] and all("loss" in h for h in train_logs)
    (eval_log,) = [h for h in trainer.state.log_history if "eval_draft_acceptance" in h]
    direct = expected_acceptance(target, draft, batches, temperature=1.0).mean
    assert eval_log["eval_draft_acceptance"] == pytest.approx(direct, abs=1e-6) and 0 < direct < 1
    draft.train()
    assert cb.measure() == pytest.approx(direct, abs=1e-6)
    assert draft.training and all(p.requires_grad for p in draft.parameters())  # the trained model stays trainable
    metrics = trainer.evaluate()  # the callback scores its own eval_batches, not the Trainer's eval set
    assert metrics["eval_draft_acceptance"] == pytest.approx(direct, abs=1e-6)


def test_callback_uses_the_trainers_eval_dataset_and_names_bad_setups(tmp_path, target):
    from transformers import Trainer

    draft = tiny_llama(vocab=96, layers=1, seed=1)
    eval_ds = TokenDataset(n=6, vocab=96, seed=2, pad_last=2)
    trainer = Trainer(
        model=draft,
        args=training_args(str(tmp_path), per_device_eval_batch_size=3),
        eval_dataset=eval_ds,
        callbacks=[kd_plugins.DraftEvalCallback(target)],
    )
    metrics = trainer.evaluate()
    batches = [{k: torch.stack([eval_ds[3 * b + i][k] for i in range(3)]) for k in eval_ds[0]} for b in range(2)]
    assert metrics["eval_draft_acceptance"] == pytest.approx(expected_acceptance(target, draft, batches).mean, abs=1e-6)

    with pytest.raises(TypeError, match="teacher .*comes first"):
        kd_plugins.DraftEvalCallback(SpeculativeConfig())
    with pytest.raises(ValueError, match="vocabulary differs"):
        Trainer(
            model=tiny_llama(vocab=128, layers=1),
            args=training_args(str(tmp_path)),
            callbacks=[kd_plugins.DraftEvalCallback(target, eval_batches=_batches(1))],
        )
    same = Trainer(
        model=target,
        args=training_args(str(tmp_path)),
        train_dataset=TokenDataset(n=4, vocab=96),
        callbacks=[kd_plugins.DraftEvalCallback(target, eval_batches=_batches(1))],
    )
    with pytest.raises(ValueError, match="teacher is the student"):
        same.train()
    lonely = kd_plugins.DraftEvalCallback(target)
    Trainer(model=draft, args=training_args(str(tmp_path)), callbacks=[lonely])
    with pytest.raises(ValueError, match="no evaluation data"):
        lonely.measure()


# ---------------------------------------------------------------------------------------- real model
@pytest.mark.real
def test_smollm2_with_its_first_six_layers_as_draft():
    """SmolLM2-135M-Instruct target, its first 6 of 30 layers (no training) as the draft: sane and lossless."""
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.skip(f"{SMOLLM2} not converted (benchmarks.data.lm.smollm2_dir creates it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    target = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    draft = kd_plugins.inherit_student(target, num_layers=6, strategy="first")
    questions = ["Why is the sky blue?", "Write a haiku about autumn leaves."]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    report = measure_speculative(target, draft, prompts, tok, num_draft_tokens=4, max_new_tokens=24, warmup=False)
    assert report.all_lossless
    assert 0.0 <= report.acceptance_rate <= 1.0 and report.tokens_per_target_forward >= 1.0
    result = expected_acceptance(target, draft, [tok(p, return_tensors="pt")["input_ids"] for p in prompts])
    assert 0.0 <= result.mean <= 1.0 and not math.isnan(result.mean)
