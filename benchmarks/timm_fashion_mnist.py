#!/usr/bin/env python3
"""Fashion-MNIST distillation benchmark for the timm integration (not CI).

Two heterogeneous teacher -> student pairs, built with timm:

* ``cnn2vit``: ResNet-10t-style CNN teacher (1.27 M params) -> tiny ViT student (patch 7, 4 blocks, width 64,
  0.21 M params);
* ``vit2cnn``: ViT teacher (patch 4, 4 blocks, width 96, 0.46 M) -> narrow ResNet-10t student (0.08 M).

Each teacher is trained once (seed 0) and cached under ``.cache/timm_fmnist/``. Every student is trained with the
same data, epochs, optimizer and seeds: alone (timm ``ClassificationTask``), logit KD (``kl``, T=4), DKD (alpha 1,
beta 8, T=4), OFA-KD (eps 1.5, exit branches at the default stages) and feature KD (``hidden_mse`` on the last two
stages with learned projectors), all through ``KDTask``. Accuracy on the full 10k test set after the last epoch
(nothing is selected or tuned on the test set; the validation split is held out of the training set). Then the
per-step training time of ``KDTask(kl)`` vs timm's ``LogitDistillationTask`` on the same pair and batches,
alternating blocks of steps in one process.

Data: Debian ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), 28x28 grey images.

    python benchmarks/timm_fashion_mnist.py            # ~20-25 min on 2 cores (two worker processes)
    python benchmarks/timm_fashion_mnist.py --quick    # smoke run (tiny subset, 1 seed, 1 epoch)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA_DIR = "/usr/share/datasets/fashion-mnist"
CACHE = os.path.join(ROOT, ".cache", "timm_fmnist")
MEAN, STD = (0.2860,), (0.3530,)
METHODS = ("alone", "kl", "dkd", "ofa", "feature")

PAIRS = {
    "cnn2vit": {
        "teacher": ("resnet10t", dict(channels=(32, 64, 128, 256), stem_width=32)),
        "student": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=7, depth=4, embed_dim=64, num_heads=2)),
    },
    "vit2cnn": {
        "teacher": ("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, depth=4, embed_dim=96, num_heads=3)),
        "student": ("resnet10t", dict(channels=(8, 16, 32, 64), stem_width=8)),
    },
}
KD_KWARGS = {
    "kl": dict(loss_terms={"kl": 1.0}, temperature=4.0),
    "dkd": dict(loss_terms={"dkd": 1.0}, loss_kwargs={"dkd": {"alpha": 1.0, "beta": 8.0}}, temperature=4.0),
    "ofa": dict(loss_terms={"ofa": 1.0}, loss_kwargs={"ofa": {"eps": 1.5}}),
    "feature": dict(loss_terms={"hidden_mse": 1.0}, feature_pairs={-2: -2, -1: -1}),
}


def read_idx(path):
    b = gzip.open(path, "rb").read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load_data(train_size, val_size, teacher_size):
    if not os.path.isdir(DATA_DIR):
        raise SystemExit(f"{DATA_DIR} not found: apt-get install dataset-fashion-mnist")
    xs = read_idx(f"{DATA_DIR}/train-images-idx3-ubyte.gz")
    ys = read_idx(f"{DATA_DIR}/train-labels-idx1-ubyte.gz")
    xt = read_idx(f"{DATA_DIR}/t10k-images-idx3-ubyte.gz")
    yt = read_idx(f"{DATA_DIR}/t10k-labels-idx1-ubyte.gz")

    def prep(x):
        return ((torch.from_numpy(x.copy()).float() / 255.0 - MEAN[0]) / STD[0]).unsqueeze(1)

    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0)).numpy()
    val_idx = perm[:val_size]
    teach_idx = perm[val_size:val_size + max(train_size, teacher_size)]
    stud_idx = teach_idx[:train_size]  # the students' training set is a subset of the teacher's
    X, Y = prep(xs), torch.from_numpy(ys.astype(np.int64))
    return {"train": (X[stud_idx], Y[stud_idx]), "teacher_train": (X[teach_idx], Y[teach_idx]),
            "val": (X[val_idx], Y[val_idx]), "test": (prep(xt), torch.from_numpy(yt.astype(np.int64)))}


def create(spec, seed):
    import timm

    torch.manual_seed(seed)
    name, kw = spec
    m = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kw)
    m.pretrained_cfg = dict(m.pretrained_cfg, mean=MEAN, std=STD, input_size=(1, 28, 28))
    return m


@torch.no_grad()
def accuracy(model, data, bs=500):
    model.eval()
    x, y = data
    correct = sum(int((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    return 100.0 * correct / len(x)


def train(task, data, epochs, bs, lr, seed):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    x, y = data
    steps = (len(x) + bs - 1) // bs
    opt = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=0, min_lr=lr * 0.01,
                                   step_on_epochs=False, updates_per_epoch=steps)
    g = torch.Generator().manual_seed(seed)
    n = 0
    t0 = time.time()
    for _ in range(epochs):
        task.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            res = task(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            opt.step()
            n += 1
            sched.step_update(n)
    return time.time() - t0


def get_teacher(pair, data, args):
    from timm.task import ClassificationTask

    spec = PAIRS[pair]["teacher"]
    key = hashlib.sha1(json.dumps([pair, spec, args.teacher_epochs, args.teacher_size, args.val_size, args.lr,
                                   args.batch_size]).encode()).hexdigest()[:10]
    path = os.path.join(CACHE, f"teacher_{pair}_{key}.pth")
    model = create(spec, 0)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), path, 0.0
    t = train(ClassificationTask(model, verbose=False), data["teacher_train"], args.teacher_epochs, args.batch_size,
              args.lr, seed=0)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), path, t


def run_pair(pair, args):
    torch.set_num_threads(args.threads)
    from timm.task import ClassificationTask

    from kd_plugins.integrations.timm import KDTask

    data = load_data(args.train_size, args.val_size, args.teacher_size)
    teacher, path, t_time = get_teacher(pair, data, args)
    out = {"pair": pair, "teacher_path": os.path.relpath(path, ROOT), "teacher_train_s": t_time,
           "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "teacher_val": accuracy(teacher, data["val"]), "teacher_test": accuracy(teacher, data["test"]), "runs": []}
    # finished runs are appended to a JSONL cache keyed by the settings, so an interrupted benchmark resumes
    key = hashlib.sha1(json.dumps([pair, PAIRS[pair], KD_KWARGS, args.epochs, args.train_size, args.val_size,
                                   args.batch_size, args.lr, os.path.basename(path)], default=str).encode()).hexdigest()
    runs_file = os.path.join(CACHE, f"runs_{pair}_{key[:10]}.jsonl")
    done = {}
    if os.path.exists(runs_file):
        for line in open(runs_file):
            r = json.loads(line)
            done[(r["seed"], r["method"])] = r
    out["student_params"] = sum(p.numel() for p in create(PAIRS[pair]["student"], 0).parameters())
    for seed in args.seeds:
        for method in args.methods:
            if (seed, method) in done:
                out["runs"].append(done[(seed, method)])
                continue
            student = create(PAIRS[pair]["student"], seed)
            if method == "alone":
                task = ClassificationTask(student, verbose=False)
            else:
                task = KDTask(student_model=student, teacher_model=teacher, input_size=28, verbose=False,
                              **KD_KWARGS[method])
            torch.manual_seed(1000 + seed)  # identical extra-module init order for every method
            secs = train(task, data["train"], args.epochs, args.batch_size, args.lr, seed)
            run = {"seed": seed, "method": method, "val": accuracy(student, data["val"]),
                   "test": accuracy(student, data["test"]), "train_s": round(secs, 1)}
            out["runs"].append(run)
            with open(runs_file, "a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"[{pair}] seed {seed} {method:8s} val {run['val']:.2f} test {run['test']:.2f} ({secs:.0f}s)",
                  flush=True)
    return out


def overhead(args, rounds=6, steps=8):
    """Per-step time of KDTask(kl) vs timm LogitDistillationTask on the cnn2vit pair, alternating blocks."""
    torch.set_num_threads(args.threads)
    import torch.nn as nn
    from timm.task import LogitDistillationTask

    from kd_plugins.integrations.timm import KDTask

    data = load_data(args.train_size, args.val_size, args.teacher_size)
    teacher, _, _ = get_teacher("cnn2vit", data, args)
    x, y = data["train"]
    tasks = {}
    for name in ("timm", "kd_plugins"):
        student = create(PAIRS["cnn2vit"]["student"], 0)
        if name == "timm":
            task = LogitDistillationTask(student_model=student, teacher_model=teacher, criterion=nn.CrossEntropyLoss(),
                                         temperature=4.0, verbose=False)
        else:
            task = KDTask(student_model=student, teacher_model=teacher, loss_terms={"kl": 1.0}, temperature=4.0,
                          criterion=nn.CrossEntropyLoss(), verbose=False)
        tasks[name] = (task, torch.optim.AdamW(task.get_trainable_module().parameters(), lr=1e-3))
    times = {k: [] for k in tasks}
    bs = args.batch_size

    def block(name, r):
        task, opt = tasks[name]
        task.train()
        t0 = time.perf_counter()
        for i in range(steps):
            j = ((r * steps + i) * bs) % (len(x) - bs)
            res = task(x[j:j + bs], y[j:j + bs])
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            opt.step()
        return (time.perf_counter() - t0) / steps

    block("timm", 0), block("kd_plugins", 0)  # warm-up
    for r in range(rounds):
        order = ("timm", "kd_plugins") if r % 2 == 0 else ("kd_plugins", "timm")
        for name in order:
            times[name].append(block(name, r + 1))
    ratios = [a / b for a, b in zip(times["kd_plugins"], times["timm"])]
    return {"timm_ms": 1000 * statistics.median(times["timm"]),
            "kd_plugins_ms": 1000 * statistics.median(times["kd_plugins"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds, "steps_per_block": steps}


def write_markdown(results, ov, args, wall, path):
    names = {"alone": "student alone", "kl": "logit KD (KL, T=4)", "dkd": "DKD (a=1, b=8, T=4)",
             "ofa": "OFA-KD (eps=1.5, branches)", "feature": "feature KD (hidden_mse, last 2 stages)"}
    lines = ["# timm integration: Fashion-MNIST distillation benchmark", "",
             f"Command: `{' '.join(['python'] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}` "
             f"(wall time {wall / 60:.1f} min, torch threads per process: {args.threads}, "
             f"{len(args.pairs)} worker process(es)).", "",
             "Settings: Fashion-MNIST 28x28 grey (Debian `dataset-fashion-mnist`); students train on "
             f"{args.train_size} training images for {args.epochs} epochs (batch {args.batch_size}, AdamW lr "
             f"{args.lr}, wd 0.05, per-step cosine, no augmentation); teachers (seed 0, cached) on {args.teacher_size} "
             f"images for {args.teacher_epochs} epochs; validation = {args.val_size} held-out training images; "
             "test = the full 10k test set, evaluated once after the last epoch (no selection on test). "
             f"Seeds {args.seeds}; mean ± std over seeds. Task loss: cross-entropy weight 1, distillation weight 1.",
             ""]
    for res in results:
        pair = res["pair"]
        t_name, s_name = PAIRS[pair]["teacher"][0], PAIRS[pair]["student"][0]
        lines += [f"## {pair}: {t_name} teacher ({res['teacher_params'] / 1e6:.2f} M) -> {s_name} student "
                  f"({res['student_params'] / 1e6:.2f} M)", "",
                  f"Teacher: val {res['teacher_val']:.2f} %, test {res['teacher_test']:.2f} %.", "",
                  "| method | test acc (%) | val acc (%) | train s/run |", "|---|---|---|---|"]
        for m in args.methods:
            runs = [r for r in res["runs"] if r["method"] == m]
            if not runs:
                continue
            te = [r["test"] for r in runs]
            va = [r["val"] for r in runs]
            sd = statistics.stdev(te) if len(te) > 1 else 0.0
            sdv = statistics.stdev(va) if len(va) > 1 else 0.0
            secs = statistics.mean(r["train_s"] for r in runs)
            lines.append(f"| {names[m]} | {statistics.mean(te):.2f} ± {sd:.2f} | "
                         f"{statistics.mean(va):.2f} ± {sdv:.2f} | {secs:.0f} |")
        lines.append("")
    if ov:
        lines += ["## Training-time overhead: KDTask vs timm LogitDistillationTask", "",
                  f"Same pair (cnn2vit), same batches (batch {args.batch_size}), KL at T=4, {ov['rounds']} alternating "
                  f"blocks of {ov['steps_per_block']} steps each (forward, backward, AdamW step) in one process.", "",
                  "| task | median ms/step |", "|---|---|",
                  f"| timm LogitDistillationTask | {ov['timm_ms']:.1f} |",
                  f"| kd_plugins KDTask | {ov['kd_plugins_ms']:.1f} |", "",
                  f"Ratio KDTask / timm: **{ov['ratio_median']:.3f}** (median over blocks; min "
                  f"{ov['ratio_min']:.3f}, max {ov['ratio_max']:.3f}).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--teacher-size", type=int, default=10000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, 512 images")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS_timm.md"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = [0], 1, 1
        args.train_size, args.teacher_size, args.val_size = 512, 512, 256
        args.out = os.path.join(CACHE, "RESULTS_quick.md")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    if len(args.pairs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(len(args.pairs)) as pool:
            results = pool.starmap(run_pair, [(pair, args) for pair in args.pairs])
    else:
        results = [run_pair(args.pairs[0], args)]
    ov = None if args.no_overhead else overhead(args)
    wall = time.time() - t0
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, "results.json" if not args.quick else "results_quick.json"), "w") as f:
        json.dump({"results": results, "overhead": ov, "wall_s": wall, "args": vars(args)}, f, indent=1)
    write_markdown(results, ov, args, wall, args.out)
    print(open(args.out).read())


if __name__ == "__main__":
    main()
