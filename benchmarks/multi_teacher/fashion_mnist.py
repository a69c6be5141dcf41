#!/usr/bin/env python3
"""Multi-teacher distillation on Fashion-MNIST: TeacherSet, DistillNearest and DistillWeighted (not CI).

Teachers of different relevance (tiny CNNs, trained here once per run, seed 0, on a pool disjoint from the
students' images):

* ``t_0to4``: trained on the images of classes 0-4 only (10-way head);
* ``t_5to9``: classes 5-9 only;
* ``t_all``: all classes, on a smaller pool;
* ``t_random``: an unrelated task: a fixed random label per image (its features carry little about the classes).

Student: an MLP (784-256-10) with ``--labels`` labelled images (balanced) plus ``--unlabelled`` unlabelled ones. Its
loss is the cross-entropy on the labelled batch plus the distillation term (``kl`` at T = 2, the teachers' soft
labels) on an unlabelled batch, through :class:`kd_plugins.DistillationEngine` (plain torch modules, task
``seq_classification``). Arms: supervised only; each single teacher; uniform (the mixture of all four); Nearest
(``TeacherSet.nearest``: the teacher with the best leave-one-out kNN accuracy of its penultimate features on the
labelled images); Weighted (``TeacherSet.weighted``, ``softmax(score / tau)``, mixture aggregation); per-class
Weighted (``TeacherSet.class_weighted``: each teacher's accuracy on the labelled images of each class, rows weighted
by the classes the best-scoring teacher predicts for them, ``--class-tau``); MST-routed
(``MSTTeacherSet``: MST-Distill's top-1 router on the student's logits over the four plain teachers, balance term
weight 1, straight-through router gradient; no masks; its router is trained by ``engine.projector_step``, and each
teacher's share of the last epoch's rows is recorded). Test accuracy on the 10k test set after the last epoch,
mean +- std over seeds (nothing tuned on the test set; tau fixed a priori, or with ``--select`` chosen with the
aggregation, and the per-class arm's tau, on ``--valid`` labelled validation images from the training file).

Data: Debian ``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg-deb -x`` into ``.cache/fashion_mnist``; no root).

    OMP_NUM_THREADS=1 python benchmarks/multi_teacher/fashion_mnist.py           # 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/multi_teacher/fashion_mnist.py --smoke   # < 2 min: small sets, 1 seed
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, log, seed_table, set_threads_and_seed  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kd_plugins import DistillationConfig, DistillationEngine, TeacherSet  # noqa: E402
from kd_plugins.distill import score_teachers, score_teachers_per_class  # noqa: E402
from kd_plugins.distill.mst import MSTTeacherSet  # noqa: E402

CACHE = ROOT / ".cache" / "fashion_mnist"
DEB = "dataset-fashion-mnist"
MEAN, STD = 0.2860, 0.3530
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- data
def data_dir() -> Path:
    """The extracted Debian package (downloaded and unpacked on first use, without root)."""
    target = CACHE / "usr" / "share" / "datasets" / "fashion-mnist"
    if target.is_dir():
        return target
    for system in (Path("/usr/share/datasets/fashion-mnist"),):
        if system.is_dir():
            return system
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(Path("/var/cache/apt/archives").glob(f"{DEB}_*.deb")) or sorted(CACHE.glob(f"{DEB}_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", DEB], cwd=CACHE, check=True)
        debs = sorted(CACHE.glob(f"{DEB}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(CACHE)], check=True)
    return target


def read_idx(path: Path) -> np.ndarray:
    b = gzip.open(path, "rb").read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load(args) -> dict:
    d = data_dir()
    prep = lambda x: ((torch.from_numpy(x.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1)  # noqa: E731
    x, y = (
        prep(read_idx(d / "train-images-idx3-ubyte.gz")),
        torch.from_numpy(read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)),
    )
    xt, yt = (
        prep(read_idx(d / "t10k-images-idx3-ubyte.gz")),
        torch.from_numpy(read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)),
    )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    pool, rest = perm[: args.teacher_pool], perm[args.teacher_pool :]
    per_class = args.labels // 10
    labelled = torch.cat([rest[y[rest] == c][:per_class] for c in range(10)])
    unused = rest[~torch.isin(rest, labelled)]
    unlabelled = unused[: args.unlabelled]
    # labelled validation images from the training file, never trained on: they only choose DistillWeighted's
    # temperature and aggregation (--select); the test set is read once per arm
    valid = unused[args.unlabelled : args.unlabelled + args.valid]
    test = torch.arange(len(xt))[: args.test]
    return {
        "pool": (x[pool], y[pool]),
        "labelled": (x[labelled], y[labelled]),
        "unlabelled": x[unlabelled],
        "valid": (x[valid], y[valid]),
        "test": (xt[test], yt[test]),
    }


# ---------------------------------------------------------------------- models
class CNN(nn.Module):
    """A tiny teacher: two conv blocks, a 64-wide penultimate layer, a 10-way head; returns ``{"logits": ...}``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict:
        return {"logits": self.head(self.body(pixel_values))}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, pixel_values: torch.Tensor) -> dict:
        return {"logits": self.net(pixel_values)}


def train_teacher(x, y, epochs: int, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx])["logits"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def teachers(data: dict, args) -> dict[str, CNN]:
    x, y = data["pool"]
    low, high = y < 5, y >= 5
    n_all = len(x) // 4
    random_labels = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    specs = {
        "t_0to4": (x[low], y[low]),
        "t_5to9": (x[high], y[high]),
        "t_all": (x[:n_all], y[:n_all]),
        "t_random": (x, random_labels),
    }
    out = {}
    for name, (tx, ty) in specs.items():
        t0 = time.time()
        out[name] = train_teacher(tx, ty, args.teacher_epochs)
        acc = accuracy(out[name], data["test"])
        log(f"teacher {name}: {len(tx)} images, test acc {acc:.4f} ({time.time() - t0:.0f}s)")
    return out


@torch.no_grad()
def accuracy(model: nn.Module, data, bs: int = 1000) -> float:
    x, y = data
    model.eval()
    hits = sum(int((model(x[i : i + bs])["logits"].argmax(-1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs))
    return hits / len(x)


# ---------------------------------------------------------------------- students
def train_student(data: dict, teacher, seed: int, args, routing: list | None = None, split: str = "test") -> float:
    """CE on the labelled images + the distillation term on unlabelled batches; accuracy on ``split``. ``routing``
    (MST): receives the top-1 teacher index of every row of the last epoch."""
    set_threads_and_seed(args.threads, seed)
    student = MLP()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    engine = None
    if teacher is not None:
        cfg = DistillationConfig(task="seq_classification", loss_terms="kl", temperature=args.temperature)
        engine = DistillationEngine(teacher, cfg)
        engine.setup(student)
    (xl, yl), xu = data["labelled"], data["unlabelled"]
    g = torch.Generator().manual_seed(seed)
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(xu), generator=g).split(args.batch_size):
            lab = torch.randint(0, len(xl), (min(args.batch_size, len(xl)),), generator=g)
            loss = F.cross_entropy(student(xl[lab])["logits"], yl[lab])
            if engine is not None:
                batch = {"pixel_values": xu[idx]}
                loss = loss + args.kd_weight * engine.compute(batch, student(**batch)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if engine is not None:
                engine.projector_step(lr=1e-3)  # MST's router (no-op for the other arms: nothing to train)
            if routing is not None and epoch == args.epochs - 1:
                routing.append(teacher.last_routing.index[:, 0])
    return accuracy(student, data[split])


def select_weighted(data: dict, t: dict[str, CNN], scores: list[float], args) -> tuple[float, str, list[dict]]:
    """DistillWeighted's temperature and aggregation, chosen on the validation images (mean over ``--select-seeds``;
    ties go to the first grid entry). Returns ``(tau, aggregation, rows)``."""
    rows = []
    for aggregation in args.aggregations.split(","):
        for tau in (float(v) for v in args.tau_grid.split(",")):
            ts = TeacherSet.weighted(t, scores, tau, aggregation=aggregation)
            accs = [train_student(data, ts, seed, args, split="valid") for seed in args.select_seeds]
            rows.append({"tau": tau, "aggregation": aggregation, "weights": ts.weights.tolist(), "valid": accs})
            log(f"select: tau {tau:g} {aggregation}: valid {np.mean(accs):.4f} {accs}")
    best = max(rows, key=lambda r: np.mean(r["valid"]))
    return best["tau"], best["aggregation"], rows


def select_class_tau(data: dict, t: dict[str, CNN], class_scores: torch.Tensor, args) -> tuple[float, list[dict]]:
    """The per-class arm's tau, chosen on the validation images (mean over ``--select-seeds``)."""
    rows = []
    for tau in (float(v) for v in args.class_tau_grid.split(",")):
        ts = TeacherSet.class_weighted(t, class_scores, tau)
        accs = [train_student(data, ts, seed, args, split="valid") for seed in args.select_seeds]
        rows.append({"tau": tau, "valid": accs})
        log(f"select per-class: tau {tau:g}: valid {np.mean(accs):.4f} {accs}")
    return max(rows, key=lambda r: np.mean(r["valid"]))["tau"], rows


@torch.no_grad()
def mean_row_weights(tset: TeacherSet, t: dict[str, CNN], data: dict) -> dict[str, float]:
    """A class-weighted set's row weights averaged over the unlabelled images (the rows it distils)."""
    reference = t[tset.names[tset.class_relevance.reference]]
    w = tset.class_relevance.weights(reference(data["unlabelled"])["logits"]).mean(0)
    return {n: round(float(v), 4) for n, v in zip(tset.names, w)}


def arms(
    t: dict[str, CNN],
    scores: list[float],
    tau: float,
    aggregation: str = "mixture",
    class_scores: torch.Tensor | None = None,
    class_tau: float = 0.1,
) -> dict:
    names = list(t)
    out = {"supervised": None}
    out.update({f"single:{n}": TeacherSet({n: t[n]}) for n in names})
    out["uniform"] = TeacherSet(t)
    out["nearest"] = TeacherSet.nearest(t, scores)
    out["weighted"] = TeacherSet.weighted(t, scores, tau, aggregation=aggregation)
    if class_scores is not None:
        out["class_weighted"] = TeacherSet.class_weighted(t, class_scores, class_tau)
    out["mst_routed"] = lambda: MSTTeacherSet(t)  # a fresh router per seed
    return out


def summary(results: dict) -> list[str]:
    return seed_table(results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sets, 1 seed, 1 epoch (< 2 min on 1 thread)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-pool", type=int, default=24000)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--labels", type=int, default=100, help="labelled student images (balanced over 10 classes)")
    p.add_argument("--unlabelled", type=int, default=10000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--tau", type=float, default=0.05, help="DistillWeighted temperature on kNN accuracies")
    p.add_argument("--valid", type=int, default=1000, help="labelled validation images (selection only)")
    p.add_argument(
        "--select",
        action="store_true",
        help="choose DistillWeighted's tau and aggregation on the validation images (else --tau, mixture)",
    )
    p.add_argument("--tau-grid", default="0.02,0.05,0.1,0.2,0.5")
    p.add_argument("--class-tau", type=float, default=0.1, help="per-class Weighted temperature (accuracies)")
    p.add_argument("--class-tau-grid", default="0.05,0.1,0.2,0.5")
    p.add_argument("--aggregations", default="mixture,sum_of_divergences")
    p.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms (default: all)")
    p.add_argument("--out", default=str(RESULTS / "fashion_mnist.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.teacher_pool, args.teacher_epochs = [0], 4000, 1
        args.unlabelled, args.test, args.epochs = 2000, 2000, 1
        args.out = str(RESULTS / "fashion_mnist_smoke.json")
    set_threads_and_seed(args.threads, 0)
    t_start = time.time()
    data = load(args)
    t = teachers(data, args)
    xl, yl = data["labelled"]
    scores = score_teachers(t, [(xl, yl)], "knn", features=lambda m, x: m.features(x))
    class_scores = score_teachers_per_class(t, [(xl, yl)], "accuracy")
    selection, class_selection, aggregation = [], [], "mixture"
    if args.select:
        chosen_arms = args.arms.split(",") if args.arms else None
        if chosen_arms is None or "weighted" in chosen_arms:
            args.tau, aggregation, selection = select_weighted(data, t, scores, args)
            log(f"selected on validation: tau {args.tau:g}, {aggregation}")
        if chosen_arms is None or "class_weighted" in chosen_arms:
            args.class_tau, class_selection = select_class_tau(data, t, class_scores, args)
            log(f"selected on validation: per-class tau {args.class_tau:g}")
    weights = TeacherSet.weighted(t, scores, args.tau).weights.tolist()
    log("kNN scores " + ", ".join(f"{n} {s:.3f} (w {w:.3f})" for n, s, w in zip(t, scores, weights)))
    results, mst_routing = {}, {}
    chosen = arms(t, scores, args.tau, aggregation, class_scores, args.class_tau)
    if args.arms:
        chosen = {k: v for k, v in chosen.items() if k in args.arms.split(",")}
    for arm, teacher in chosen.items():
        results[arm] = []
        for seed in args.seeds:
            if callable(teacher):  # MST: a fresh set (router) per seed, and its routing shares
                routed: list = []
                results[arm].append(train_student(data, teacher(), seed, args, routing=routed))
                counts = torch.bincount(torch.cat(routed), minlength=len(t)).float()
                mst_routing[seed] = {n: round(float(c), 4) for n, c in zip(t, counts / counts.sum())}
                log(f"{arm} seed {seed}: rows routed per teacher {mst_routing[seed]}")
            else:
                results[arm].append(train_student(data, teacher, seed, args))
        log(f"{arm}: {results[arm]}")
    lines = summary(results)
    print("\n".join(lines))
    record = {
        "command": command_line(__file__, argv),
        "args": vars(args),
        "teachers": {
            n: {"test_accuracy": accuracy(m, data["test"]), "knn_score": s, "weight": w}
            for (n, m), s, w in zip(t.items(), scores, weights)
        },  # fmt: skip
        "nearest": TeacherSet.nearest(t, scores).names[0],
        "results": results,
        "mst_routing": mst_routing,
        "weighted": {"tau": args.tau, "aggregation": aggregation, "selection": selection},
        "class_weighted": {
            "scores": {n: [round(v, 3) for v in row] for n, row in zip(t, class_scores.tolist())},
            "mean_row_weights": mean_row_weights(TeacherSet.class_weighted(t, class_scores, args.class_tau), t, data),
            "reference": list(t)[TeacherSet.class_weighted(t, class_scores).class_relevance.reference],
            "tau": args.class_tau,
            "selection": class_selection,
        },
        "table": lines,
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    log(f"wrote {args.out} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
