"""Quantized teacher check: SmolLM2-135M as an fp32, int8 (and, where bitsandbytes imports, nf4) teacher.

Setup (fixed before any run):

* Teacher: SmolLM2-135M-Instruct (``benchmarks.data.lm.load_smollm2``, fp32, tied embeddings), quantized by
  ``DistillationConfig(teacher_quantization=...)`` when the engine places it (``kd_plugins/distill/teacher_quant.py``:
  int8 = ``kd_plugins.quant`` per-token W8A8; nf4 = bitsandbytes ``Linear4bit``; the embeddings / tied head stay
  float in both).
* Student: ``kd_plugins.inherit_student(teacher, num_layers=6)``, untrained (the loss a distillation run starts from).
* Text: ``--windows`` windows of ``--seq-len`` tokens of *Pride and Prejudice* (``lm_windows``).
* Reported per teacher: bytes of parameters and buffers (each storage once), the KD loss ``KL(teacher || student)``
  at T = 1 per token (``DistillationEngine.compute``) and its difference to the fp32 teacher's, the teacher's own
  divergence from the fp32 teacher ``KL(fp32 || quantized)`` per token, the teacher's perplexity on the windows, and
  the teacher forward time (one pass over all windows, ``--threads`` threads).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _harness
from _harness import BENCHMARKS, command_line, log, omp_prefix, replace_section, set_threads_and_seed  # noqa: E402

# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kd_plugins  # noqa: E402
from benchmarks.data.lm import jane_austen_texts, lm_windows, load_smollm2, perplexity  # noqa: E402
from kd_plugins.distill import DistillationConfig, DistillationEngine  # noqa: E402
from kd_plugins.distill.teacher_quant import teacher_memory_bytes  # noqa: E402

HERE = BENCHMARKS / "cache"
MARKER = "## Quantized teacher: SmolLM2-135M"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "teacher_quant_smollm2.json"))
    return p.parse_args(argv)


def teacher_logits(teacher, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    return logits, time.perf_counter() - t0


def measure(base, student, ids, quantization, ref_logits) -> tuple[dict, torch.Tensor]:
    engine = DistillationEngine(
        copy.deepcopy(base), DistillationConfig(loss_terms="kl", temperature=1.0, teacher_quantization=quantization)
    )
    engine.setup(student)  # quantizes the teacher copy (int8 / nf4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        s_out = student(input_ids=ids, attention_mask=batch["attention_mask"])
        kd = float(engine.compute(batch, s_out).loss)
    logits, seconds = teacher_logits(engine.teacher, ids)
    row = {"teacher": quantization or "fp32", "bytes": teacher_memory_bytes(engine.teacher), "kd_loss": kd}
    row["teacher_seconds"] = seconds
    row["ppl"] = perplexity(engine.teacher, ids)
    if ref_logits is not None:  # KL(fp32 teacher || this teacher) per token
        ref_lp, lp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
        row["kl_from_fp32"] = float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
    return row, logits


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads_and_seed(args.threads, 0)
    base, tok = load_smollm2()
    student = kd_plugins.inherit_student(base, num_layers=args.num_layers, strategy="uniform").eval()
    ids = lm_windows(tok, jane_austen_texts()["prideprejudice"], args.seq_len, args.windows)
    arms = [None, "int8"] + (["nf4"] if importlib.util.find_spec("bitsandbytes") else [])
    rows, ref = [], None
    for q in arms:
        row, logits = measure(base, student, ids, q, ref)
        ref = logits if q is None else ref
        rows.append(row)
        log(json.dumps(row))
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    fp32 = rows[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    lines = [
        "| teacher | bytes (MB) | vs fp32 | KD loss KL(t‖s) | vs fp32 | KL(fp32 t‖t) per token | teacher ppl | "
        "teacher forward (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / fp32['bytes']:.2f}x | {r['kd_loss']:.4f} | "
            f"{r['kd_loss'] - fp32['kd_loss']:+.4f} ({(r['kd_loss'] - fp32['kd_loss']) / fp32['kd_loss']:+.2%}) | "
            f"{r.get('kl_from_fp32', 0.0):.4f} | {r['ppl']:.2f} | {r['teacher_seconds']:.1f} |"
        )
    ran = ", ".join(r["teacher"] for r in rows)
    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes

        ran += f" (bitsandbytes {bitsandbytes.__version__}, CPU backend)"
    note = (
        f"Teachers measured: {ran}. int8 is kd_plugins' own per-token W8A8 path (`torch._int_mm` on this CPU); nf4 "
        "(bitsandbytes) appears only where bitsandbytes imports. Untrained 6-layer inherited student, "
        f"{args.windows} windows x {args.seq_len} tokens of *Pride and Prejudice*, {args.threads} thread(s)."
    )
    cmd = f"{omp_prefix()}{command_line()}"
    section = f"{MARKER} teacher, fp32 vs quantized\n\n`{cmd}`\n\n{note}\n\n" + "\n".join(lines) + "\n"
    replace_section(HERE / "RESULTS_cache.md", MARKER, section, title="# Offline teacher cache\n\n")


if __name__ == "__main__":
    main()
