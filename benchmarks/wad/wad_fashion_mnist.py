#!/usr/bin/env python3
"""WAD on Fashion-MNIST with a class distribution mismatch: few labels, an unlabelled pool with unknown classes.

Known classes 0-5 (T-shirt, trouser, pullover, dress, coat, sandal): ``--per-class`` labelled images each (drawn per
seed). Unlabelled pool (fixed, disjoint from the labelled images): ``--pool`` images, a share ``--unknown-share`` of
them from the unknown classes 6-9 (shirt, sneaker, bag, ankle boot), the rest from the known classes, balanced.
Test: the 6000 test images of the known classes.

Teacher: a small CNN trained here with SimCLR (NT-Xent, temperature ``--simclr-tau``; augmentations: random shift
by up to 3 px, horizontal flip, Gaussian noise, contrast jitter) on the unlabelled pool only, no labels. Its 128-d
features (before the projection head) give :func:`kd_plugins.wad_weights_from_teacher` the PMI weights and
pseudo-labels, with the WAD temperature set to the SimCLR temperature.

Students (a small CNN, 6-way head), all through :class:`kd_plugins.WADTask` on one loader of
:class:`kd_plugins.WADDataset` (labelled images repeated so that each batch holds ~1/3 labelled rows), at equal
steps, Adam, weak augmentation (shift + flip) on every row:

* ``supervised``: ``wad_weight=0`` (cross-entropy on the labelled rows only);
* ``pseudo_label``: cross-entropy to the PMI argmax labels, every weight 1;
* ``distill_unweighted``: KL to ``softmax(pmi)``, every weight 1;
* ``wad``: the paper's form, cross-entropy to the pseudo-labels weighted by the WAD weights;
* ``wad_soft``: KL to ``softmax(pmi)`` weighted by the WAD weights.

Reported: test accuracy on the known classes (mean +- std over seeds), the teacher's own PMI classifier accuracy,
the share of unknown-class pool images filtered (weight < 0.5) and of known-class ones kept (weight >= 0.5).

    OMP_NUM_THREADS=1 python benchmarks/wad/wad_fashion_mnist.py            # 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/wad/wad_fashion_mnist.py --smoke    # < 1 min: tiny sets, 1 seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, log, seed_table, set_threads_and_seed, use_benchmark  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from kd_plugins import WADDataset, WADTask, WADWeights, wad_weights_from_teacher  # noqa: E402

use_benchmark("multi_teacher")
from fashion_mnist import MEAN, STD, data_dir, read_idx  # noqa: E402

KNOWN = 6
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------- data
def load_split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = data_dir()
    x = torch.from_numpy(read_idx(d / f"{prefix}-images-idx3-ubyte.gz").copy()).float() / 255.0
    y = torch.from_numpy(read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return ((x - MEAN) / STD).unsqueeze(1), y


def pool_and_rest(y: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled pool (fixed, seed 0; balanced within known and within unknown classes) and the other images."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_unknown = round(args.pool * args.unknown_share)
    per_known, per_unknown = (args.pool - n_unknown) // KNOWN, n_unknown // (10 - KNOWN)
    pool = torch.cat([perm[y[perm] == c][: per_known if c < KNOWN else per_unknown] for c in range(10)])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))]
    return pool, perm[~torch.isin(perm, pool)]


def labelled_indices(y: torch.Tensor, rest: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    picks = []
    for c in range(KNOWN):
        of_c = rest[y[rest] == c]
        picks.append(of_c[torch.randperm(len(of_c), generator=g)[:per_class]])
    return torch.cat(picks)


# ---------------------------------------------------------------------- models and augmentation
def body(width: int = 16, dim: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 49, dim), nn.ReLU(),
    )  # fmt: skip


class Student(nn.Module):
    def __init__(self, num_classes: int = KNOWN):
        super().__init__()
        self.num_classes = num_classes
        self.body = body()
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def shift_flip(x: torch.Tensor, g: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Per image: a random shift by up to ``max_shift`` whole pixels (the background fills in) and a horizontal flip
    with probability 1/2 (one ``grid_sample`` for the batch)."""
    n, size = len(x), x.shape[-1]
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g).float() * 2 / size
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = flip, 1.0, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = -MEAN / STD
    out = F.grid_sample(x - background, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out + background


def simclr_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = shift_flip(x, g)
    contrast = 0.6 + 0.8 * torch.rand(len(x), 1, 1, 1, generator=g)
    return out * contrast + 0.3 * torch.randn(out.shape, generator=g)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def train_simclr(x: torch.Tensor, args) -> nn.Module:
    """The teacher's encoder (128-d features), trained with SimCLR on ``x`` only (no labels)."""
    set_threads_and_seed(args.threads, 0)
    encoder = body(16, 128)
    projector = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    params = list(encoder.parameters()) + list(projector.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(args.simclr_epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=g).split(args.simclr_batch):
            if len(idx) < 2:
                continue
            xb = x[idx]
            loss = nt_xent(
                projector(encoder(simclr_view(xb, g))), projector(encoder(simclr_view(xb, g))), args.simclr_tau
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log(f"simclr epoch {epoch}: loss {total / len(x):.3f} ({time.time() - t0:.0f}s)")
    return encoder.eval()


# ---------------------------------------------------------------------- WAD weights and the teacher's figures
def batches(x: torch.Tensor, y: torch.Tensor | None = None, bs: int = 1000) -> DataLoader:
    data = TensorDataset(x, y) if y is not None else TensorDataset(x)
    return DataLoader(data, batch_size=bs)


def filter_stats(wad: WADWeights, true_pool: torch.Tensor) -> dict:
    known = true_pool < KNOWN
    kept = wad.kept(0.5)
    return {
        "unknown_filtered": float((~kept[~known]).float().mean()),
        "known_kept": float(kept[known].float().mean()),
        "mean_weight_known": float(wad.weights[known].mean()),
        "mean_weight_unknown": float(wad.weights[~known].mean()),
        "pseudo_label_acc_known": float((wad.pseudo_labels[known] == true_pool[known]).float().mean()),
        "pseudo_label_acc_known_kept": float(
            (wad.pseudo_labels[known & kept] == true_pool[known & kept]).float().mean()
        ),
        "kept_share_unknown_among_kept": float((kept & ~known).sum() / kept.sum().clamp_min(1)),
        # per true class: share kept, mean weight, and the pseudo-label it gets most often
        "per_class": {
            c: {
                "kept": float(kept[true_pool == c].float().mean()),
                "mean_weight": float(wad.weights[true_pool == c].mean()),
                "top_pseudo_label": int(wad.pseudo_labels[true_pool == c].mode().values),
            }
            for c in range(10)
        },
    }


def arm_weights(wad: WADWeights) -> dict[str, tuple[WADWeights, dict]]:
    ones = WADWeights(torch.ones_like(wad.weights), wad.pseudo_labels, wad.pmi)
    return {
        "supervised": (ones, {"wad_weight": 0.0}),
        "pseudo_label": (ones, {}),
        "distill_unweighted": (ones, {"target": "soft"}),
        "wad": (wad, {}),
        "wad_soft": (wad, {"target": "soft"}),
    }


# ---------------------------------------------------------------------- students
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    return sum(int((model(x[i : i + bs]).argmax(-1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)


def train_student(train_set: WADDataset, wad: WADWeights, overrides: dict, test, seed: int, args) -> float:
    set_threads_and_seed(args.threads, seed)
    task = WADTask(Student(), wad, num_unlabelled=train_set.num_unlabelled, **overrides)
    opt = torch.optim.Adam(task.get_trainable_module().parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=g)
    step = 0
    task.train()
    while step < args.steps:
        for x, target in loader:
            out = task(shift_flip(x, g), target)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            step += 1
            if step >= args.steps:
                break
    return accuracy(task.model, *test)


def summary(results: dict) -> list[str]:
    return seed_table(results, "test accuracy, 6 known classes")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sets, 1 seed (< 1 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-class", type=int, default=25, help="labelled images per known class")
    p.add_argument("--pool", type=int, default=6000, help="unlabelled pool size")
    p.add_argument("--unknown-share", type=float, default=0.5, help="share of the pool from unknown classes")
    p.add_argument("--simclr-epochs", type=int, default=30)
    p.add_argument("--simclr-batch", type=int, default=256)
    p.add_argument("--simclr-tau", type=float, default=0.2, help="SimCLR temperature, also the WAD temperature")
    p.add_argument("--steps", type=int, default=800, help="student steps, every arm")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--arms", nargs="*", default=None, help="student arms to run (default: all; none: teacher only)")
    p.add_argument("--out", default=str(RESULTS / "wad_fashion_mnist.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.pool, args.simclr_epochs, args.steps = [0], 600, 2, 30
        args.out = str(RESULTS / "wad_fashion_mnist_smoke.json")
    return args


def main(argv=None):
    args = parse(argv)
    set_threads_and_seed(args.threads, 0)
    t_start = time.time()
    x, y = load_split("train")
    xt, yt = load_split("t10k")
    test = (xt[yt < KNOWN], yt[yt < KNOWN])
    pool, rest = pool_and_rest(y, args)
    x_pool, true_pool = x[pool], y[pool]
    log(f"pool {len(pool)} images ({float((true_pool >= KNOWN).float().mean()):.0%} unknown classes)")
    encoder = train_simclr(x_pool, args)
    t_teacher = time.time() - t_start
    results: dict[str, list[float]] = {}
    stats, teacher_acc = {}, {}
    for seed in args.seeds:
        lab = labelled_indices(y, rest, args.per_class, seed)
        xl, yl = x[lab], y[lab]
        wad = wad_weights_from_teacher(encoder, batches(xl, yl), batches(x_pool), KNOWN, temperature=args.simclr_tau)
        on_test = wad_weights_from_teacher(
            encoder, batches(xl, yl), batches(test[0]), KNOWN, temperature=args.simclr_tau
        )
        teacher_acc[seed] = float((on_test.pseudo_labels == test[1]).float().mean())
        stats[seed] = filter_stats(wad, true_pool)
        log(f"seed {seed}: teacher PMI classifier test acc {teacher_acc[seed]:.4f}; pool {stats[seed]}")
        train_set = WADDataset(
            TensorDataset(xl, yl), TensorDataset(x_pool), labelled_repeats=max(1, len(pool) // (2 * len(lab)))
        )
        for arm, (weights, overrides) in arm_weights(wad).items():
            if args.arms is not None and arm not in args.arms:
                continue
            t0 = time.time()
            acc = train_student(train_set, weights, overrides, test, seed, args)
            results.setdefault(arm, []).append(acc)
            log(f"seed {seed} {arm}: {acc:.4f} ({time.time() - t0:.0f}s)")
    lines = summary(results)
    print("\n".join(lines))
    record = {
        "command": command_line(__file__, argv),
        "args": vars(args),
        "teacher_train_s": round(t_teacher, 1),
        "teacher_pmi_test_accuracy": teacher_acc,
        "pool_filter": stats,
        "results": results,
        "table": lines,
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    log(f"wrote {args.out} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
