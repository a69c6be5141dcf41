"""The fused linear + KD path of the distillation core (causal LMs).

For a causal-LM student the logit loss can run through the chunked fused kernel
(:func:`kd_plugins.kernels.fused_linear_kd_loss`): both models run their decoder with ``logits_to_keep=1``, the last
hidden states are captured with a hook, and the kernel computes the task cross-entropy and the divergence chunk by
chunk without ever materialising ``[tokens x vocab]`` logits. ``DistillationConfig.fused_loss=None`` turns it on only
where it computes exactly the objective of the plain path; ``True`` raises instead of falling back. The logged
teacher-student top-1 ``agreement`` is computed chunk by chunk too (one extra no-grad pass over both heads;
``log_agreement=False`` skips it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .._utils import unwrap_model
from ..losses._common import IGNORE_INDEX
from .engine import DistillationEngine, KDResult
from .scaling import LossScaling
from .sharded_teacher import is_sharded
from .terms import check_finite

__all__ = ["FusedLogitLoss", "FusedOutput", "FUSABLE_DIVERGENCES"]

#: Divergences the fused kernel computes.
FUSABLE_DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
#: Tails of a sparse (top-k cache) teacher the fused kernel computes.
FUSABLE_TOPK_TAILS = ("bucket", "renormalize")


@dataclass
class FusedOutput:
    """What one fused step returns: the total loss (task + KD + other terms), the student outputs (logits of the
    last position only), the KD terms for the logs and the task loss as a batch mean (``None`` without labels)."""

    loss: torch.Tensor
    outputs: Any
    result: KDResult
    task_loss: torch.Tensor | None


def _decoder_hidden(model: nn.Module, store: dict, key: str):
    """A hook on ``model.get_decoder()`` that keeps its last hidden state in ``store[key]``."""

    def hook(module, args, out):
        store[key] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    return model.get_decoder().register_forward_hook(hook)


class FusedLogitLoss:
    """Decides whether the engine's logit term can be fused, and computes it fused."""

    def __init__(self, engine: DistillationEngine):
        self.engine = engine
        self.enabled: bool | None = None  # decided on the first training step
        self.reasons: list[str] = []

    def unsupported_reasons(self, student: nn.Module, *, custom_task_loss: bool = False) -> list[str]:
        """Why the fused kernel would not compute exactly this objective (empty: it would)."""
        cfg, engine = self.engine.config, self.engine
        reasons = []
        logit_terms = [n for n, k in cfg.kinds.items() if k == "logits"]
        if engine.task != "causal_lm":
            reasons.append(f"the student task is {engine.task}, not causal_lm")
        if len(logit_terms) != 1 or logit_terms[0] not in FUSABLE_DIVERGENCES:
            reasons.append(
                f"the fused kernel computes one of {FUSABLE_DIVERGENCES}; loss_terms has logit terms {logit_terms}"
            )
        if any(k == "attention" for k in cfg.kinds.values()):
            reasons.append("attention losses need the full forward outputs")
        if engine.retokenize:
            reasons.append("teacher and student tokenizers differ")
        if any(k == "cross_tokenizer" for k in cfg.kinds.values()):
            reasons.append("cross-tokenizer terms (alm, uld) need the student's full logits and a re-tokenized teacher")
        if custom_task_loss:
            reasons.append("the Trainer uses label smoothing or a custom compute_loss_func")
        if engine.cache is not None:
            return reasons + self._cache_reasons(student, logit_terms)
        for role, m in (("student", student), ("teacher", engine.teacher)):
            if "logits_to_keep" not in inspect.signature(m.forward).parameters or not hasattr(m, "get_decoder"):
                reasons.append(f"the {role} does not support logits_to_keep/get_decoder()")
            if is_sharded(m):  # FSDP2: the output head's weight is this rank's shard, not the whole matrix
                reasons.append(f"the {role} is sharded (FSDP2): the fused kernel needs its whole output head")
        sv = getattr(getattr(student, "config", None), "vocab_size", None)
        tv = getattr(getattr(engine.teacher, "config", None), "vocab_size", None)
        if sv != tv:
            reasons.append(f"vocab sizes differ ({sv} vs {tv})")
        if logit_terms and set(cfg.loss_kwargs.get(logit_terms[0], {})) - {"beta", "t2_scale"}:
            reasons.append(
                f"loss_kwargs {sorted(cfg.loss_kwargs[logit_terms[0]])} are not supported by the fused kernel"
            )
        if not reasons:
            from ..kernels import check_fusable_head

            try:
                check_fusable_head(student)
                check_fusable_head(engine.teacher)
            except ValueError as e:
                reasons.append(str(e))
        return reasons

    def _cache_reasons(self, student: nn.Module, logit_terms: list[str]) -> list[str]:
        """A teacher cache: the kernel reads a top-k cache's ``(indices, log_probs)`` rows, or rebuilds a lowrank
        cache's rows chunk by chunk from their codes (``teacher_exact_head``), in place of a teacher head."""
        cfg, reasons = self.engine.config, []
        if self.engine.cache.kind not in ("topk", "lowrank") or not self.engine.cache.metadata.get("per_token"):
            reasons.append("the teacher cache holds no per-token logit rows (top-k or lowrank)")
        if "logits_to_keep" not in inspect.signature(student.forward).parameters or not hasattr(student, "get_decoder"):
            reasons.append("the student does not support logits_to_keep/get_decoder()")
        if is_sharded(student):
            reasons.append("the student is sharded (FSDP2): the fused kernel needs its whole output head")
        kw = cfg.loss_kwargs.get(logit_terms[0], {}) if logit_terms else {}
        if set(kw) - {"beta", "t2_scale", "topk_tail"}:
            reasons.append(f"loss_kwargs {sorted(kw)} are not supported by the fused kernel")
        if kw.get("topk_tail", "bucket") not in FUSABLE_TOPK_TAILS:
            reasons.append(f"the fused kernel computes topk_tail {FUSABLE_TOPK_TAILS}, not {kw['topk_tail']!r}")
        if not reasons:
            from ..kernels import check_fusable_head

            try:
                check_fusable_head(student)
            except ValueError as e:
                reasons.append(str(e))
        return reasons

    def decide(self, model: nn.Module, *, custom_task_loss: bool = False) -> bool:
        """Whether to fuse (decided once). ``fused_loss=True`` raises when the kernel cannot compute the objective
        exactly; ``None`` falls back to the plain path, ``False`` never fuses."""
        if self.enabled is not None:
            return self.enabled
        cfg = self.engine.config
        if cfg.fused_loss is False:
            self.enabled = False
            return False
        self.reasons = self.unsupported_reasons(unwrap_model(model), custom_task_loss=custom_task_loss)
        if self.reasons and cfg.fused_loss:
            raise ValueError(
                "fused_loss=True but the fused linear+KD loss cannot compute this objective exactly: "
                + "; ".join(self.reasons)
                + ". Set fused_loss=None (automatic) or False."
            )
        self.enabled = not self.reasons
        return self.enabled

    def __call__(self, model: nn.Module, inputs: dict, scaling: LossScaling) -> FusedOutput:
        """Task loss + fused logit KD (+ hidden-state terms) for one batch. ``model`` may be a DDP wrapper."""
        from ..kernels import fused_linear_kd_loss

        engine, cfg = self.engine, self.engine.config
        labels = inputs.get("labels")
        if cfg.hard_label_weight > 0 and labels is None:
            raise ValueError(
                "hard_label_weight > 0 but the batch has no 'labels'; add labels or set hard_label_weight=0."
            )
        student, hidden = unwrap_model(model), {}
        handle = _decoder_hidden(student, hidden, "student")
        try:
            fwd = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "return_loss")}
            outputs = model(**fwd, logits_to_keep=1)  # through the DDP wrapper; the head runs on one position only
        finally:
            handle.remove()
        h_s = hidden["student"][:, :-1]
        am = inputs.get("attention_mask")
        mask = am[:, 1:].reshape(-1).bool() if am is not None else None
        lowrank = None  # a lowrank cache's codes: the kernel rebuilds the teacher's rows chunk by chunk
        if engine.cache is not None:
            if engine.cache.kind == "lowrank":
                t_out, topk = None, None
                lowrank = engine.cache.lowrank_rows(inputs, h_s.device)
            else:
                t_out = engine.teacher_forward(inputs)
                topk = tuple(x[:, :-1].reshape(-1, x.shape[-1]).to(h_s.device) for x in t_out["teacher_topk"])
            if mask is not None:
                mask = _cache_rows(mask, am, labels)
        else:
            handle = _decoder_hidden(engine.teacher, hidden, "teacher")
            try:
                t_out = engine.teacher_forward(inputs, extra={"logits_to_keep": 1})
            finally:
                handle.remove()
            h_t, topk = hidden["teacher"][:, :-1].to(h_s.device), None
        rows_labels = labels[:, 1:].reshape(-1) if labels is not None else None
        by_items = scaling.uses_items and labels is not None
        name = next(n for n, k in cfg.kinds.items() if k == "logits")
        kw = cfg.loss_kwargs.get(name, {})
        s_head = student.get_output_embeddings()
        hs = h_s.reshape(-1, h_s.shape[-1]).to(s_head.weight.dtype)
        teacher_side = {"teacher_topk": topk, "topk_tail": kw.get("topk_tail", "bucket")}
        if lowrank is not None:
            code = lowrank["code"][:, :-1]
            teacher_side = {
                "teacher_hidden": code.reshape(-1, code.shape[-1]),
                "teacher_head_weight": lowrank["weight"],
                "teacher_head_bias": lowrank["bias"],
                "teacher_exact_head": tuple(x[:, :-1].reshape(-1, x.shape[-1]) for x in lowrank["head"]),
            }
        elif topk is None:
            t_head = engine.teacher.get_output_embeddings()
            teacher_side = {
                "teacher_hidden": h_t.reshape(-1, h_t.shape[-1]).to(t_head.weight.dtype),
                "teacher_head_weight": t_head.weight.detach(),
                "teacher_head_bias": None if t_head.bias is None else t_head.bias.detach(),
            }
        loss, parts = fused_linear_kd_loss(
            hs,
            s_head.weight,
            student_head_bias=s_head.bias,
            labels=rows_labels,
            mask=mask,
            divergence=name,
            beta=float(kw.get("beta", 0.5)),
            temperature=cfg.temperature,
            hard_label_weight=cfg.hard_label_weight,
            kd_weight=cfg.loss_terms[name],
            t2_scale=kw.get("t2_scale"),
            chunk_size=cfg.fused_chunk_size,
            num_items_in_batch=scaling.num_items_in_batch if by_items else None,
            return_parts=True,
            agreement=cfg.log_agreement,
            **teacher_side,
        )
        loss = loss * (scaling.items_scale if by_items else 1.0)
        check_finite(name, loss, engine.step, path="fused")
        # The kernel normalised by the accumulated batch's items; the logs show this micro-batch's means.
        valid = _valid(hs.shape[0], rows_labels, mask, hs.device)
        count = max(int(valid.sum()), 1)
        to_mean = float(scaling.num_items_in_batch) / count if by_items else 1.0
        result = KDResult(loss=loss)
        if cfg.log_agreement and bool(valid.any()):
            if "agreement" in parts:  # counted by the kernel's chunks (torch backend): no extra vocabulary pass
                agreement = float(parts["agreement"])
            elif topk is None:
                h_t_rows = h_t.reshape(-1, h_t.shape[-1])
                agreement = top1_agreement(hs, s_head, h_t_rows, t_head, valid, cfg.fused_chunk_size)
            else:  # the cache's rows come sorted: its top-1 is the first index
                agreement = topk_agreement(hs, s_head, topk[0][:, 0], valid, cfg.fused_chunk_size)
            result.metrics["agreement"] = agreement
        if "kd" in parts:
            result.terms[name] = parts["kd"] * to_mean
        if any(k == "hidden" for k in cfg.kinds.values()):
            plain = LossScaling(
                by_items=by_items,
                num_items_in_batch=scaling.num_items_in_batch,
                grad_accum_steps=scaling.grad_accum_steps,
            )
            extra = engine.compute(
                {k: v for k, v in inputs.items() if k != "labels"},
                outputs,
                scaling=plain,
                teacher_outputs=t_out,
                kinds={"hidden"},
            )
            loss = loss + extra.loss
            result.terms.update(extra.terms)
        task = parts.get("ce")
        return FusedOutput(
            loss=loss, outputs=outputs, result=result, task_loss=task * to_mean if task is not None else None
        )


@torch.no_grad()
def top1_agreement(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    valid: torch.Tensor,
    chunk_size: int,
) -> float:
    """Share of the ``valid`` rows where the student's and the teacher's top-1 tokens agree.

    The logits ``hidden @ head.weight.T (+ bias)`` are formed ``chunk_size`` rows at a time, so at most
    ``[chunk_size x vocab]`` logits per model exist at once: the plain path's ``agreement`` without the
    ``[tokens x vocab]`` tensors the fused kernel avoids. ``*_hidden`` are ``[rows, hidden]``, ``valid`` is ``[rows]``.
    """
    t_weight, t_bias = teacher_head.weight, teacher_head.bias

    def teacher_top1(rows: torch.Tensor) -> torch.Tensor:
        h_t = teacher_hidden[rows.to(teacher_hidden.device)].to(t_weight.device, t_weight.dtype)
        return nn.functional.linear(h_t, t_weight, t_bias).argmax(-1)

    return _agreement(student_hidden, student_head, teacher_top1, valid, chunk_size)


def topk_agreement(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_top1: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int,
) -> float:
    """:func:`top1_agreement` against given teacher top-1 tokens ``[rows]`` (a top-k cache's first index)."""
    return _agreement(student_hidden, student_head, lambda rows: teacher_top1[rows], valid, chunk_size)


@torch.no_grad()
def _agreement(student_hidden, student_head, teacher_top1, valid, chunk_size) -> float:
    index = valid.nonzero().squeeze(-1)
    agree = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    for start in range(0, index.numel(), chunk_size):
        rows = index[start : start + chunk_size]
        s_top = nn.functional.linear(student_hidden[rows], student_head.weight, student_head.bias).argmax(-1)
        agree += (s_top == teacher_top1(rows).to(s_top.device)).sum()
    return float(agree) / max(index.numel(), 1)


def _cache_rows(mask: torch.Tensor, attention_mask: torch.Tensor, labels) -> torch.Tensor:
    """Rows a cache can score: it holds no teacher row at a padded position, so a row whose context token is padding
    (left padding) has none. The kernel's mask also removes rows from the task cross-entropy, which the plain path
    keeps, so such a labelled row is refused instead of silently dropped from the task loss."""
    context = attention_mask[:, :-1].reshape(-1).bool()
    if labels is not None:
        lost = mask & ~context & (labels[:, 1:].reshape(-1).to(mask.device) != IGNORE_INDEX)
        if bool(lost.any()):
            raise ValueError(
                "a left-padded batch on the fused path with a TeacherCache: the cache has no teacher row after a "
                "padded position, and the fused kernel would drop those labelled tokens from the task loss. Pad on "
                "the right (tokenizer.padding_side='right') or set DistillationConfig(fused_loss=False)."
            )
    return mask & context


def _valid(n: int, labels, mask, device) -> torch.Tensor:
    valid = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        valid &= labels.to(device) != IGNORE_INDEX
    if mask is not None:
        valid &= mask.to(device)
    return valid
