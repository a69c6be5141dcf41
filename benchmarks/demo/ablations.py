r"""Ablations of the demo recipe on the validation split: what moves title -> body MRR beyond sentence-transformers'?

Each ``--variant NAME|LOSS_TERMS|LOSS_KWARGS_JSON`` trains the demo's student with ``examples/distill_minilm_bbc.py``'s
``distill`` (public API: ``build_teacher_cache`` + ``DistillationCallback`` on an unmodified ``Trainer``) and only
the loss changed, then reports validation MRR / R@1 and the "hard" MRR (the 300 validation titles against the 300
validation bodies plus the 1,360 training bodies). Two extra pair losses, registered here through the public
``register_loss`` (experiments, not library losses):

* ``bank_infonce``: the student's title against the teacher's cached embeddings of *every* training body (1,360
  negatives at no encoding cost). ``mode="bank"``: the positive is the teacher's embedding of the title's own body;
  ``mode="mixed"``: the positive is the student's own body (in-batch), the other teacher bodies are extra negatives.
* ``xbm_infonce``: in-batch InfoNCE plus the student's own detached body embeddings of the last ``size`` rows as
  extra negatives (a cross-batch memory, Wang et al. 2020).

``--teacher mpnet`` (the demo's flag) caches all-mpnet-base-v2 (another tokenizer and width; ``make bench-assets``)
instead of the student's own all-MiniLM-L6-v2, through ``build_teacher_cache(teacher_tokenizer=...,
student_tokenizer=..., teacher_max_length=...)``; the student is still inherited from MiniLM. ``--projector-lr``
sets ``DistillationConfig(projector_lr=...)`` for the learned projector a wider teacher needs.

``--freeze-word-embeddings`` trains the student with its word-embedding matrix frozen (``requires_grad_(False)``:
11.7M of its 19.2M parameters; position embeddings, norms and layers still train).

``--averages`` also reports exponential moving averages of the student's weights (decays 0.98, 0.99, 0.995) and
WiSE-style interpolations between the inherited and the distilled student (0.7, 0.85 of the distilled weights).
Figures: ``benchmarks/demo/RESULTS_demo.md``, section "What moves the 4-layer student?".

    python benchmarks/demo/ablations.py --averages --variant \
        'base|embedding_mse:1.0,infonce:1.0|{"embedding_mse": {"normalize": true}, "infonce": {"temperature": 0.05}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "examples"))
# isort: split
import distill_minilm_bbc as demo  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModel, AutoTokenizer, TrainerCallback  # noqa: E402

from benchmarks.data import encode, minilm_path, retrieval_metrics, split_articles  # noqa: E402
from kd_plugins import PairCollator  # noqa: E402
from kd_plugins.losses.registry import register_loss  # noqa: E402

BANK: dict[str, torch.Tensor] = {}  # the teacher's cached embeddings of the training bodies ("pos") and titles
QUEUE: list[torch.Tensor] = []  # xbm_infonce's memory of the student's recent body embeddings
DECAYS = (0.98, 0.99, 0.995)


@register_loss("bank_infonce", kind="pair")
class BankInfoNCE(nn.Module):
    """The student's anchors against the teacher's cached embeddings of every training positive."""

    def __init__(self, temperature: float = 0.05, mode: str = "bank"):
        super().__init__()
        self.t, self.mode = temperature, mode

    def forward(self, anchor, positive, *, teacher_anchor=None, teacher_positive=None, **_):
        a = F.normalize(anchor.float(), dim=-1)
        bank = F.normalize(BANK["pos"].to(a.device).float(), dim=-1)
        own = (F.normalize(teacher_positive.float(), dim=-1) @ bank.T).argmax(-1)  # the own body's bank row
        vs_bank = a @ bank.T / self.t
        if self.mode == "bank":
            return F.cross_entropy(vs_bank, own)
        p = F.normalize(positive.float(), dim=-1)
        vs_bank = vs_bank.scatter(1, own[:, None], float("-inf"))  # the positive comes from the student side
        logits = torch.cat([a @ p.T / self.t, vs_bank], 1)
        return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


@register_loss("xbm_infonce", kind="pair")
class XBMInfoNCE(nn.Module):
    """In-batch InfoNCE plus the student's detached positives of the last ``size`` rows as extra negatives."""

    def __init__(self, temperature: float = 0.05, size: int = 256):
        super().__init__()
        self.t, self.size = temperature, size

    def forward(self, anchor, positive, *, teacher_anchor=None, teacher_positive=None, **_):
        a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
        logits = a @ p.T / self.t
        if QUEUE:
            logits = torch.cat([logits, a @ torch.cat(QUEUE).T / self.t], 1)
        loss = F.cross_entropy(logits, torch.arange(len(a), device=a.device))
        QUEUE.append(p.detach())
        while sum(len(q) for q in QUEUE) > self.size:
            QUEUE.pop(0)
        return loss


class WeightAverages(TrainerCallback):
    """Exponential moving averages of the trained model's weights, one per decay in ``DECAYS``."""

    def __init__(self):
        self.avg = None

    def on_step_end(self, args, state, control, model=None, **kw):
        sd = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        if self.avg is None:
            self.avg = {d: copy.deepcopy(sd) for d in DECAYS}
            return
        for d, avg in self.avg.items():
            for k, v in sd.items():
                if v.is_floating_point():
                    avg[k].mul_(d).add_(v, alpha=1 - d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, help="NAME|LOSS_TERMS|LOSS_KWARGS_JSON")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", default=str(demo.RECIPE["steps"]))
    p.add_argument("--averages", action="store_true", help="also report weight averages (EMA, WiSE)")
    p.add_argument("--out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--freeze-word-embeddings", action="store_true", help="do not train the word-embedding matrix")
    p.add_argument("--projector-lr", default=None, help="the demo's --projector-lr")
    p.add_argument(
        "--teacher", choices=("minilm", "mpnet"), default=demo.RECIPE["teacher"], help="the demo's --teacher"
    )
    p.add_argument(
        "--teacher-max-length", default=str(demo.RECIPE["teacher_max_length"]), help="the demo's --teacher-max-length"
    )
    p.add_argument(
        "--teacher-quantization",
        choices=("none", "int8"),
        default=demo.RECIPE["teacher_quantization"] or "none",
        help="the demo's --teacher-quantization",
    )
    a = p.parse_args(argv)

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    split = split_articles(seed=0)
    val = split.validation

    build_cache = demo.build_teacher_cache

    def build_and_keep_bank(teacher_model, pairs, **kw):
        cache = build_cache(teacher_model, pairs, **kw)
        collate, pos, anc = PairCollator(tok), [], []
        for i in range(0, len(pairs), 64):
            b = collate([pairs[j] for j in range(i, min(len(pairs), i + 64))])
            ids, mask = b["positive_input_ids"], b["positive_attention_mask"]
            pos.append(cache.lookup({"input_ids": ids, "attention_mask": mask})["pooled_embedding"])
            anc.append(cache.lookup(b)["pooled_embedding"])
        BANK["pos"], BANK["anc"] = torch.cat(pos), torch.cat(anc)
        return cache

    demo.build_teacher_cache = build_and_keep_bank
    if a.freeze_word_embeddings:
        inherit = demo.inherit_student

        def inherit_frozen(teacher_model, **kw):
            student = inherit(teacher_model, **kw)
            student.get_input_embeddings().weight.requires_grad_(False)
            return student

        demo.inherit_student = inherit_frozen
    averages = WeightAverages()
    if a.averages:
        base_trainer = demo.Trainer

        class AveragingTrainer(base_trainer):
            def __init__(self, *args, callbacks=None, **kw):
                super().__init__(*args, callbacks=list(callbacks or []) + [averages], **kw)

        demo.Trainer = AveragingTrainer

    def metrics(model) -> dict:
        q = encode(model, tok, [x.title for x in val], batch_size=32, max_length=256)
        d = encode(model, tok, [x.body for x in val], batch_size=32, max_length=256)
        d_train = encode(model, tok, [x.body for x in split.train], batch_size=32, max_length=256)
        r, hard = retrieval_metrics(q, d), retrieval_metrics(q, torch.cat([d, d_train]))
        return {"mrr": round(r["mrr"], 4), "r1": round(r["recall@1"], 4), "hard_mrr": round(hard["mrr"], 4)}

    for variant in a.variant:
        name, terms, kwargs = variant.split("|")
        for seed in [int(s) for s in a.seeds.split(",")]:
            QUEUE.clear()
            averages.avg = None
            args = demo.parse_args(
                ["--seed", str(seed), "--loss-terms", terms, "--loss-kwargs", kwargs, "--max-minutes", "0"]
                + ["--steps", a.steps, "--teacher", a.teacher, "--teacher-max-length", a.teacher_max_length]
                + ["--teacher-quantization", a.teacher_quantization]
                + (["--projector-lr", a.projector_lr] if a.projector_lr is not None else [])
            )
            init = demo.inherit_student(teacher, strategy=[int(x) for x in args.layers.split(",")])
            model, _, cache_s, train_s, _ = demo.distill(teacher, tok, split.train, args, "/tmp/kd_ablation")
            row = {
                "variant": name + (" (frozen word embeddings)" if a.freeze_word_embeddings else ""),
                "teacher": a.teacher,
                "teacher_quantization": a.teacher_quantization,
                "projector_lr": args.projector_lr,
                "seed": seed,
                "cache_s": round(cache_s, 1),
                "train_s": round(train_s, 1),
            }
            row["final"] = metrics(model)
            if a.averages:
                trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
                for decay, avg in averages.avg.items():
                    model.load_state_dict({k: avg[k].to(trained[k].dtype) for k in trained})
                    row[f"ema{decay}"] = metrics(model)
                start = init.state_dict()
                for alpha in (0.7, 0.85):
                    mix = {
                        k: (alpha * v.float() + (1 - alpha) * start[k].float()).to(v.dtype)
                        if v.is_floating_point()
                        else v
                        for k, v in trained.items()
                    }
                    model.load_state_dict(mix)
                    row[f"wise{alpha}"] = metrics(model)
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
