"""Tiny random models and datasets shared by the tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def tiny_llama(vocab=96, hidden=32, layers=2, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )
    return LlamaForCausalLM(cfg)


def tiny_bert(cls="BertModel", vocab=96, hidden=32, layers=2, seed=0, num_labels=3, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kw,
    )
    return getattr(transformers, cls)(cfg)


class TokenDataset(Dataset):
    """Random token sequences; labels = input_ids (causal LM) or per-task labels."""

    def __init__(self, n=16, seq=12, vocab=96, seed=0, labels="lm", num_labels=3, pad_last=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            ids = torch.randint(4, vocab, (seq,), generator=g)
            am = torch.ones(seq, dtype=torch.long)
            if pad_last and i % 2:
                ids[-pad_last:] = 0
                am[-pad_last:] = 0
            item = {"input_ids": ids, "attention_mask": am}
            if labels == "lm":
                lab = ids.clone()
                lab[am == 0] = -100
                item["labels"] = lab
            elif labels == "seq":
                item["labels"] = torch.tensor(int(torch.randint(0, num_labels, (1,), generator=g)))
            elif labels == "token":
                lab = torch.randint(0, num_labels, (seq,), generator=g)
                lab[am == 0] = -100
                item["labels"] = lab
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def collate_tokens(ds, idx, left=False):
    """Collate examples ``idx`` of a TokenDataset, moving the padding to the left when asked."""
    items = [ds[i] for i in idx]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if left:
        for row in range(len(idx)):
            am = batch["attention_mask"][row].bool()
            for key in batch:
                batch[key][row] = torch.cat([batch[key][row][~am], batch[key][row][am]])
    return batch


def parity_args(out):
    """Two SGD steps of 2 x 2 examples (GA 2), no clipping: a fused-vs-plain parity run whose updates show any
    difference in the optimised loss."""
    return training_args(
        out,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        max_grad_norm=0.0,
    )


def fused_and_plain_runs(make_student, make_callback, dataset, out):
    """Train a fresh student twice with :func:`parity_args`, once with ``make_callback(True)`` (fused loss) and once
    with ``make_callback(False)``; returns ``[(final state_dict, kd log rows)]`` for the two runs."""
    from transformers import Trainer

    runs = []
    for fused in (True, False):
        student, cb = make_student(), make_callback(fused)
        trainer = Trainer(model=student, args=parity_args(out + str(fused)), train_dataset=dataset, callbacks=[cb])
        trainer.train()
        assert cb.fused.enabled is fused
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        runs.append((state, [h for h in trainer.state.log_history if "kd_loss" in h]))
    return runs


def assert_same_training(runs, loss):
    """The two runs of :func:`fused_and_plain_runs` reached the same student with the same logged KD values."""
    import pytest

    (w_fused, logs_fused), (w_plain, logs_plain) = runs
    for k in w_fused:
        torch.testing.assert_close(w_fused[k], w_plain[k], rtol=1e-4, atol=1e-6)
    for a, b in zip(logs_fused, logs_plain):
        assert a["agreement"] == pytest.approx(b["agreement"], abs=1e-6)
        assert a[f"kd_{loss}"] == pytest.approx(b[f"kd_{loss}"], rel=1e-4)
