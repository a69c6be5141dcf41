#!/usr/bin/env python3
"""ProC-KD on Fashion-MNIST: a 10-class teacher, a student on a 5-class grouping (not CI).

Teacher: a timm ResNet (BasicBlock, stages 1-1-1-1, widths 32-64-96-128, ``output_stride=8``: the last map is 4x4 at
28x28), trained on the 10 classes over a pool of ``--teacher-pool`` images (seed 0, once per run).

Student task: the 10 classes grouped into 5 (a label space the teacher was never trained on):

    0 tops           T-shirt/top (0), Pullover (2), Shirt (6)
    1 bottoms        Trouser (1)
    2 dresses+coats  Dress (3), Coat (4)
    3 footwear       Sandal (5), Sneaker (7), Ankle boot (9)
    4 bags           Bag (8)

Student: the same ResNet family, widths 16-24-32-64, 5-way head. Label budget: ``--labels-per-class`` labelled images
per group (disjoint from the teacher's pool), plus ``--unlabelled`` images without labels. Every step sees
``--labelled-batch`` labelled rows and ``--unlabelled-batch`` unlabelled rows (label -100, ignored by the
cross-entropy); the distillation terms use all rows. Arms, at equal steps and on the same batches:

* ``student``: cross-entropy only (``ProCKDTask`` is not used; a ``KDTask`` with no distillation term);
* ``feature_kd``: ``KDTask(loss_terms="hidden_mse", feature_pairs="-1=-1")``: FitNets MSE of the 1x1-projected last
  student map against the teacher's last map (weight 1);
* ``prockd``: ``ProCKDTask()`` with its defaults (K = 32, tau = 0.1, the three terms at weight 1).

Adam (lr 2e-3), test accuracy on the 10k Fashion-MNIST test images mapped to the 5 groups, after the last step.
Nothing is tuned on the test set.

    OMP_NUM_THREADS=1 python benchmarks/prockd/fashion_mnist_prockd.py           # 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/prockd/fashion_mnist_prockd.py --smoke   # ~1 min, 1 seed
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
from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

use_benchmark("multi_teacher")
from fashion_mnist import MEAN, STD, data_dir, read_idx  # noqa: E402

from kd_plugins import DistillationConfig  # noqa: E402
from kd_plugins.integrations.timm import KDTask, ProCKDTask  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Fashion-MNIST class -> group (see the module docstring).
GROUPS = torch.tensor([0, 1, 0, 2, 2, 3, 0, 3, 4, 3])
GROUP_NAMES = ["tops", "bottoms", "dresses+coats", "footwear", "bags"]
NORM = dict(student_mean=(0.0,), student_std=(1.0,), teacher_mean=(0.0,), teacher_std=(1.0,))


def resnet(widths: tuple[int, ...], num_classes: int, seed: int) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(
        BasicBlock, (1, 1, 1, 1), channels=widths, stem_width=widths[0], in_chans=1, num_classes=num_classes,
        output_stride=8,
    )  # fmt: skip


def load(args) -> dict:
    d = data_dir()
    prep = lambda x: ((torch.from_numpy(x.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1)  # noqa: E731
    x = prep(read_idx(d / "train-images-idx3-ubyte.gz"))
    y = torch.from_numpy(read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64))
    xt = prep(read_idx(d / "t10k-images-idx3-ubyte.gz"))
    yt = torch.from_numpy(read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    pool, rest = perm[: args.teacher_pool], perm[args.teacher_pool :]
    g = GROUPS[y[rest]]
    labelled = torch.cat([rest[g == c][: args.labels_per_class] for c in range(5)])
    unlabelled = rest[~torch.isin(rest, labelled)][: args.unlabelled]
    test = torch.arange(len(xt))[: args.test]
    return {
        "pool": (x[pool], y[pool]),
        "labelled": (x[labelled], GROUPS[y[labelled]]),
        "unlabelled": x[unlabelled],
        "test10": (xt[test], yt[test]),
        "test5": (xt[test], GROUPS[yt[test]]),
    }


@torch.no_grad()
def accuracy(model: nn.Module, data, bs: int = 1000) -> float:
    x, y = data
    model.eval()
    hits = sum(int((model(x[i : i + bs]).argmax(-1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs))
    return hits / len(x)


def train_teacher(data: dict, args) -> ResNet:
    x, y = data["pool"]
    model = resnet((32, 64, 96, 128), 10, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.teacher_epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def make_task(arm: str, student: nn.Module, teacher: nn.Module):
    common = dict(student_model=student, teacher_model=teacher, criterion=nn.CrossEntropyLoss(), verbose=False)
    common.update(NORM, input_size=28)
    if arm == "student":
        return KDTask(config=DistillationConfig(loss_terms="", hard_label_weight=1.0), **common)
    if arm == "feature_kd":
        return KDTask(
            loss_terms="hidden_mse:1", feature_pairs="-1=-1", task_loss_weight=1.0, distill_loss_weight=1.0, **common
        )
    if arm == "prockd":
        return ProCKDTask(**common)
    raise ValueError(arm)


def train_student(arm: str, data: dict, teacher: nn.Module, seed: int, args) -> dict:
    set_threads_and_seed(args.threads, seed)
    task = make_task(arm, resnet((16, 24, 32, 64), 5, seed=100 + seed), teacher)
    params = task.get_trainable_module().parameters()
    opt = torch.optim.Adam(params, lr=args.lr)
    (xl, yl), xu = data["labelled"], data["unlabelled"]
    g = torch.Generator().manual_seed(seed)
    last: dict = {}
    task.train()
    for _ in range(args.steps):
        lab = torch.randint(0, len(xl), (args.labelled_batch,), generator=g)
        unl = torch.randint(0, len(xu), (args.unlabelled_batch,), generator=g)
        x = torch.cat([xl[lab], xu[unl]])
        y = torch.cat([yl[lab], torch.full((args.unlabelled_batch,), -100)])
        res = task(x, y)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        last = {k: float(v.detach()) for k, v in res.items() if k != "output" and v.dim() == 0}
    acc = accuracy(task.get_eval_model(), data["test5"])
    return {"accuracy": acc, "last_losses": last}


def summary(results: dict) -> list[str]:
    return seed_table({arm: [r["accuracy"] for r in runs] for arm, runs in results.items()}, "5-group test accuracy")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sets, 1 seed, few steps (~1 min on 1 thread)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["student", "feature_kd", "prockd"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-pool", type=int, default=30000)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--unlabelled", type=int, default=20000)
    p.add_argument("--labelled-batch", type=int, default=32)
    p.add_argument("--unlabelled-batch", type=int, default=96)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--out", default=str(HERE / "results" / "fashion_mnist_prockd.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.teacher_pool, args.teacher_epochs, args.steps, args.test = [0], 4000, 1, 60, 2000
        args.out = str(HERE / "results" / "fashion_mnist_prockd_smoke.json")
    set_threads_and_seed(args.threads, 0)
    t_start = time.time()
    data = load(args)
    teacher = train_teacher(data, args)
    t_acc = accuracy(teacher, data["test10"])
    t_acc5 = accuracy(nn.Sequential(teacher, _GroupLogits()), data["test5"])
    log(f"teacher: 10-class test acc {t_acc:.4f}, grouped to 5 {t_acc5:.4f} ({time.time() - t_start:.0f}s)")
    results: dict = {}
    for arm in args.arms:
        results[arm] = []
        for seed in args.seeds:
            t0 = time.time()
            results[arm].append(train_student(arm, data, teacher, seed, args))
            log(f"{arm} seed {seed}: {results[arm][-1]['accuracy']:.4f} ({time.time() - t0:.0f}s)")
    lines = summary(results)
    print("\n".join(lines))
    record = {
        "command": command_line(__file__, argv),
        "args": vars(args),
        "groups": {name: [int(c) for c in torch.nonzero(GROUPS == i).flatten()] for i, name in enumerate(GROUP_NAMES)},
        "teacher": {"test_accuracy_10": t_acc, "test_accuracy_grouped_5": t_acc5},
        "results": results,
        "table": lines,
        "wall_s": round(time.time() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    log(f"wrote {args.out} ({record['wall_s']} s)")


class _GroupLogits(nn.Module):
    """10-class logits -> 5-group scores (log of the summed probabilities): the teacher's own 5-group accuracy."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(-1)
        return torch.zeros(len(probs), 5).index_add_(1, GROUPS, probs)


if __name__ == "__main__":
    main()
