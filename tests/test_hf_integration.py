"""DistillationCallback on an unmodified Trainer / SFTTrainer, DistillationTrainer, every student task."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import TokenDataset, tiny_bert, tiny_llama, training_args
from transformers import HfArgumentParser, Trainer, TrainingArguments

from kd_plugins import DistillationCallback, DistillationConfig, DistillationTrainer


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_callback_on_unmodified_trainer_causal_lm(tmp_out):
    teacher, student = tiny_llama(seed=1, layers=3), tiny_llama(seed=2)
    t_before = _params(teacher)
    cfg = DistillationConfig(loss_terms="kl:1.0", temperature=2.0, hard_label_weight=0.5, fused_loss=False)
    cb = DistillationCallback(teacher, cfg)
    trainer = Trainer(model=student, args=training_args(tmp_out), train_dataset=TokenDataset(), callbacks=[cb])
    trainer.train()
    # loss components reach the Trainer's logs, and the logged loss is their weighted sum
    hist = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(hist) == 3
    for h in hist:
        assert {"kd_kl", "task_loss", "agreement"} <= set(h)
        assert h["loss"] == pytest.approx(0.5 * h["task_loss"] + h["kd_loss"], rel=1e-4)
    # teacher frozen, untouched, in eval mode, never in the optimizer
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())


def test_kd_loss_decreases_and_student_moves_toward_teacher(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl"))
    args = training_args(tmp_out, max_steps=40, learning_rate=5e-3, logging_steps=10)
    Trainer(model=student, args=args, train_dataset=TokenDataset(n=8), callbacks=[cb]).train()
    kd = [h["kd_kl"] for h in cb.trainer.state.log_history if "kd_kl" in h]
    assert kd[-1] < 0.5 * kd[0]


def test_add_callback_after_init_and_trainer_subclass_agree(tmp_out):
    results = []
    for mode in ("add_callback", "trainer"):
        teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
        cfg = DistillationConfig(loss_terms="jsd", loss_kwargs={"jsd": {"beta": 0.5}}, hard_label_weight=1.0)
        args = training_args(tmp_out + mode)
        if mode == "add_callback":
            trainer = Trainer(model=student, args=args, train_dataset=TokenDataset())
            trainer.add_callback(DistillationCallback(teacher, cfg))
        else:
            trainer = DistillationTrainer(
                model=student, args=args, train_dataset=TokenDataset(), teacher_model=teacher, distillation_config=cfg
            )
        trainer.train()
        assert _logs(trainer, "kd_jsd")
        results.append(_params(student))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k])


def test_gradient_accumulation_matches_one_large_batch(tmp_out):
    """GA=2 x batch 2 must give the same update as batch 4 (uneven valid-token counts per micro-batch)."""
    finals = []
    for bs, ga in ((4, 1), (2, 2)):
        teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
        cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=0.3)
        args = training_args(
            tmp_out + str(ga),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        ds = TokenDataset(n=4, pad_last=5)
        trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[DistillationCallback(teacher, cfg)])
        trainer.train()
        finals.append(_params(student))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-6)


_NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _encoder_dataset(task):
    if task == "masked_lm":
        ds = TokenDataset(labels="lm", n=4)
        for i, it in enumerate(ds.items):  # a different number of labelled positions per row
            it["labels"] = torch.where(torch.arange(12) % (i + 2) == 0, it["labels"], torch.tensor(-100))
        return ds
    return TokenDataset(n=4, labels="seq" if task == "seq_classification" else "token", pad_last=3)


@pytest.mark.parametrize("task", ["masked_lm", "seq_classification", "token_classification"])
def test_gradient_accumulation_matches_one_large_batch_on_bert_heads(task, tmp_out):
    """BERT heads take **kwargs (so the Trainer passes num_items_in_batch and skips its GA division) but return their
    micro-batch mean: without kd_plugins' correction the task term weighs GA times too much against the KD terms."""
    cls = {
        "masked_lm": "BertForMaskedLM",
        "seq_classification": "BertForSequenceClassification",
        "token_classification": "BertForTokenClassification",
    }[task]
    finals, callbacks = [], []
    for bs, ga in ((4, 1), (2, 2)):
        teacher = tiny_bert(cls, seed=1, layers=3, **_NO_DROPOUT)
        student = tiny_bert(cls, seed=2, **_NO_DROPOUT)
        cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=1.0)
        args = training_args(
            tmp_out + str(ga),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        cb = DistillationCallback(teacher, cfg)
        trainer = Trainer(model=student, args=args, train_dataset=_encoder_dataset(task), callbacks=[cb])
        assert trainer.model_accepts_loss_kwargs  # the Trainer's reading: the loss honours num_items_in_batch
        trainer.train()
        finals.append(_params(student))
        callbacks.append(cb)
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-6)
    assert callbacks[1]._task_loss_normaliser.model_uses_items is False  # the mean was detected


def test_task_loss_normaliser_keeps_losses_that_honour_num_items(tmp_out):
    """A causal LM whose loss is a token sum over num_items_in_batch is left alone (and decided once)."""
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    args = training_args(tmp_out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", hard_label_weight=1.0, fused_loss=False))
    Trainer(model=student, args=args, train_dataset=TokenDataset(n=4, pad_last=5), callbacks=[cb]).train()
    assert cb._task_loss_normaliser.model_uses_items is True


@pytest.mark.parametrize("task", ["masked_lm", "seq_classification", "token_classification"])
def test_encoder_heads(task, tmp_out):
    cls = {
        "masked_lm": "BertForMaskedLM",
        "seq_classification": "BertForSequenceClassification",
        "token_classification": "BertForTokenClassification",
    }[task]
    teacher, student = tiny_bert(cls, seed=1, layers=3), tiny_bert(cls, seed=2)
    if task == "masked_lm":
        ds = TokenDataset(labels="lm")
        for i, it in enumerate(ds.items):  # only a few masked positions carry labels
            it["labels"] = torch.where(torch.arange(12) % 4 == i % 4, it["labels"], torch.tensor(-100))
    else:
        ds = TokenDataset(labels="seq" if task == "seq_classification" else "token", pad_last=3)
    cfg = DistillationConfig(
        loss_terms={"kl": 1.0, "dkd": 0.5} if task == "seq_classification" else "kl",
        temperature=2.0,
        hard_label_weight=1.0,
    )
    cb = DistillationCallback(teacher, cfg)
    trainer = Trainer(model=student, args=training_args(tmp_out), train_dataset=ds, callbacks=[cb])
    trainer.train()
    assert cb.engine.task == task
    assert all(torch.isfinite(torch.tensor(v)) for v in _logs(trainer, "kd_loss"))
    assert _logs(trainer, "agreement")


def test_seq2seq_student(tmp_out):
    from transformers import T5Config, T5ForConditionalGeneration

    def t5(seed, layers):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(
            T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=layers,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=0,
            )
        )

    teacher, student = t5(1, 2), t5(2, 1)
    ds = TokenDataset(labels="lm")
    for it in ds.items:
        it["labels"] = it["labels"][:6]
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", hard_label_weight=1.0))
    trainer = Trainer(model=student, args=training_args(tmp_out), train_dataset=ds, callbacks=[cb])
    trainer.train()
    assert cb.engine.task == "seq2seq" and _logs(trainer, "kd_kl")


def test_bare_encoder_embedding_distillation_without_labels(tmp_out):
    teacher = tiny_bert("BertModel", seed=1, layers=3, hidden=48)
    student = tiny_bert("BertModel", seed=2, layers=2, hidden=32)
    cfg = DistillationConfig(
        loss_terms={"embedding_mse": 1.0, "affinity_kl": 1.0}, feature_pairs={"encoder.layer.1": "encoder.layer.2"}
    )
    cb = DistillationCallback(teacher, cfg)
    args = training_args(tmp_out, max_steps=6, remove_unused_columns=False)
    trainer = Trainer(model=student, args=args, train_dataset=TokenDataset(labels=None, pad_last=4), callbacks=[cb])
    trainer.train()
    assert cb.engine.task == "encoder"
    assert {"kd_embedding_mse", "kd_affinity_kl", "kd_hidden_mse"} <= set(trainer.state.log_history[0])
    assert len(cb.engine.projectors) == 2  # 32 -> 48 for the pooled embedding and the hidden pair
    assert not any("projector" in k or "teacher" in k for k in student.state_dict())


def test_default_loss_terms_follow_the_student(tmp_out, caplog):
    """DistillationConfig() works for every student: kl with logits, embedding_cosine for a bare encoder (logged)."""
    import logging

    cfg = DistillationConfig()
    assert cfg.auto_loss_terms and cfg.loss_terms == {"kl": 1.0} and cfg.to_dict()["loss_terms"] is None
    assert cfg.for_task("causal_lm") is cfg and cfg.for_task("encoder").loss_terms == {"embedding_cosine": 1.0}
    assert not DistillationConfig(loss_terms="kl").auto_loss_terms
    logger = "kd_plugins.distill.engine"
    for student, ds, term in (
        (tiny_bert("BertModel", seed=2), TokenDataset(labels=None), "embedding_cosine"),
        (tiny_llama(seed=2), TokenDataset(), "kl"),
    ):
        teacher = tiny_bert("BertModel", seed=1) if term != "kl" else tiny_llama(seed=1)
        cb = DistillationCallback(teacher, cfg)
        args = training_args(tmp_out, max_steps=1, remove_unused_columns=False)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=logger):
            trainer = Trainer(model=student, args=args, train_dataset=ds, callbacks=[cb])
            trainer.train()
        assert f"kd_{term}" in trainer.state.log_history[0] and cb.config.loss_terms == {term: 1.0}
        lines = [r.getMessage() for r in caplog.records if r.name == logger]
        assert len(lines) == 1 and "loss_terms not set" in lines[0] and f"with {term}:1" in lines[0], lines
    assert cfg.auto_loss_terms and cfg.loss_terms == {"kl": 1.0}  # the given config was not modified


def test_bf16_autocast_and_evaluation(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="reverse_kl", hard_label_weight=0.5))
    args = training_args(
        tmp_out, bf16=True, eval_strategy="steps", eval_steps=2, max_steps=2, per_device_eval_batch_size=4
    )
    trainer = Trainer(
        model=student, args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=8, seed=3), callbacks=[cb]
    )
    trainer.train()
    ev = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert ev and {"eval_kd_loss", "eval_task_loss", "eval_kd_reverse_kl"} <= set(ev[0])
    assert ev[0]["eval_loss"] == pytest.approx(0.5 * ev[0]["eval_task_loss"] + ev[0]["eval_kd_loss"], rel=1e-3)
    metrics = trainer.evaluate()
    assert "eval_kd_loss" in metrics


def test_resume_from_checkpoint_restores_projectors(tmp_out):
    def run(max_steps, resume=None, out=tmp_out):
        teacher, student = tiny_llama(seed=1, hidden=48), tiny_llama(seed=2, hidden=32)
        cfg = DistillationConfig(
            loss_terms="kl",
            hard_label_weight=1.0,
            feature_pairs={"model.layers.1": "model.layers.1"},
            projector_lr=1e-2,
        )
        cb = DistillationCallback(teacher, cfg)
        args = training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = Trainer(model=student, args=args, train_dataset=TokenDataset(n=32), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb, student

    cb_full, s_full = run(4)
    ckpt = os.path.join(tmp_out, "checkpoint-2")
    assert os.path.exists(os.path.join(ckpt, "kd_plugins_state.safetensors"))
    # the checkpointed student itself is clean
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(s_full.state_dict())
    cb_res, s_res = run(4, resume=ckpt, out=tmp_out + "_resumed")
    for (k, a), b in zip(
        cb_full.engine.projectors.state_dict().items(), cb_res.engine.projectors.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    for k, v in s_full.state_dict().items():
        torch.testing.assert_close(v, s_res.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_saved_student_loads_without_kd_plugins(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    cfg = DistillationConfig(loss_terms="kl", feature_pairs={"model.layers.0": "model.layers.1"})
    trainer = Trainer(
        model=student,
        args=training_args(tmp_out, max_steps=2),
        train_dataset=TokenDataset(),
        callbacks=[DistillationCallback(teacher, cfg)],
    )
    trainer.train()
    trainer.save_model(tmp_out)
    x = torch.randint(0, 96, (1, 7))
    expected = student.eval()(x).logits
    torch.save(x, os.path.join(tmp_out, "x.pt"))
    code = f"""
import sys, torch
sys.modules['kd_plugins'] = None  # any import of kd_plugins would now fail
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({tmp_out!r}).eval()
x = torch.load({os.path.join(tmp_out, "x.pt")!r})
torch.save(m(x).logits, {os.path.join(tmp_out, "y.pt")!r})
print(sorted(m.state_dict())[:1])
"""
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    torch.testing.assert_close(torch.load(os.path.join(tmp_out, "y.pt")), expected)
    cfg_json = json.load(open(os.path.join(tmp_out, "config.json")))
    assert cfg_json["architectures"] == ["LlamaForCausalLM"]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(93)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_callback_on_trl_sft_trainer(tmp_out):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = _word_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 93, (10,), generator=g)) for _ in range(16)]
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    cb = DistillationCallback(
        teacher, DistillationConfig(loss_terms="kl", hard_label_weight=1.0), teacher_tokenizer=tok
    )
    args = trl.SFTConfig(
        output_dir=tmp_out,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        max_length=16,
    )
    trainer = trl.SFTTrainer(
        model=student, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok, callbacks=[cb]
    )
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_kl" in h]
    assert len(hist) == 2 and all(h["loss"] == pytest.approx(h["task_loss"] + h["kd_loss"], rel=1e-3) for h in hist)

    # Pure distillation through SFTTrainer must actually train the student (TRL re-runs the model under no_grad
    # when asked for outputs; the callback must not distil those detached logits).
    student2 = tiny_llama(seed=2)
    before = _params(student2)
    cb2 = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", hard_label_weight=0.0))
    args2 = trl.SFTConfig(
        output_dir=tmp_out + "2",
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        max_length=16,
        learning_rate=5e-3,
    )
    trl.SFTTrainer(
        model=student2,
        args=args2,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
        callbacks=[cb2],
    ).train()
    assert not torch.equal(before["lm_head.weight"], student2.state_dict()["lm_head.weight"])
    kd = [h["kd_kl"] for h in cb2.trainer.state.log_history if "kd_kl" in h]
    assert kd[-1] < kd[0]


def test_config_parses_with_hf_argument_parser():
    parser = HfArgumentParser((TrainingArguments, DistillationConfig))
    targs, cfg = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            "x",
            "--loss_terms",
            "kl:0.7,hidden_mse:0.3",
            "--temperature",
            "2.0",
            "--hard_label_weight",
            "0.5",
            "--feature_pairs",
            "model.layers.1=model.layers.3",
            "--loss_kwargs",
            '{"kl": {"t2_scale": false}}',
            "--vocab_alignment",
            "truncate",
        ]
    )
    assert cfg.loss_terms == {"kl": 0.7, "hidden_mse": 0.3}
    assert cfg.feature_pairs == {"model.layers.1": "model.layers.3"}
    assert cfg.loss_kwargs == {"kl": {"t2_scale": False}} and cfg.temperature == 2.0
    assert DistillationConfig(**cfg.to_dict()).loss_terms == cfg.loss_terms
    assert DistillationConfig(loss_terms='{"jsd": 1}').loss_terms == {"jsd": 1}
    with pytest.raises(KeyError, match="Unknown loss"):
        DistillationConfig(loss_terms="kll")
    with pytest.raises(ValueError, match="feature_pairs is empty"):
        DistillationConfig(loss_terms="hidden_mse")
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(temperature=0)


def test_teacher_in_eval_mode_every_step(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a: seen.append(m.training))

    class TeacherToTrain(DistillationCallback):
        def on_step_end(self, args, state, control, **kw):
            self.teacher.train()  # user code flipping the mode must not leak into the distillation

    trainer = Trainer(
        model=student,
        args=training_args(tmp_out),
        train_dataset=TokenDataset(),
        callbacks=[TeacherToTrain(teacher, DistillationConfig())],
    )
    trainer.train()
    assert seen == [False, False, False]


def test_teacher_on_another_device_is_moved_when_asked(tmp_out):
    teacher, student = copy.deepcopy(tiny_llama(seed=1)).to(torch.float64), tiny_llama(seed=2)
    cfg = DistillationConfig(teacher_dtype="float32", teacher_device="student")
    Trainer(
        model=student,
        args=training_args(tmp_out, max_steps=1),
        train_dataset=TokenDataset(),
        callbacks=[DistillationCallback(teacher, cfg)],
    ).train()
    assert next(teacher.parameters()).dtype == torch.float32


def test_attention_transfer_and_cosine_features(tmp_out):
    teacher = tiny_bert("BertForMaskedLM", seed=1, layers=3, attn_implementation="eager")
    student = tiny_bert("BertForMaskedLM", seed=2, layers=2, attn_implementation="eager")
    with pytest.raises(ValueError, match="after dropout"):
        DistillationCallback(
            teacher, DistillationConfig(loss_terms="attention_kl", attention_layer_map={1: 2})
        ).engine.setup(student)
    student = tiny_bert(
        "BertForMaskedLM", seed=2, layers=2, attn_implementation="eager", attention_probs_dropout_prob=0.0
    )
    cfg = DistillationConfig(
        loss_terms={"attention_kl": 1.0, "hidden_cosine": 0.5},
        attention_layer_map={1: 2},
        feature_pairs={"bert.encoder.layer.1": "bert.encoder.layer.2"},
    )
    cb = DistillationCallback(teacher, cfg)
    args = training_args(tmp_out, max_steps=30, learning_rate=3e-3, logging_steps=10)
    Trainer(model=student, args=args, train_dataset=TokenDataset(labels="lm", pad_last=3), callbacks=[cb]).train()
    hist = [h for h in cb.trainer.state.log_history if "kd_attention_kl" in h]
    assert len(hist) == 3 and "kd_hidden_cosine" in hist[0]
    assert hist[-1]["kd_attention_kl"] < hist[0]["kd_attention_kl"]
    assert hist[-1]["kd_hidden_cosine"] < hist[0]["kd_hidden_cosine"]


@pytest.mark.parametrize("terms,kwargs", [("kl", {}), ("jsd", {"jsd": {"beta": 0.3}}), ("reverse_kl", {}), ("tvd", {})])
def test_fused_lm_loss_matches_plain_path(terms, kwargs, tmp_out):
    """The chunked fused linear+KD path (default for causal LMs) gives the same update as the full-logit path."""
    finals, logs = [], []
    for fused in (False, True):
        teacher, student = tiny_llama(seed=1, layers=3), tiny_llama(seed=2)
        cfg = DistillationConfig(
            loss_terms=terms,
            loss_kwargs=kwargs,
            temperature=2.0,
            hard_label_weight=0.5,
            fused_loss=fused,
            fused_chunk_size=7,
            feature_pairs={"model.layers.1": "model.layers.2"},
        )
        cb = DistillationCallback(teacher, cfg)
        args = training_args(
            tmp_out + str(fused),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        Trainer(model=student, args=args, train_dataset=TokenDataset(n=4, pad_last=5), callbacks=[cb]).train()
        assert cb.fused.enabled is fused
        finals.append(_params(student))
        logs.append(cb.trainer.state.log_history[0])
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5, msg=k)
    for key in ("loss", f"kd_{terms}", "task_loss", "kd_hidden_mse"):
        assert logs[1][key] == pytest.approx(logs[0][key], rel=1e-3), key


def test_fused_loss_refuses_heads_it_cannot_fuse(tmp_out):
    def run(fused):
        teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
        student.config.final_logit_softcapping = 30.0
        cb = DistillationCallback(teacher, DistillationConfig(fused_loss=fused))
        Trainer(
            model=student, args=training_args(tmp_out, max_steps=1), train_dataset=TokenDataset(), callbacks=[cb]
        ).train()
        return cb

    with pytest.raises(ValueError, match="fused_loss=True but.*soft-capping"):
        run(True)
    cb = run(None)  # automatic: falls back to the full-logit path, which computes the same objective
    assert cb.fused.enabled is False and any("soft-capping" in r for r in cb.fused_reasons)


# ------------------------------------------------------------------------------------------ term_balance="gradmag"
def test_gradmag_weights_equalise_gradient_norms_at_the_reference():
    from kd_plugins.distill.terms import gradmag_weights

    logits = torch.randn(3, 5, requires_grad=True)
    other = torch.randn(4, requires_grad=True)
    values = {
        "a": (logits * 2.0).sum(),  # gradient norm 2 * sqrt(15)
        "b": (logits * 0.01).sum(),  # gradient norm 0.01 * sqrt(15)
        "c": other.square().sum(),  # does not read the logits: keeps its weight
        "d": logits.sum(),  # weight 0: kept at 0
    }
    weights = {"a": 1.0, "b": 3.0, "c": 0.5, "d": 0.0}
    eff = gradmag_weights(values, weights, logits)
    n = 15**0.5
    mean = (1.0 * 2.0 * n + 3.0 * 0.01 * n) / 4.0
    assert eff["a"] == pytest.approx(1.0 * mean / (2.0 * n))
    assert eff["b"] == pytest.approx(3.0 * mean / (0.01 * n))
    assert (eff["c"], eff["d"]) == (0.5, 0.0)
    # the balanced terms' gradients at the logits are in the ratio of the configured weights
    ga = torch.autograd.grad(eff["a"] * values["a"], logits, retain_graph=True)[0].norm()
    gb = torch.autograd.grad(eff["b"] * values["b"], logits, retain_graph=True)[0].norm()
    assert float(gb / ga) == pytest.approx(3.0)
    assert logits.grad is None  # nothing accumulated into the leaves


def test_term_balance_gradmag_in_the_callback(tmp_out):
    teacher, student = tiny_llama(seed=1), tiny_llama(seed=2)
    cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=0.5, term_balance="gradmag")
    cb = DistillationCallback(teacher, cfg)
    trainer = Trainer(model=student, args=training_args(tmp_out), train_dataset=TokenDataset(), callbacks=[cb])
    trainer.train()
    hist = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(hist) == 3
    for h in hist:
        assert {"balance_kl", "balance_task_loss"} <= set(h)
        expected = h["balance_task_loss"] * 0.5 * h["task_loss"] + h["balance_kl"] * h["kd_kl"]
        assert h["loss"] == pytest.approx(expected, rel=1e-3)
        assert h["balance_kl"] != pytest.approx(1.0)  # the KL's gradient differs from the CE's


def test_term_balance_bad_values():
    with pytest.raises(ValueError, match="term_balance must be one of"):
        DistillationConfig(loss_terms="kl", term_balance="magnitude")
    with pytest.raises(ValueError, match="fused loss never materialises"):
        DistillationConfig(loss_terms="kl", term_balance="gradmag", fused_loss=True)
