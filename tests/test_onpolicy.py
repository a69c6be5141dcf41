"""On-policy distillation data (kd_plugins.distill.onpolicy, DistillationCallback lmbda), DistillSpec drafts and
SpecVLM-style online draft distillation (kd_plugins.speculative.drafts / .online), on tiny Llamas sharing one
vocabulary."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from onpolicy_ddp_worker import prompt_completion_dataset
from tiny import tiny_llama, training_args
from transformers import HfArgumentParser, Trainer

import kd_plugins.integrations.hf.distill as hf_distill
from kd_plugins import DistillationCallback, DistillationConfig
from kd_plugins.distill.cache import TeacherCache
from kd_plugins.distill.onpolicy import (
    OnPolicySampler,
    completion_lengths,
    on_policy_batch,
    special_token_ids,
    split_prompts,
)
from kd_plugins.distill.teacher import Teacher
from kd_plugins.speculative import (
    build_draft,
    collect_target_outputs,
    distillspec_config,
    online_draft_loss,
    train_draft_online,
)

PAD, EOS = 0, 3
TOKENIZER = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS, padding_side="right")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_eos(model):
    model.generation_config.eos_token_id = None
    return model


class Scripted(nn.Module):
    """A 'model' whose generate appends fixed completions and records how it was called."""

    def __init__(self, completions):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.kept_in_eval = nn.Dropout(0.1)
        self.completions = torch.tensor(completions)
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append(
            dict(kw, training=self.training, grad=torch.is_grad_enabled(), ids=input_ids.clone(), mask=attention_mask)
        )
        return torch.cat([input_ids, self.completions.to(input_ids)], 1)


def _batch(side="right"):
    """Row 0: prompt 10 11 12, completion 20 21 (padded); row 1: prompt 13 14, completion 22 23 24 25."""
    if side == "right":
        ids = [[10, 11, 12, 20, 21, PAD], [13, 14, 22, 23, 24, 25]]
        mask = [[1, 1, 1, 1, 1, 0], [1] * 6]
        labels = [[-100, -100, -100, 20, 21, -100], [-100, -100, 22, 23, 24, 25]]
    else:
        ids = [[PAD, 10, 11, 12, 20, 21], [13, 14, 22, 23, 24, 25]]
        mask = [[0, 1, 1, 1, 1, 1], [1] * 6]
        labels = [[-100, -100, -100, -100, 20, 21], [-100, -100, 22, 23, 24, 25]]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


# ------------------------------------------------------------------------------------------------------- config
def test_config_fields_parse_and_validate():
    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        args=["--lmbda", "0.5", "--on_policy_source", "teacher", "--max_new_tokens", "8", "--on_policy_seed", "3"]
    )
    assert (cfg.lmbda, cfg.on_policy_source, cfg.max_new_tokens, cfg.on_policy_seed) == (0.5, "teacher", 8, 3)
    default = DistillationConfig()
    assert (default.lmbda, default.on_policy_source, default.generation_temperature) == (0.0, "student", 1.0)
    for bad, match in [
        ({"lmbda": 1.5}, "lmbda must lie in"),
        ({"on_policy_source": "draft"}, "on_policy_source"),
        ({"generation_temperature": -1.0}, "generation_temperature"),
        ({"generation_top_p": 0.0}, "generation_top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"on_policy_seed": -1}, "on_policy_seed"),
        ({"on_policy_source": "student_or_teacher"}, "student_or_teacher' with lmbda=0"),
        ({"lmbda": 0.5, "task": "seq_classification"}, "causal-LM"),
        ({"lmbda": 0.5, "loss_terms": "alm"}, "cross-tokenizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillationConfig(**bad)


# --------------------------------------------------------------------------------------------- batch building
def test_split_prompts_from_labels_masks_and_the_no_split_error():
    right, left = split_prompts(_batch("right")), split_prompts(_batch("left"))
    for split in (right, left):
        assert [p.tolist() for p in split.prompts] == [[10, 11, 12], [13, 14]]
    assert (right.padding_side, left.padding_side) == ("right", "left")
    b = _batch()
    comp = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "completion_mask": b["labels"] >= 0}
    assert [p.tolist() for p in split_prompts(comp).prompts] == [[10, 11, 12], [13, 14]]
    pm = {**comp, "prompt_mask": torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])}  # prompt_mask wins
    assert [p.tolist() for p in split_prompts(pm).prompts] == [[10, 11], [13]]
    with pytest.raises(ValueError, match="leading attended tokens"):
        split_prompts({**comp, "prompt_mask": torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])})
    with pytest.raises(ValueError, match="no labels, prompt_mask or completion_mask.*prompt-completion"):
        split_prompts({"input_ids": b["input_ids"]})
    lm = {**b, "labels": b["input_ids"].clone()}  # a plain LM collator: labelled from the first token
    with pytest.raises(ValueError, match=r"Rows \[0, 1\].*no prompt/completion split.*DataCollatorForCompletionOnlyLM"):
        split_prompts(lm)


@pytest.mark.parametrize("side", ["right", "left"])
def test_on_policy_batch_keeps_prompts_cuts_at_eos_and_masks_labels(side):
    gen = Scripted([[30, EOS, 31, 32], [33, 34, 35, 36]])
    gen.kept_in_eval.eval()
    batch = {**_batch(side), "position_ids": torch.zeros(2, 6, dtype=torch.long), "note": "kept"}
    out = on_policy_batch(batch, gen, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=4, temperature=0.7, top_p=0.9)
    if side == "right":
        ids = [[10, 11, 12, 30, EOS, PAD], [13, 14, 33, 34, 35, 36]]
        labels = [[-100, -100, -100, 30, EOS, -100], [-100, -100, 33, 34, 35, 36]]
        mask, pos = [[1, 1, 1, 1, 1, 0], [1] * 6], [[0, 1, 2, 3, 4, 4], list(range(6))]
    else:
        ids = [[PAD, 10, 11, 12, 30, EOS], [13, 14, 33, 34, 35, 36]]
        labels = [[-100, -100, -100, -100, 30, EOS], [-100, -100, 33, 34, 35, 36]]
        mask, pos = [[0, 1, 1, 1, 1, 1], [1] * 6], [[0, 0, 1, 2, 3, 4], list(range(6))]
    new = out.batch
    assert new["input_ids"].tolist() == ids and new["labels"].tolist() == labels
    assert new["attention_mask"].tolist() == mask and new["position_ids"].tolist() == pos
    assert new["note"] == "kept" and out.generated_tokens == 6 and out.completion_lengths.tolist() == [2, 4]
    (call,) = gen.calls  # prompts left-padded for generate; eval mode, no grad, sampling arguments
    assert call["ids"].tolist() == [[10, 11, 12], [PAD, 13, 14]] and call["mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert call["training"] is False and call["grad"] is False
    assert call["use_cache"] is True and call["do_sample"] is True and call["top_k"] == 0
    assert (call["temperature"], call["top_p"], call["pad_token_id"], call["eos_token_id"]) == (0.7, 0.9, PAD, [EOS])
    assert gen.training and gen.lin.training and not gen.kept_in_eval.training  # every module's mode restored
    with pytest.raises(ValueError, match="'extra'.*one entry per token"):
        on_policy_batch({**batch, "extra": torch.ones(2, 6)}, gen, pad_token_id=PAD, eos_token_id=EOS)


def test_completion_lengths_and_special_ids():
    comp = torch.tensor([[5, 3, 3, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_lengths(comp, 3).tolist() == [2, 4, 4]
    assert completion_lengths(comp, [3, 2]).tolist() == [2, 4, 1]
    assert completion_lengths(comp, None).tolist() == [4, 4, 4]
    model = tiny_llama()
    assert special_token_ids(TOKENIZER, model) == (PAD, [EOS, 2])  # the tokenizer's EOS and the model's
    assert special_token_ids(None, model) == (2, [2])  # no pad anywhere: the EOS id pads
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="pad token"):
        special_token_ids(None, model)


def test_real_generation_is_seeded_and_leaves_the_global_rng_alone():
    student = _no_eos(tiny_llama(seed=2))
    batch = _batch()
    state = torch.get_rng_state()
    a = on_policy_batch(batch, student, pad_token_id=PAD, max_new_tokens=5, seed=7).batch
    assert torch.equal(torch.get_rng_state(), state)
    b = on_policy_batch(batch, student, pad_token_id=PAD, max_new_tokens=5, seed=7).batch
    c = on_policy_batch(batch, student, pad_token_id=PAD, max_new_tokens=5, seed=8).batch
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (2, 3 + 5) and int((a["labels"] != -100).sum()) == 10
    greedy = on_policy_batch(batch, student, pad_token_id=PAD, max_new_tokens=5, temperature=0).batch
    ref = student.generate(input_ids=torch.tensor([[10, 11, 12]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert greedy["input_ids"][0].tolist() == ref[0].tolist()


# ------------------------------------------------------------------------------------------------------ sampler
def test_sampler_lmbda_zero_untouched_one_always_and_draws_reproducible():
    student = _no_eos(tiny_llama(seed=2))
    batch = _batch()
    same, logs = OnPolicySampler(DistillationConfig(lmbda=0.0))(student, batch, step=0)
    assert same is batch and logs == {}
    always = OnPolicySampler(DistillationConfig(lmbda=1.0, max_new_tokens=3))
    for step in (0, 0, 1):
        new, logs = always(student, batch, step=step, tokenizer=TOKENIZER)
        assert new is not batch and logs["on_policy_fraction"] == 1.0 and logs["generated_tokens"] > 0
    half = OnPolicySampler(DistillationConfig(lmbda=0.5))
    draws = [half.draw(step, micro, seed=0) for step in range(20) for micro in range(2)]
    assert draws == [half.draw(step, micro, seed=0) for step in range(20) for micro in range(2)]
    assert 10 < sum(draws) < 30 and draws != [half.draw(s, m, seed=1) for s in range(20) for m in range(2)]
    with pytest.raises(ValueError, match="TeacherCache"):
        OnPolicySampler(DistillationConfig(lmbda=0.5), TeacherCache.__new__(TeacherCache))


def test_teacher_source_generates_with_the_teacher():
    teacher, student = _no_eos(tiny_llama(seed=1, hidden=48)), tiny_llama(seed=2)
    student.generate = None  # the student must not generate
    cfg = DistillationConfig(lmbda=1.0, on_policy_source="teacher", generation_temperature=0, max_new_tokens=4)
    sampler = OnPolicySampler(cfg, teacher)
    assert isinstance(sampler.teacher, Teacher)
    new, _ = sampler(student, _batch(), step=0, tokenizer=TOKENIZER)
    ref = teacher.generate(
        input_ids=torch.tensor([[10, 11, 12], [PAD, 13, 14]]),
        attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=PAD,
    )
    cut = completion_lengths(ref[:, 3:], EOS)
    assert new["input_ids"][0, 3 : 3 + int(cut[0])].tolist() == ref[0, 3 : 3 + int(cut[0])].tolist()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_student_or_teacher_source_generates_every_batch_and_the_draw_picks_who():
    teacher, student = _no_eos(tiny_llama(seed=1, hidden=48)), _no_eos(tiny_llama(seed=2))
    cfg = DistillationConfig(
        lmbda=0.5, on_policy_source="student_or_teacher", generation_temperature=0, max_new_tokens=4
    )
    with pytest.raises(ValueError, match="needs the teacher model"):
        OnPolicySampler(cfg)
    sampler = OnPolicySampler(cfg, teacher)
    prompts = {
        "input_ids": torch.tensor([[10, 11, 12], [PAD, 13, 14]]),
        "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
    }
    greedy = {
        who: m.generate(**prompts, max_new_tokens=4, do_sample=False, pad_token_id=PAD)[:, 3:]
        for who, m in (("student", student), ("teacher", teacher))
    }
    assert not torch.equal(greedy["student"], greedy["teacher"])
    seen = set()
    for step in range(8):
        drawn = sampler.draw(step, 0, seed=0)
        new, logs = sampler(student, _batch(), step=step, tokenizer=TOKENIZER)
        who = "student" if drawn else "teacher"
        assert logs["on_policy_fraction"] == 1.0 and logs["student_generated_fraction"] == float(drawn)
        assert new["input_ids"][0, 3:].tolist() == greedy[who][0].tolist()  # row 0 has no padding
        seen.add(who)
    assert seen == {"student", "teacher"}


# ----------------------------------------------------------------------------------------------------- callback
def _train(tmp, cfg, *, record=None, dataset=None, **args):
    teacher, student = tiny_llama(seed=1, hidden=48), tiny_llama(seed=2)
    cb = DistillationCallback(teacher, cfg)
    kw = {"per_device_train_batch_size": 2, "max_steps": 2, **args}
    trainer = Trainer(
        model=student,
        args=training_args(tmp, **kw),
        train_dataset=dataset or prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(n=2, seed=1),
        callbacks=[cb],
    )
    trainer.train()
    return _params(student), trainer, cb


def test_lmbda_zero_changes_nothing(tmp_out):
    base, _, _ = _train(tmp_out + "a", DistillationConfig(loss_terms="kl"))
    same, _, cb = _train(
        tmp_out + "b", DistillationConfig(loss_terms="kl", lmbda=0.0, max_new_tokens=3, generation_temperature=0.5)
    )
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not any("on_policy_fraction" in h for h in cb.trainer.state.log_history)


def test_callback_logs_and_evaluates_on_the_dataset(tmp_out):
    cfg = DistillationConfig(loss_terms="kl", lmbda=1.0, max_new_tokens=4)
    _, trainer, cb = _train(tmp_out, cfg, eval_strategy="steps", eval_steps=2)
    train_logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(train_logs) == 2
    assert all(h["on_policy_fraction"] == 1.0 and 0 < h["generated_tokens"] <= 8 for h in train_logs)
    evals = [h for h in trainer.state.log_history if "eval_kd_kl" in h]
    assert evals and not any("eval_on_policy_fraction" in h for h in evals)
    assert cb.fused.enabled is True  # the fused linear+KD path runs on the generated batch


def test_callback_logs_who_generated_with_the_mixed_source(tmp_out):
    cfg = DistillationConfig(loss_terms="kl", lmbda=0.5, on_policy_source="student_or_teacher", max_new_tokens=3)
    _, trainer, _ = _train(tmp_out, cfg, max_steps=4, gradient_accumulation_steps=2)
    logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logs) == 4 and all(h["on_policy_fraction"] == 1.0 for h in logs)
    assert all(h["student_generated_fraction"] in (0.0, 0.5, 1.0) for h in logs)


def test_fused_and_plain_paths_agree_on_generated_batches(tmp_out):
    finals = []
    for fused in (False, True):
        cfg = DistillationConfig(loss_terms="jsd", lmbda=1.0, max_new_tokens=4, fused_loss=fused, hard_label_weight=0.5)
        params, _, cb = _train(tmp_out + str(fused), cfg, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0)
        assert cb.fused.enabled is fused
        finals.append(params)
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_gradient_accumulation_is_deterministic_and_normalised_per_micro_batch(tmp_out, monkeypatch):
    seen = []
    original = hf_distill.trainer_on_policy_inputs

    def recording(sampler, trainer, model, inputs, num_items, task):
        new, items, logs = original(sampler, trainer, model, inputs, num_items, task)
        seen.append((new, items, logs, trainer.state.global_step))
        return new, items, logs

    monkeypatch.setattr(hf_distill, "trainer_on_policy_inputs", recording)
    cfg = DistillationConfig(loss_terms="kl", lmbda=1.0, max_new_tokens=4, on_policy_seed=5)
    runs = [_train(tmp_out + str(i), cfg, gradient_accumulation_steps=2) for i in range(2)]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert all(torch.isfinite(v).all() for v in runs[0][0].values())
    first, second = seen[:4], seen[4:]
    assert [s for *_, s in first] == [0, 0, 1, 1]  # 2 steps x 2 micro-batches, each generated
    for (a, items, logs, _), (b, *_) in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and logs["on_policy_fraction"] == 1.0
        assert all(not t.requires_grad and t.grad_fn is None for t in a.values() if torch.is_tensor(t))
        assert int(items) == int((a["labels"][:, 1:] != -100).sum()) * 2  # own tokens x accumulation steps
    assert not torch.equal(first[0][0]["input_ids"], first[1][0]["input_ids"])  # micro-batches differ


def test_a_batch_without_prompts_fails_with_the_fix(tmp_out):
    from tiny import TokenDataset

    with pytest.raises(ValueError, match="prompt-completion dataset"):
        _train(tmp_out, DistillationConfig(loss_terms="kl", lmbda=0.3), dataset=TokenDataset(n=4))


def test_two_ddp_ranks_each_generate(tmp_path):
    from torchrun_util import run_torchrun

    here = os.path.dirname(__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=here, MASTER_ADDR="127.0.0.1")
    r = run_torchrun([os.path.join(here, "onpolicy_ddp_worker.py"), str(tmp_path)], env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    for rank in ranks:
        assert len(rank["generated"]) == 2 and all(g["logs"]["on_policy_fraction"] == 1.0 for g in rank["generated"])
        assert rank["logs"] and all(h["on_policy_fraction"] == 1.0 for h in rank["logs"])
    assert ranks[0]["generated"][0]["input_ids"] != ranks[1]["generated"][0]["input_ids"]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # DDP kept the students equal


# ------------------------------------------------------------------------------------------------------- drafts
def test_build_draft_keeps_first_layers_norm_and_tied_head():
    target = tiny_llama(layers=4, seed=3)
    target.lm_head.weight = target.model.embed_tokens.weight  # a tied head, as SmolLM2's
    target.config.tie_word_embeddings = True
    before = _params(target)
    draft = build_draft(target, num_layers=2)
    assert draft.config.num_hidden_layers == 2 and len(target.model.layers) == 4
    for i in range(2):
        for (name, p), q in zip(draft.model.layers[i].named_parameters(), target.model.layers[i].parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(draft.model.norm.weight, target.model.norm.weight)
    assert draft.lm_head.weight is draft.model.embed_tokens.weight
    assert draft.lm_head.weight is not target.lm_head.weight
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    target.requires_grad_(False)  # frozen, as a Teacher leaves it: the draft is still trainable
    assert all(p.requires_grad for p in build_draft(target, num_layers=1).parameters())


def test_distillspec_config():
    cfg = distillspec_config("jsd", beta=0.3)
    assert cfg.loss_terms == {"jsd": 1.0} and cfg.loss_kwargs == {"jsd": {"beta": 0.3}}
    assert (cfg.lmbda, cfg.on_policy_source, cfg.hard_label_weight) == (1.0, "student", 0.0)
    assert distillspec_config("rkl").loss_terms == {"reverse_kl": 1.0}  # aliases resolve to the fusable name
    assert distillspec_config("tvd", lmbda=0.0, max_new_tokens=8).lmbda == 0.0
    with pytest.raises(ValueError, match="divergence must be one of"):
        distillspec_config("hidden_mse")


# ------------------------------------------------------------------------------------------------------- online
def test_collected_outputs_match_a_teacher_forced_forward():
    target = _no_eos(tiny_llama(seed=1, hidden=48))
    prompts = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
    buf = collect_target_outputs(target, prompts, max_new_tokens=5, temperature=0, pad_token_id=PAD)
    assert buf.input_ids.shape == (3, 4 + 5) and buf.start == 3 and bool(buf.target_mask.all())
    out = target(**buf.model_inputs(), output_hidden_states=True)
    torch.testing.assert_close(out.logits[:, 3:8], buf.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.hidden_states[-1][:, 3:8], buf.features, rtol=1e-4, atol=1e-4)
    full = online_draft_loss(out, buf)
    topk = collect_target_outputs(target, prompts, max_new_tokens=5, temperature=0, pad_token_id=PAD, top_k=96)
    assert topk.logits is None and topk.topk[0].shape == (3, 5, 96)
    torch.testing.assert_close(online_draft_loss(out, topk).loss, full.loss, rtol=1e-5, atol=1e-5)
    assert float(full.feature) < 1e-6  # the target is its own best draft: only the CE's entropy remains


def test_online_draft_loss_decreases_with_a_learned_projector():
    target, draft = _no_eos(tiny_llama(seed=1, hidden=48)), tiny_llama(seed=4, hidden=32)
    prompts = [[10, 11, 12, 13], [14, 15], [16, 17, 18]]
    buf = collect_target_outputs(target, prompts, max_new_tokens=4, temperature=0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="projector=nn.Linear\\(32, 48\\)"):
        online_draft_loss(draft(**buf.model_inputs(), output_hidden_states=True), buf)
    torch.manual_seed(0)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-2)
    run = train_draft_online(
        draft, target, prompts, 8, opt, batch_size=3, max_new_tokens=4, sampling_temperature=0, pad_token_id=PAD
    )
    assert run.projector is not None and len(opt.param_groups) == 2
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in run.history])))
    # the same greedy buffer every step: the CE falls towards the target's entropy (its minimum), the features meet
    p = torch.softmax(buf.logits, -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    first, last = run.history[0], run.history[-1]
    assert last["ce"] - entropy < 0.5 * (first["ce"] - entropy) and last["feature"] < 0.5 * first["feature"]
    assert last["loss"] < first["loss"]
    same_width = build_draft(copy.deepcopy(target), num_layers=1).requires_grad_(True)
    opt = torch.optim.SGD(same_width.parameters(), lr=0.1)
    run = train_draft_online(same_width, target, prompts, 1, opt, max_new_tokens=4, pad_token_id=PAD)
    assert run.projector is None and run.history[0]["tokens"] > 0
