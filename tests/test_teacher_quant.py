"""Quantized teachers: ``DistillationConfig(teacher_quantization="int8" | "nf4")`` (distill/teacher_quant.py).

int8 is kd_plugins' per-token W8A8 path; nf4 is bitsandbytes (tested when it is installed, else its clear error)."""

import copy
import importlib.util

import pytest
import torch
from tiny import TokenDataset, tiny_llama, training_args

from kd_plugins import DistillationCallback, DistillationConfig
from kd_plugins.distill import DistillationEngine
from kd_plugins.distill.teacher import Teacher
from kd_plugins.distill.teacher_quant import INT8_TEACHER_METHOD, quantize_teacher, teacher_memory_bytes
from kd_plugins.quant import QuantizedLinear, quantize

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _pair(hidden=64):
    return tiny_llama(seed=1, hidden=hidden, layers=2), tiny_llama(seed=2, hidden=32, layers=2)


def _batch(n=4, seq=16):
    ds = TokenDataset(n=n, seq=seq, pad_last=3)
    return {k: torch.stack([it[k] for it in ds.items]) for k in ds.items[0]}


def _kd_loss(teacher, student, batch, **overrides):
    engine = DistillationEngine(teacher, DistillationConfig(loss_terms="kl", temperature=2.0, **overrides))
    engine.setup(student)
    with torch.no_grad():
        out = student(**{k: v for k, v in batch.items() if k != "labels"})
        return float(engine.compute(batch, out).loss), engine


def test_config_field_parses_and_validates():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(["--teacher_quantization", "int8"])
    assert cfg.teacher_quantization == "int8"
    assert DistillationConfig().teacher_quantization is None
    with pytest.raises(ValueError, match=r"teacher_quantization must be one of .*'int4'.*'int8'"):
        DistillationConfig(teacher_quantization="int4")


def test_int8_teacher_saves_memory_and_keeps_the_kd_loss():
    teacher, student = _pair()
    batch = _batch()
    fp32_bytes = teacher_memory_bytes(teacher)
    ref, _ = _kd_loss(copy.deepcopy(teacher), student, batch)
    q, engine = _kd_loss(teacher, student, batch, teacher_quantization="int8")
    layers = [m for m in engine.teacher.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and all(m.method == INT8_TEACHER_METHOD for m in layers)  # 7 linears x 2 layers
    assert type(engine.teacher.lm_head) is torch.nn.Linear  # the output head stays in float
    int8_bytes = teacher_memory_bytes(engine.teacher)
    # tiny model: the float embeddings and head are a large share; the decoder linears shrink 4x
    assert int8_bytes < 0.75 * fp32_bytes, (int8_bytes, fp32_bytes)
    assert abs(q - ref) < 0.02 * ref, (q, ref)
    assert not any(p.requires_grad for p in engine.teacher.parameters())
    print(
        f"\ntiny llama teacher: {fp32_bytes} B fp32 -> {int8_bytes} B int8; "
        f"KL {ref:.6g} -> {q:.6g} (rel. diff {abs(q - ref) / ref:.2e})"
    )


def test_int8_teacher_output_does_not_depend_on_the_batch():
    """Why per_token: a row's teacher logits are the same alone or beside other (padded) rows; the quantizer's
    default crossquant_dynamic_int8 measures column maxima over the whole call, so its rows depend on each other."""
    batch = _batch(n=3, seq=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for method, invariant in ((INT8_TEACHER_METHOD, True), ("crossquant_dynamic_int8", False)):
        model = quantize(tiny_llama(seed=1, hidden=64).eval(), method=method, fallback_rows=1)
        with torch.no_grad():
            together = model(input_ids=ids, attention_mask=mask).logits[0]
            alone = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0]
        same = torch.allclose(together, alone, rtol=0, atol=1e-5)
        assert same == invariant, (method, float((together - alone).abs().max()))


def test_quantized_once_across_setups_and_refused_twice():
    teacher, student = _pair()
    engine = DistillationEngine(teacher, DistillationConfig(teacher_quantization="int8"))
    engine.setup(student)
    engine.setup(student)  # a second setup (new student wrapper) does not quantize again
    assert engine.teacher.kd_quantization["method"] == INT8_TEACHER_METHOD
    with pytest.raises(ValueError, match="already quantized; leave teacher_quantization unset"):
        quantize_teacher(engine.teacher, "int8")
    with pytest.raises(ValueError, match="must be one of"):
        Teacher(tiny_llama(), quantization="int2")


def test_int8_teacher_through_the_callback(tmp_path):
    teacher, student = _pair()
    cb = DistillationCallback(teacher, DistillationConfig(loss_terms="kl", teacher_quantization="int8"))
    from transformers import Trainer

    args = training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=4)
    trainer = Trainer(model=student, args=args, train_dataset=TokenDataset(n=8, seq=12), callbacks=[cb])
    trainer.train()
    assert any(isinstance(m, QuantizedLinear) for m in cb.teacher.modules())
    assert any("kd_kl" in h for h in trainer.state.log_history)
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(t) in opt_ids for t in list(cb.teacher.parameters()) + list(cb.teacher.buffers()))


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed: the nf4 path runs instead")
def test_nf4_without_bitsandbytes_names_the_install():
    cfg = DistillationConfig(teacher_quantization="nf4")  # the config itself is valid
    with pytest.raises(ImportError, match=r"pip install bitsandbytes.*teacher_quantization='int8'"):
        DistillationEngine(tiny_llama(), cfg)  # refused when the engine is built, not at the first step


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install bitsandbytes)")
def test_nf4_teacher_saves_memory_and_keeps_the_kd_loss():
    teacher, student = _pair()
    batch = _batch()
    fp32_bytes = teacher_memory_bytes(teacher)
    ref, _ = _kd_loss(copy.deepcopy(teacher), student, batch)
    q, engine = _kd_loss(teacher, student, batch, teacher_quantization="nf4")
    names = {type(m).__name__ for m in engine.teacher.modules()}
    assert "Linear4bit" in names and type(engine.teacher.lm_head) is torch.nn.Linear
    nf4_bytes = teacher_memory_bytes(engine.teacher)
    assert nf4_bytes < 0.6 * fp32_bytes, (nf4_bytes, fp32_bytes)
    assert abs(q - ref) < 0.1 * ref, (q, ref)
    print(
        f"\ntiny llama teacher: {fp32_bytes} B fp32 -> {nf4_bytes} B nf4; "
        f"KL {ref:.6g} -> {q:.6g} (rel. diff {abs(q - ref) / ref:.2e})"
    )


def test_every_member_of_a_teacher_set_is_quantized():
    from kd_plugins import TeacherSet

    teachers = [tiny_llama(seed=1, hidden=64), tiny_llama(seed=3, hidden=64)]
    engine = DistillationEngine(TeacherSet(teachers), DistillationConfig(loss_terms="kl", teacher_quantization="int8"))
    engine.setup(tiny_llama(seed=2))
    assert all(any(isinstance(m, QuantizedLinear) for m in t.modules()) for t in teachers)
