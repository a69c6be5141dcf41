#!/usr/bin/env python3
"""Multi-teacher distillation on BBC News topics: a sentence-encoder student, two teachers of different quality.

* Student: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised; the encoder frozen) and a trainable
  linear head over the 5 topics, with ``--labels`` labelled articles (balanced) plus the rest of its pool unlabelled.
  Its loss is the cross-entropy on a labelled batch plus the distillation term (``kl`` at T = 2) on an unlabelled
  batch, through :class:`kd_plugins.DistillationEngine` with a :class:`kd_plugins.TeacherSet` (task
  ``seq_classification``); each teacher reads its own input column of the batch.
* Teachers, trained here on a labelled pool disjoint from the student's articles:

  - ``t_tfidf`` (good): a linear classifier on TF-IDF vectors (scikit-learn ``TfidfVectorizer`` fitted on the
    teacher pool), trained on every article of the teacher pool;
  - ``t_minilm_few`` (weak): a linear head on the MiniLM embeddings trained on ``--weak-labels`` articles per topic.

* Arms: supervised only; each single teacher; uniform (mixture of both); Nearest and Weighted (``TeacherSet.nearest``
  / ``TeacherSet.weighted``, ``softmax(score / tau)`` with tau fixed a priori at 0.05, as on Fashion-MNIST) under
  two relevance scores on the student's labelled articles: ``knn`` (leave-one-out 5-NN accuracy of each teacher's
  input representation: the paper's kind of score, fixed before the first run) and ``accuracy`` (each teacher's own
  predictions; added after the first run showed ``knn`` ranking the teachers backwards, see RESULTS); per-class
  Weighted (``TeacherSet.class_weighted``: each teacher's accuracy on the labelled articles of each topic, rows
  weighted by the topics the best-scoring teacher predicts, tau 0.1 a priori; added in session 19); MST-routed
  (``MSTTeacherSet``, top-1 router on the student's logits).
* Test accuracy on the 400 test articles of ``split_articles(seed=0)`` after the last epoch, mean +- std over seeds;
  nothing is tuned on them (every setting fixed before the run).

    OMP_NUM_THREADS=1 python benchmarks/multi_teacher/bbc_text.py           # 3 seeds, a few minutes
    OMP_NUM_THREADS=1 python benchmarks/multi_teacher/bbc_text.py --smoke   # 1 seed, few articles
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, log, replace_section, seed_table, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.data.bbc import split_articles  # noqa: E402
from kd_plugins import DistillationConfig, DistillationEngine, TeacherSet  # noqa: E402
from kd_plugins.distill import score_teachers, score_teachers_per_class  # noqa: E402
from kd_plugins.distill.mst import MSTTeacherSet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = ROOT / ".cache" / "multi_teacher"


# ---------------------------------------------------------------------- data
def texts_of(articles) -> list[str]:
    return [f"{a.title}. {a.body}" for a in articles]


def minilm_embeddings(texts: list[str], max_length: int) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings, cached under .cache/ by a hash of the texts."""
    key = hashlib.sha256(("\n\0".join(texts) + f"|{max_length}").encode()).hexdigest()[:16]
    path = CACHE / f"bbc_minilm_{key}.pt"
    if path.is_file():
        return torch.load(path)
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.data.models import minilm_path
    from benchmarks.data.retrieval import encode

    model, tok = AutoModel.from_pretrained(minilm_path()).eval(), AutoTokenizer.from_pretrained(minilm_path())
    t0 = time.time()
    emb = encode(model, tok, texts, batch_size=32, max_length=max_length)
    log(f"MiniLM embeddings of {len(texts)} articles: {time.time() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, path)
    return emb


def load(args) -> dict:
    split = split_articles(seed=0)
    train, test = split.train, split.test
    if args.smoke:
        train, test = train[:200], test[:60]
    topics = sorted({a.category for a in train})
    half = len(train) // 2
    teacher_pool, student_pool = train[:half], train[half:]
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(max_features=args.tfidf_features, sublinear_tf=True).fit(texts_of(teacher_pool))

    def columns(articles) -> dict:
        texts = texts_of(articles)
        return {
            "tfidf": torch.tensor(vec.transform(texts).toarray(), dtype=torch.float32),
            "minilm": minilm_embeddings(texts, args.max_length),
            "labels": torch.tensor([topics.index(a.category) for a in articles]),
        }

    data = {"teacher": columns(teacher_pool), "student": columns(student_pool), "test": columns(test)}
    data["topics"] = topics
    # the student's labelled articles: the first --labels // 5 of each topic (its pool is already shuffled)
    y = data["student"]["labels"]
    per = args.labels // len(topics)
    labelled = torch.cat([(y == c).nonzero().flatten()[:per] for c in range(len(topics))])
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[labelled] = True
    data["labelled"] = {k: v[mask] for k, v in data["student"].items()}
    data["unlabelled"] = {k: v[~mask] for k, v in data["student"].items() if k != "labels"}
    return data


# ---------------------------------------------------------------------- models
class TfidfClassifier(nn.Module):
    """A linear topic classifier on TF-IDF vectors (the ``tfidf`` column)."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.head = nn.Linear(d, k)

    def features(self, tfidf: torch.Tensor, **_) -> torch.Tensor:
        return tfidf

    def forward(self, tfidf: torch.Tensor) -> dict:
        return {"logits": self.head(tfidf)}


class MiniLMHead(nn.Module):
    """A linear head on the frozen MiniLM sentence embeddings (the ``minilm`` column): the student, or a teacher."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.head = nn.Linear(d, k)

    def features(self, minilm: torch.Tensor, **_) -> torch.Tensor:
        return minilm

    def forward(self, minilm: torch.Tensor) -> dict:
        return {"logits": self.head(minilm)}


def fit(model: nn.Module, inputs: dict, y: torch.Tensor, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            loss = F.cross_entropy(model(**{k: v[idx] for k, v in inputs.items()})["logits"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: dict) -> float:
    model.eval()
    names = set(inspect.signature(model.forward).parameters)
    logits = model(**{k: v for k, v in data.items() if k in names})["logits"]
    return float((logits.argmax(-1) == data["labels"]).float().mean())


def teachers(data: dict, args) -> dict[str, nn.Module]:
    pool, k = data["teacher"], len(data["topics"])
    y = pool["labels"]
    few = torch.cat([(y == c).nonzero().flatten()[: args.weak_labels] for c in range(k)])
    out = {
        "t_tfidf": fit(TfidfClassifier(pool["tfidf"].shape[1], k), {"tfidf": pool["tfidf"]}, y, 20, 1e-2),
        "t_minilm_few": fit(MiniLMHead(pool["minilm"].shape[1], k), {"minilm": pool["minilm"][few]}, y[few], 50, 1e-2),
    }
    for name, m in out.items():
        log(f"teacher {name}: test accuracy {accuracy(m, data['test']):.4f}")
    return out


# ---------------------------------------------------------------------- students
def train_student(data: dict, teacher, seed: int, args) -> float:
    set_threads_and_seed(args.threads, seed)
    k = len(data["topics"])
    student = MiniLMHead(data["labelled"]["minilm"].shape[1], k)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    engine = None
    if teacher is not None:
        cfg = DistillationConfig(task="seq_classification", loss_terms="kl", temperature=args.temperature)
        engine = DistillationEngine(teacher, cfg)
        engine.setup(student)
    lab, unl = data["labelled"], data["unlabelled"]
    n_lab, n_unl = len(lab["labels"]), len(unl["minilm"])
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(n_unl, generator=g).split(args.batch_size):
            rows = torch.randint(0, n_lab, (min(args.batch_size, n_lab),), generator=g)
            loss = F.cross_entropy(student(minilm=lab["minilm"][rows])["logits"], lab["labels"][rows])
            if engine is not None:
                batch = {key: v[idx] for key, v in unl.items()}
                loss = loss + args.kd_weight * engine.compute(batch, student(minilm=batch["minilm"])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if engine is not None:
                engine.projector_step(lr=1e-3)  # MST's router (no-op for the other arms)
    return accuracy(student, data["test"])


def _own(model: nn.Module, inputs: dict) -> dict:
    """The batch columns ``model.forward`` reads."""
    names = set(inspect.signature(model.forward).parameters)
    return {k: v for k, v in inputs.items() if k in names}


def arms(t: dict[str, nn.Module], scores: dict[str, list[float]], tau: float, class_scores, class_tau: float) -> dict:
    out = {"supervised": None}
    out.update({f"single:{n}": TeacherSet({n: m}) for n, m in t.items()})
    out["uniform"] = TeacherSet(t)
    for name, values in scores.items():
        out[f"nearest ({name})"] = TeacherSet.nearest(t, values)
        out[f"weighted ({name})"] = TeacherSet.weighted(t, values, tau)
    out["class_weighted (accuracy)"] = TeacherSet.class_weighted(t, class_scores, class_tau)
    out["mst_routed"] = lambda: MSTTeacherSet(t)  # a fresh router per seed
    return out


def summary(results: dict) -> list[str]:
    return seed_table(results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="few articles, 1 seed, 1 epoch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--labels", type=int, default=25, help="labelled student articles (balanced over 5 topics)")
    p.add_argument("--weak-labels", type=int, default=4, help="labelled articles per topic of the weak teacher")
    p.add_argument("--tfidf-features", type=int, default=5000)
    p.add_argument("--max-length", type=int, default=256, help="MiniLM tokens per article")
    p.add_argument("--epochs", type=int, default=20, help="passes over the student's unlabelled articles")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=0.05, help="DistillWeighted temperature on kNN accuracies")
    p.add_argument("--class-tau", type=float, default=0.1, help="per-class Weighted temperature (accuracies)")
    p.add_argument("--out", default=str(RESULTS / "bbc_text.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.max_length = [0], 1, 64
        args.out = str(ROOT / ".cache" / "multi_teacher" / "bbc_text_smoke.json")
    set_threads_and_seed(args.threads, 0)
    t_start = time.time()
    data = load(args)
    t = teachers(data, args)
    lab = data["labelled"]
    batch = ({"tfidf": lab["tfidf"], "minilm": lab["minilm"]}, lab["labels"])
    scores = {
        "knn": score_teachers(t, [batch], "knn", features=lambda m, x: m.features(**x)),
        "accuracy": score_teachers(t, [batch], "accuracy", features=lambda m, x: m(**_own(m, x))["logits"]),
    }
    class_scores = score_teachers_per_class(
        t, [batch], "accuracy", features=lambda m, x: m(**_own(m, x))["logits"]
    )  # fmt: skip
    log("per-class accuracy " + ", ".join(f"{n} {[round(v, 2) for v in r]}" for n, r in zip(t, class_scores.tolist())))
    weights = {name: TeacherSet.weighted(t, v, args.tau).weights.tolist() for name, v in scores.items()}
    for name in scores:
        log(
            f"{name} scores " + ", ".join(f"{n} {s:.3f} (w {w:.3f})" for n, s, w in zip(t, scores[name], weights[name]))
        )
    results = {}
    for arm, teacher in arms(t, scores, args.tau, class_scores, args.class_tau).items():
        results[arm] = [train_student(data, teacher() if callable(teacher) else teacher, s, args) for s in args.seeds]
        log(f"{arm}: {results[arm]}")
    lines = summary(results)
    print("\n".join(lines))
    record = {
        "command": command_line(__file__, argv),
        "args": vars(args),
        "teachers": {
            n: {
                "test_accuracy": accuracy(m, data["test"]),
                **{f"{name}_score": scores[name][i] for name in scores},
                **{f"{name}_weight": weights[name][i] for name in scores},
            }
            for i, (n, m) in enumerate(t.items())
        },
        "nearest": {name: TeacherSet.nearest(t, v).names[0] for name, v in scores.items()},
        "class_scores": {n: [round(v, 3) for v in r] for n, r in zip(t, class_scores.tolist())},
        "results": results,
        "table": lines,
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    log(f"wrote {args.out} ({record['wall_s']} s)")
    if not args.smoke:
        teacher_rows = "\n".join(
            f"| {n} | {v['test_accuracy']:.4f} | {v['knn_score']:.3f} / {v['knn_weight']:.3f} | "
            f"{v['accuracy_score']:.3f} / {v['accuracy_weight']:.3f} |"
            for n, v in record["teachers"].items()
        )
        section = (
            "## BBC News topics: a sentence-encoder student, two teachers of different quality\n\n"
            f"`OMP_NUM_THREADS=1 {record['command']}` ({record['wall_s']:.0f} s). Raw results: `results/bbc_text.json`."
            " Setup: the script's docstring.\n\n"
            "| teacher | test accuracy | knn score / weight | accuracy score / weight |\n"
            f"|---|---|---|---|\n{teacher_rows}\n\n" + "\n".join(lines) + "\n"
        )
        replace_section(Path(__file__).resolve().parent / "RESULTS_multi_teacher.md", "## BBC News topics", section, "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
