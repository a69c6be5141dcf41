"""ACM on a timm ViT, Fashion-MNIST: test accuracy against FLOPs (PNG), dense model alongside.

Run: ``OMP_NUM_THREADS=1 python benchmarks/acm/acm_fashion_mnist.py`` (needs Debian ``dataset-fashion-mnist``).
Writes ``benchmarks/acm/results/acm_fashion_mnist.json``, ``benchmarks/acm/RESULTS_acm_fmnist.md`` and
``benchmarks/acm/figures/acm_fashion_mnist.png``. Not part of CI.

Pipeline (every setting fixed before the run; the test split is evaluated once per model at the end):

* Dense model: the ViT teacher of ``benchmarks/timm/timm_fashion_mnist.py`` (pair ``vit2cnn``: ``vit_tiny_patch16_224``
  with 28x28 inputs, patch 4, depth 4, width 96, MLP 384; trained once on 20,000 labelled training images, cached
  under ``.cache/timm_fmnist/``; trained here when the cache is absent).
* ``acmize(model, "mlp", 4, init="slice", order="importance")`` on 512 training images; stage 1 on cached block I/O of
  the training images (every token, class token included), stage 2 with the paper's label rule.
* Per budget beta: the gate price calibrated to beta on the model's block inputs, then stage 3 with
  :class:`~kd_plugins.integrations.timm.ACMTask` (CE + KL from the dense model + 0.1 L_b + 0.05 L_e + 0.05 L_d,
  noiseless argmax gates with straight-through gradients), then the price re-calibrated on the trained model's own
  block inputs.
* FLOPs per image: the ACM MLPs as measured by ``acm_stats`` over the test set (gates included), everything else
  (patch embedding, attention, norms ignored, head) counted analytically; dense = the same count with dense MLPs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, log, set_threads_and_seed, use_benchmark  # noqa: E402

HERE = Path(__file__).resolve().parent
use_benchmark("timm")  # the Fashion-MNIST loader and cached ViT teacher of benchmarks/timm/timm_fashion_mnist.py

from kd_plugins.acm import (  # noqa: E402
    ACMConfig,
    acm_stats,
    acmize,
    calibrate_gate_budget,
    collect_acm_inputs,
    collect_block_io,
    reset_acm_stats,
    set_acm_mode,
    stage1_distill,
    stage2_gates,
)
from kd_plugins.integrations.timm import ACMTask  # noqa: E402
from timm_fashion_mnist import PAIRS, accuracy, get_teacher, load_data, train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budgets", default="0.75,0.5,0.25")
    p.add_argument("--num-learners", type=int, default=4)
    p.add_argument("--io-images", type=int, default=2000, help="training images whose block I/O stage 1/2 cache")
    p.add_argument("--stage1-steps", type=int, default=400)
    p.add_argument("--stage2-steps", type=int, default=200)
    p.add_argument("--stage3-epochs", type=int, default=2, help="epochs over the 20,000 training images per beta")
    p.add_argument("--stage3-images", type=int, default=20000, help="training images stage 3 runs over")
    p.add_argument("--stage3-lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "acm_fashion_mnist.json"))
    p.add_argument("--md", default=str(HERE / "RESULTS_acm_fmnist.md"))
    p.add_argument("--fig", default=str(HERE / "figures" / "acm_fashion_mnist.png"))
    return p.parse_args(argv)


def vit_other_macs(model) -> int:
    """MACs per image outside the MLPs: patch embedding, q/k/v/proj, attention products, head."""
    d = model.embed_dim
    t = model.patch_embed.num_patches + model.num_prefix_tokens
    patch = model.patch_embed.proj
    patch_macs = model.patch_embed.num_patches * d * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1]
    per_block = t * 4 * d * d + 2 * t * t * d
    return patch_macs + len(model.blocks) * per_block + d * model.num_classes


def measure(model, data, tokens_per_image: int, other_macs: int, acm: bool) -> dict:
    if acm:
        reset_acm_stats(model, True)
    acc = accuracy(model, data)
    out = {"acc": acc}
    if acm:
        st = acm_stats(model)
        reset_acm_stats(model, False)
        mlp = st["avg_flops_per_token"] * tokens_per_image
        out.update(
            learner_fraction=st["learner_fraction"],
            mlp_compute_fraction=st["compute_fraction"],
            mlp_mflops_per_image=mlp / 1e6,
            mflops_per_image=(mlp + 2 * other_macs) / 1e6,
            avg_k={n.split(".")[1]: round(v["avg_k"], 3) for n, v in st["blocks"].items()},
        )
    return out


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(args.threads, args.seed)
    t0 = time.time()
    targs = SimpleNamespace(teacher_epochs=8, teacher_size=20000, val_size=2000, lr=2e-3, teacher_batch_size=128)
    data = load_data(1000, targs.val_size, targs.teacher_size)
    dense, path, _ = get_teacher("vit2cnn", data, targs)
    for p in dense.parameters():
        p.requires_grad_(False)
    xtr, ytr = data["teacher_train"]
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    other = vit_other_macs(dense)
    d, hid = dense.embed_dim, dense.blocks[0].mlp.fc1.out_features
    dense_mlp_flops = 2 * 2 * d * hid * tokens * len(dense.blocks)
    res: dict = {"args": vars(args), "teacher": os.path.relpath(path, ROOT), "budgets": {}}
    res["dense"] = {
        "acc": accuracy(dense, data["test"]),
        "mlp_mflops_per_image": dense_mlp_flops / 1e6,
        "mflops_per_image": (dense_mlp_flops + 2 * other) / 1e6,
        "mlp_compute_fraction": 1.0,
    }
    log(
        f"dense ViT ({PAIRS['vit2cnn']['teacher'][1]}): test acc {res['dense']['acc']:.2f}, "
        f"{res['dense']['mflops_per_image']:.2f} MFLOPs/image (MLPs {res['dense']['mlp_mflops_per_image']:.2f})"
    )

    model = copy.deepcopy(dense)
    calib = [xtr[i : i + 128] for i in range(0, 512, 128)]
    acmize(model, "mlp", args.num_learners, init="slice", order="importance", calibration=calib)
    io_batches = [xtr[i : i + 256] for i in range(0, args.io_images, 256)]
    io = collect_block_io(dense, model, io_batches)
    log(f"cached block I/O: {next(iter(io.values()))[0].shape[0]} tokens per block")
    h1 = stage1_distill(model, io, steps=args.stage1_steps, lr=1e-3, batch_tokens=2048, normalize=True, log_every=100)
    s2 = stage2_gates(model, io, steps=args.stage2_steps, lr=0.01, batch_tokens=4096, log_every=100)
    res["stage1"] = {"first": h1[0], "last": sum(h1[-20:]) / 20}
    res["stage2"] = {"label_hist": s2["label_hist"]}
    model.eval()
    set_acm_mode(model, "full")
    res["acm_full_k"] = measure(model, data["test"], tokens, other, acm=True)
    set_acm_mode(model, "gated")
    log(f"after stage 1 (k=N everywhere): test acc {res['acm_full_k']['acc']:.2f}")
    state2 = copy.deepcopy(model.state_dict())
    calib_batches = [xtr[i : i + 256] for i in range(0, 2048, 256)]
    for beta in [float(b) for b in args.budgets.split(",")]:
        model.load_state_dict(state2)
        calibrate_gate_budget(model, {n: z for n, (z, _) in io.items()}, beta)
        pre = measure(model, data["test"], tokens, other, acm=True)
        cfg = ACMConfig(budget=beta, gate_noise=False, distill_weight=1.0)
        task = ACMTask(model, config=cfg, teacher=dense)
        s3 = tuple(t[: args.stage3_images] for t in data["teacher_train"])
        secs = train(task, s3, args.stage3_epochs, args.batch, args.stage3_lr, args.seed, warmup_epochs=0)
        model.eval()
        calibrate_gate_budget(model, collect_acm_inputs(model, calib_batches), beta)
        r = measure(model, data["test"], tokens, other, acm=True)
        r.update(before_stage3=pre, stage3_seconds=round(secs, 1))
        res["budgets"][str(beta)] = r
        log(
            f"beta={beta}: test acc {pre['acc']:.2f} -> {r['acc']:.2f} after stage 3 (learner fraction "
            f"{r['learner_fraction']:.3f}, {r['mflops_per_image']:.2f} MFLOPs/image, stage 3 {secs:.0f}s)"
        )
    res["total_seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    write_report(res, args)


def write_report(res: dict, args) -> None:
    d = res["dense"]
    lines = [
        "# ACM on a timm ViT, Fashion-MNIST: accuracy vs FLOPs",
        "",
        f"Command: `OMP_NUM_THREADS={args.threads} {command_line(__file__, quote=False)}"
        f"` ({res['total_seconds'] / 60:.1f} min on the shared 2-core CPU machine).",
        "",
        "Dense model: the cached ViT teacher of `benchmarks/timm/timm_fashion_mnist.py` (28x28, patch 4, "
        "depth 4, "
        "width 96, MLP 384). Its 4 MLPs ACMized (N = 4 learners of width 96, sliced after importance ordering); "
        f"stage 1 ({args.stage1_steps} steps) and stage 2 ({args.stage2_steps} steps) on the block I/O of "
        f"{args.io_images} training images; per beta, the gate price calibrated to beta, then stage 3 with "
        f"`ACMTask` ({args.stage3_epochs} epochs of {args.stage3_images} training images, batch {args.batch}, "
        "AdamW lr "
        f"{args.stage3_lr}, CE + KL from the dense model + 0.1 L_b + 0.05 L_e + 0.05 L_d, noiseless gates) and "
        "the price re-calibrated on the trained model's own block inputs. Test: the 10,000 Fashion-MNIST test "
        "images, evaluated once per model. FLOPs per image: ACM MLPs measured (gates included), the rest "
        "counted analytically.",
        "",
        "| model | target beta | test acc (%) | before stage 3 | MLP compute | MLP MFLOPs/image | total MFLOPs/image |",
        "|---|---|---|---|---|---|---|",
        f"| dense ViT | - | {d['acc']:.2f} | - | 1.000 | {d['mlp_mflops_per_image']:.2f} | "
        f"{d['mflops_per_image']:.2f} |",
    ]
    fk = res["acm_full_k"]
    lines.append(
        f"| ACM k = N (after stage 1) | - | {fk['acc']:.2f} | - | {fk['mlp_compute_fraction']:.3f} | "
        f"{fk['mlp_mflops_per_image']:.2f} | {fk['mflops_per_image']:.2f} |"
    )
    for beta, r in res["budgets"].items():
        lines.append(
            f"| ACM | {beta} | {r['acc']:.2f} | {r['before_stage3']['acc']:.2f} | "
            f"{r['mlp_compute_fraction']:.3f} | {r['mlp_mflops_per_image']:.2f} | "
            f"{r['mflops_per_image']:.2f} |"
        )
    lines += [
        "",
        "Average k per block (test tokens): " + "; ".join(f"beta {b}: {r['avg_k']}" for b, r in res["budgets"].items()),
        "",
        "![ACM Fashion-MNIST](figures/acm_fashion_mnist.png)",
        "",
    ]
    Path(args.md).write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    rs = sorted(res["budgets"].items(), key=lambda kv: kv[1]["mflops_per_image"])
    ax.plot([r["mflops_per_image"] for _, r in rs], [r["acc"] for _, r in rs], "o-", label="ACM after stage 3")
    ax.plot(
        [r["before_stage3"]["mflops_per_image"] for _, r in rs],
        [r["before_stage3"]["acc"] for _, r in rs],
        "s--",
        alpha=0.6,
        label="ACM before stage 3 (stages 1-2, calibrated)",
    )
    for beta, r in rs:
        ax.annotate(f"β={beta}", (r["mflops_per_image"], r["acc"]), textcoords="offset points", xytext=(4, -10))
    ax.plot([d["mflops_per_image"]], [d["acc"]], "k*", ms=12, label="dense ViT")
    ax.set_xlabel("MFLOPs per image (ACM MLPs measured, rest analytic)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("timm ViT (4 blocks, width 96), ACM MLPs N=4")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(args.fig).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.fig, dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
