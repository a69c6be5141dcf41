"""One training step with a plugin callback; run under torchrun (2 gloo ranks) or in a single process. Saves the
student (and projector) weights. ``KIND``: ``distill`` (DistillationCallback), ``multiexit`` (MultiExitCallback
with a frozen teacher), ``acm`` (ACMCallback, noiseless gates, KD from the original model), ``gradmag``
(DistillationCallback with ``term_balance="gradmag"``) or ``crosstok`` (a teacher with another tokenizer: ALM and
chunk hidden states).

Usage: ``python ddp_worker.py OUT PER_DEVICE_BATCH [KIND]``."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny import TokenDataset, tiny_llama, training_args  # noqa: E402
from torchrun_util import leave_distributed  # noqa: E402
from transformers import Trainer  # noqa: E402

from kd_plugins import DistillationCallback, DistillationConfig  # noqa: E402


def make_dataset():
    ds = TokenDataset(n=4, seq=12)
    for i, it in enumerate(ds.items):  # uneven numbers of labelled tokens per sample
        it["labels"][: 2 + 3 * i] = -100
    return ds


def crosstok_setup():
    """(teacher, student, callback, dataset, student tokenizer): two tiny Llamas of one width reading four texts
    through two BPEs trained in the process (deterministic, so every rank builds the same ones)."""
    from crosstok_tokenizers import byte_bpe, metaspace_bpe

    s_tok, t_tok = byte_bpe(320), metaspace_bpe(520, bos=True)
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A single man  in possession of a good fortune, naive cafe.",
        "Shares rose 5% to 3.20, analysts said on Monday.",
        "It is a truth universally acknowledged.",
    ]
    enc = s_tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    data = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
        for i in range(4)
    ]
    teacher, student = tiny_llama(vocab=len(t_tok), seed=1, layers=3), tiny_llama(vocab=len(s_tok), seed=2)
    # normalize="none": channel-normalised chunk_hidden divides by the teacher's moments of each micro-batch, which
    # per-rank batches cannot reproduce; the plain squared error is a sum over chunks like ALM
    cfg = DistillationConfig(
        loss_terms="alm:1.0,chunk_hidden:0.5",
        hard_label_weight=0.5,
        loss_kwargs={"chunk_hidden": {"normalize": "none"}},
    )
    return teacher, student, DistillationCallback(teacher, cfg, teacher_tokenizer=t_tok), data, s_tok


def make_callback(kind):
    """(teacher, student, callback) for ``kind``."""
    if kind == "multiexit":
        from kd_plugins import MultiExitCallback
        from kd_plugins.multiexit import MultiExitConfig, add_exits

        teacher, student = tiny_llama(seed=1, hidden=48, layers=3), tiny_llama(seed=2, hidden=32, layers=3)
        add_exits(student, layers=[1, 2, 3], head="separate")
        return teacher, student, MultiExitCallback(teacher, MultiExitConfig(temperature=2.0))
    if kind == "acm":
        import copy

        from kd_plugins import ACMCallback
        from kd_plugins.acm import ACMConfig, acmize

        student = tiny_llama(seed=2, hidden=32)
        teacher = copy.deepcopy(student)
        # budget / entropy / diversity are non-linear in batch statistics (per-rank batches cannot reproduce the
        # full batch exactly): parity is checked on the task + distillation terms, which are token means
        cfg = ACMConfig(num_learners=2, gate_noise=False, alpha_budget=0.0, alpha_entropy=0.0, alpha_diversity=0.0)
        acmize(student, config=cfg)
        return teacher, student, ACMCallback(teacher, cfg)
    teacher, student = tiny_llama(seed=1, hidden=48), tiny_llama(seed=2, hidden=32)
    if kind == "gradmag":  # each rank balances its own micro-batch: runs under DDP, no single-process parity
        cfg = DistillationConfig(loss_terms="kl", temperature=2.0, hard_label_weight=0.5, term_balance="gradmag")
        return teacher, student, DistillationCallback(teacher, cfg)
    cfg = DistillationConfig(
        loss_terms={"kl": 1.0, "hidden_mse": 0.5},
        temperature=2.0,
        hard_label_weight=0.5,
        feature_pairs={"model.layers.1": "model.layers.1"},
    )
    return teacher, student, DistillationCallback(teacher, cfg)


def main(out_file, per_device_batch, kind="distill"):
    torch.set_num_threads(1)
    dataset, tokenizer = make_dataset(), None
    if kind == "crosstok":
        teacher, student, cb, dataset, tokenizer = crosstok_setup()
    else:
        teacher, student, cb = make_callback(kind)
    extra = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    args = training_args(
        os.path.dirname(out_file),
        per_device_train_batch_size=per_device_batch,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        **extra,
    )
    trainer = Trainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[cb])
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        assert trainer.model_wrapped.module is student
    if kind == "crosstok":  # the terms took part in the step (parity alone would also hold without them)
        logged = next(h for h in trainer.state.log_history if "kd_alm" in h)
        assert logged["kd_alm"] > 0 and logged["kd_chunk_hidden"] > 0, logged
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())
    assert not any(type(m).__name__ == "DistributedDataParallel" for m in [teacher])
    if int(os.environ.get("RANK", "0")) == 0:
        tensors = {f"student.{k}": v.detach().contiguous() for k, v in student.state_dict().items()}
        if kind == "distill":
            tensors.update({f"proj.{k}": v.detach().contiguous() for k, v in cb.engine.projectors.state_dict().items()})
        save_file(tensors, out_file)
    leave_distributed()  # see its docstring: interpreter teardown races gloo's worker threads


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "distill")
