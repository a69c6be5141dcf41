"""Multi-exit benchmark on Fashion-MNIST: a timm ViT and a timm ResNet, accuracy per exit and early exit.

Run with ``python benchmarks/multiexit/multiexit_fashion_mnist.py`` (needs ``apt-get install dataset-fashion-mnist``,
which puts the IDX files in /usr/share/datasets/fashion-mnist). Not part of CI. Writes
``benchmarks/multiexit/results/multiexit_fashion_mnist.json``; ``benchmarks/multiexit/multiexit_report.py`` draws the
curves.

Setup (both models trained from scratch; no pretrained timm weights are available offline):

* Data: the first ``--train`` training images (a seeded random subset) and the first ``--test`` test images,
  28x28 grey, normalised with mean 0.286 / std 0.353; random horizontal flips while training.
* ViT: ``vit_tiny_patch16_224`` re-sized: 28 px, patch 4 (49 tokens + CLS), width 64, 6 blocks, 4 heads; exits
  after blocks 2, 4, 6. ResNet: ``resnet18`` with channels (16, 32, 64, 128), 1 input channel; exits after stages
  2, 3, 4. Separate exit heads (ViT: norm + linear; ResNet: average pool + linear).
* Baseline ("standard"): the same architecture trained with the final head only (timm ``ClassificationTask``),
  then a head per shallow exit trained on the frozen backbone for the same number of steps (linear probes).
* Multi-exit: :class:`kd_plugins.integrations.timm.MultiExitTask`: cross-entropy at every exit weighted by
  depth (i/L) + KL self-distillation from the deepest exit; same steps, optimizer and seed as the baseline.
* Early exit: confidence (top softmax probability) thresholds from 0.5 to 1.0; accuracy vs average depth
  (:func:`simulate_early_exit`, the same rule as :func:`early_exit_classify`, checked against it on the test set).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, elapsed_logger, set_threads_and_seed  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kd_plugins.multiexit import (  # noqa: E402
    MultiExitConfig,
    add_exits,
    early_exit_classify,
    exit_outputs,
    simulate_early_exit,
    truncate,
)

DATA = Path("/usr/share/datasets/fashion-mnist")
THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]


def idx(path: Path) -> np.ndarray:
    b = gzip.open(path, "rb").read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


def load(split: str):
    if not DATA.is_dir():
        raise FileNotFoundError(f"{DATA} not found: apt-get install dataset-fashion-mnist")
    pre = "train" if split == "train" else "t10k"
    x = torch.from_numpy(idx(DATA / f"{pre}-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(idx(DATA / f"{pre}-labels-idx1-ubyte.gz").copy()).long()
    return (x - 0.286) / 0.353, y


def build(arch: str):
    import timm

    if arch == "vit":
        kw = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4)
        return timm.create_model("vit_tiny_patch16_224", **kw), kw, [2, 4, 6]
    kw = dict(in_chans=1, num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    return timm.create_model("resnet18", **kw), kw, [2, 3, 4]


def batches(n, bs, gen):
    perm = torch.randperm(n, generator=gen)
    for s in range(0, n - bs + 1, bs):
        yield perm[s : s + bs]


def train(task_or_fn, params, x, y, steps, bs, lr, seed):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    step, it = 0, iter(())
    while step < steps:
        try:
            b = next(it)
        except StopIteration:
            it = batches(len(x), bs, gen)
            continue
        xb = x[b]
        flip = torch.rand(len(b), generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = task_or_fn(xb, y[b])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1


@torch.no_grad()
def all_exit_logits(model, x, bs=500):
    model.eval()
    parts = {}
    for s in range(0, len(x), bs):
        for k, v in exit_outputs(model, x[s : s + bs]).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def run_arch(arch, args, xtr, ytr, xte, yte, log):
    from timm.task import ClassificationTask

    from kd_plugins.integrations.timm import MultiExitTask

    out = {}
    # ---- baseline: final head only, then linear probes on the frozen backbone
    torch.manual_seed(args.seed)
    model, kw, exits = build(arch)
    t = time.time()
    task = ClassificationTask(model, verbose=False)
    train(task, model.parameters(), xtr, ytr, args.steps, args.batch, args.lr, args.seed)
    add_exits(model, exits, head="separate", create_kwargs=kw)
    for p in model.parameters():
        p.requires_grad_(False)
    probe_params = [p for n, p in model.multi_exit.named_parameters()]
    for p in probe_params:
        p.requires_grad_(True)
    probe_task = MultiExitTask(model, config=MultiExitConfig(self_distill_weight=0.0, weights="uniform"))

    def probe_fn(xb, yb):
        model.eval()  # frozen backbone: BN statistics stay as trained
        return probe_task(xb, yb)

    train(probe_fn, probe_params, xtr, ytr, args.probe_steps, args.batch, args.lr, args.seed)
    base_s = time.time() - t
    logits = all_exit_logits(model, xte)
    out["standard"] = {
        "per_exit": {k: float((v.argmax(-1) == yte).float().mean()) for k, v in logits.items()},
        "curve": simulate_early_exit(logits, yte, THRESHOLDS),
        "train_seconds": round(base_s, 1),
    }
    log(f"{arch} standard (+probes): {out['standard']['per_exit']} ({base_s:.0f}s)")

    # ---- multi-exit training from the same init
    torch.manual_seed(args.seed)
    model, kw, exits = build(arch)
    add_exits(model, exits, head="separate", create_kwargs=kw)
    t = time.time()
    task = MultiExitTask(
        model,
        config=MultiExitConfig(weights="depth", self_distill_weight=args.self_weight, temperature=args.temperature),
    )
    train(task, model.parameters(), xtr, ytr, args.steps, args.batch, args.lr, args.seed)
    me_s = time.time() - t
    logits = all_exit_logits(model, xte)
    curve = simulate_early_exit(logits, yte, THRESHOLDS)
    # the library's early-exit inference agrees with the simulation at one threshold
    ee = early_exit_classify(model, xte[:1000], threshold=0.9)
    sim = simulate_early_exit({k: v[:1000] for k, v in logits.items()}, yte[:1000], [0.9])[0]
    ee_acc = float((ee.output.argmax(-1) == yte[:1000]).float().mean())
    # the standalone truncations reproduce the exits
    trunc = {}
    for k in exits:
        small = truncate(model, k).eval()
        with torch.no_grad():
            acc = float((small(xte).argmax(-1) == yte).float().mean())
        trunc[k] = {"accuracy": acc, "params": sum(p.numel() for p in small.parameters())}
    out["multi_exit"] = {
        "per_exit": {k: float((v.argmax(-1) == yte).float().mean()) for k, v in logits.items()},
        "curve": curve,
        "train_seconds": round(me_s, 1),
        "truncations": trunc,
        "early_exit_check": {
            "threshold": 0.9,
            "inference_accuracy": ee_acc,
            "inference_avg_depth": ee.average_depth,
            "simulated_accuracy": sim["accuracy"],
            "simulated_avg_depth": sim["average_depth"],
        },
    }
    out["num_layers"] = model.multi_exit.num_layers
    out["exits"] = exits
    out["create_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    log(f"{arch} multi-exit: {out['multi_exit']['per_exit']} ({me_s:.0f}s); truncations {trunc}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--archs", nargs="+", default=["vit", "resnet"])
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--self-weight", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multiexit_fashion_mnist.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(args.threads)
    t0 = time.time()
    log = elapsed_logger(t0)
    xtr, ytr = load("train")
    sel = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))[: args.train]
    xtr, ytr = xtr[sel], ytr[sel]
    xte, yte = load("test")
    xte, yte = xte[: args.test], yte[: args.test]
    result = {"benchmark": "fashion_mnist", "args": vars(args), "command": command_line(quote=False)}
    for arch in args.archs:
        result[arch] = run_arch(arch, args, xtr, ytr, xte, yte, log)
    result["total_seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
