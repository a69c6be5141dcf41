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
