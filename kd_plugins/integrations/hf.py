"""Hugging Face Trainer integration: ``DistillationCallback`` (any unmodified Trainer) and ``DistillationTrainer``.

Three lines turn a working Trainer script into a distillation run::

    from kd_plugins import DistillationCallback, DistillationConfig
    trainer = Trainer(model=student, args=args, train_dataset=ds,
                      callbacks=[DistillationCallback(teacher, DistillationConfig(loss_terms="kl", temperature=2.0))])

How the callback gets in: Trainer callbacks are not handed the trainer, so on its first event the callback finds
the ``Trainer`` that is calling it (a walk up the call stack) and wraps that instance's ``compute_loss`` and
``log``. The wrapped ``compute_loss`` runs the Trainer's own loss (labels, label smoothing, ``compute_loss_func``,
SFTTrainer's extras all unchanged), then the frozen teacher, then adds the distillation terms normalised exactly
like the task loss (by ``num_items_in_batch`` over the whole accumulated batch when the Trainer does so, else per
micro-batch). The teacher never enters the optimizer, DDP, or checkpoints. Projectors (feature KD with different
widths) live outside the student with their own optimizer, stepped after the Trainer's and saved as
``kd_plugins_state.safetensors`` beside each checkpoint.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..distill.config import DistillationConfig
from ..distill.engine import DistillationEngine, unwrap_model

__all__ = ["DistillationCallback", "DistillationTrainer", "load_teacher"]

_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "encoder": "AutoModel",
}


def load_teacher(name_or_path: str, task: str, dtype: str | None = None, **kwargs) -> torch.nn.Module:
    """Load a teacher with the Auto class matching the student's task."""
    import transformers

    cls = getattr(transformers, _AUTO_CLASSES[task])
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    return cls.from_pretrained(name_or_path, **kwargs)


def _is_trl_sft_trainer(trainer) -> bool:
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl") for c in type(trainer).__mro__)


def _find_calling(predicate, max_depth: int = 64):
    frame = inspect.currentframe()
    depth = 0
    try:
        while frame is not None and depth < max_depth:
            found = predicate(frame)
            if found is not None:
                return found
            frame, depth = frame.f_back, depth + 1
    finally:
        del frame
    return None


def _find_trainer() -> Trainer | None:
    return _find_calling(lambda f: f.f_locals.get("self") if isinstance(f.f_locals.get("self"), Trainer) else None)


def _find_resume_dir() -> str | None:
    def pred(f):
        v = f.f_locals.get("resume_from_checkpoint")
        return v if isinstance(v, str) and os.path.isdir(v) else None

    return _find_calling(pred)


def patch_trainer(trainer: Trainer, loss_fn=None, logs_fn=None, original_loss=None) -> None:
    """Wrap one Trainer instance's ``compute_loss`` and ``log`` (shared by kd_plugins' callbacks).

    ``loss_fn(original, model, inputs, return_outputs=..., num_items_in_batch=..., **kw)`` receives the Trainer's own
    ``compute_loss`` (or ``original_loss``); ``logs_fn(logs)`` may add entries before the Trainer records them.
    """
    if loss_fn is not None:
        original = original_loss or trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            return loss_fn(original, model, inputs, return_outputs=return_outputs,
                           num_items_in_batch=num_items_in_batch, **kw)

        trainer.compute_loss = compute_loss
    if logs_fn is not None:
        original_log = trainer.log

        def log(logs: dict[str, float], *args, **kwargs):
            logs_fn(logs)
            return original_log(logs, *args, **kwargs)

        trainer.log = log


class TrainerPluginCallback(TrainerCallback):
    """Base of the callbacks that patch a Trainer's loss (distillation, multi-exit, ACM).

    Finds and attaches to the Trainer that owns the callback (subclasses implement ``attach(trainer)``), and averages
    per-step loss components between log events (train and eval apart), adding them to the Trainer's logs
    (``eval_`` prefixed during evaluation).
    """

    trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> None:
        """Hook into ``trainer`` (done automatically on the first Trainer event). One callback, one Trainer."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise RuntimeError(f"This {type(self).__name__} is already attached to another Trainer; create one per "
                               "Trainer.")
        self._attach(trainer)

    def _attach(self, trainer: Trainer) -> None:  # pragma: no cover - every subclass overrides it
        """Validate ``trainer``'s model, set ``self.trainer`` and patch the Trainer."""
        raise NotImplementedError

    def _ensure_attached(self) -> Trainer:
        if self.trainer is None:
            trainer = _find_trainer()
            if trainer is None:
                raise RuntimeError(f"{type(self).__name__} must be used inside a transformers.Trainer "
                                   "(callbacks=[...] or trainer.add_callback(...)).")
            self.attach(trainer)
        return self.trainer

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _find_trainer()
        if trainer is not None:
            self.attach(trainer)

    def _reset_loss_logs(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._counts: dict[str, int] = {"train": 0, "eval": 0}

    def _add_logs(self, logs: dict[str, Any]) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else ("train" if "loss" in logs else None)
        if mode is None or not self._counts[mode]:
            return
        n = self._counts[mode]
        prefix = "eval_" if mode == "eval" else ""
        for k, v in self._sums[mode].items():
            logs[prefix + k] = round(v / n, 6)
        self._sums[mode] = defaultdict(float)
        self._counts[mode] = 0


def freeze_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients: a teacher never trains and never enters the optimizer."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillationCallback(TrainerPluginCallback):
    """Adds knowledge distillation to an unmodified ``transformers.Trainer`` (or TRL ``SFTTrainer``).

    Args:
        teacher: the teacher model (frozen by the callback).
        config: a :class:`~kd_plugins.DistillationConfig` (default: forward KL at T=1).
        teacher_tokenizer: optional; compared with the Trainer's ``processing_class`` to catch tokenizer mismatches.

    Logged with the Trainer's own logs: ``kd_loss`` (weighted sum of terms), ``task_loss``, one ``kd_<term>`` per
    term, ``agreement`` (teacher/student top-1 agreement) or ``teacher_cosine`` (embeddings); ``eval_``-prefixed
    during evaluation.
    """

    def __init__(self, teacher: torch.nn.Module, config: DistillationConfig | None = None, *,
                 teacher_tokenizer=None):
        self.config = config or DistillationConfig()
        self.engine = DistillationEngine(teacher, self.config, teacher_tokenizer=teacher_tokenizer)
        self.trainer: Trainer | None = None
        self._fused: bool | None = None  # decided on the first training step (see _fused_decision)
        self._reset_loss_logs()

    @property
    def teacher(self) -> torch.nn.Module:
        return self.engine.teacher

    # ---------------------------------------------------------------- wiring
    def _attach(self, trainer: Trainer) -> None:
        self.trainer = trainer
        # DistillationTrainer calls self.compute_loss from its own compute_loss; only its log is wrapped.
        wrap_loss = not isinstance(trainer, DistillationTrainer)
        patch_trainer(trainer, loss_fn=self.compute_loss if wrap_loss else None, logs_fn=self._add_logs,
                      original_loss=self._sft_task_loss(trainer) if wrap_loss and _is_trl_sft_trainer(trainer)
                      else None)
        pc = getattr(trainer, "processing_class", None)
        if self.engine.student_tokenizer is None and pc is not None:
            self.engine.student_tokenizer = getattr(pc, "tokenizer", pc)

    @staticmethod
    def _sft_task_loss(trainer):
        """TRL's SFTTrainer computes its NLL with a fused LM head and, asked for outputs, re-runs the model under
        no_grad: distilling those logits would silently train nothing. Use the base Trainer loss (the model's own
        shifted cross-entropy, the same NLL objective) whose logits carry gradients."""
        loss_type = getattr(trainer.args, "loss_type", "nll")
        if loss_type not in (None, "nll"):
            raise ValueError(f"DistillationCallback supports SFTTrainer with loss_type='nll' only (got {loss_type!r}); "
                             "the distillation terms need the student's logits with gradients.")

        def task_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(trainer, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        return task_loss

    def _ensure_setup(self) -> None:
        if self.engine.student is None or (self.config.feature_pairs and self.engine._student_rec is None):
            self.engine.setup(self.trainer.model)

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_attached()
        self.engine.setup(self.trainer.model)
        if state.global_step > 0:  # resuming: restore projector state saved beside the checkpoint
            ckpt = _find_resume_dir() or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            found = self.engine.load(ckpt)
            if not found and self.config.feature_pairs and self.config.feature_projector:
                import warnings

                warnings.warn(f"Resuming from {ckpt} without {self.engine.__class__.__name__} state "
                              "(kd_plugins_state.safetensors): projectors, if any, restart from scratch.")

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        scale = None
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer is not None and trainer.optimizer else None
        self.engine.projector_step(lr=lr, grad_scale=scale)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            self.engine.save(ckpt)

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.remove_hooks()

    # ------------------------------------------------------------- the loss
    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        """Task loss from ``original`` (the Trainer's compute_loss) plus the distillation terms."""
        trainer = self._ensure_attached()
        self._ensure_setup()
        engine, cfg = self.engine, self.config
        engine.step = trainer.state.global_step
        kd_inputs = dict(inputs)
        need_attn = any(k == "attention" for k in cfg.kinds.values())
        has_labels = inputs.get("labels") is not None
        if cfg.hard_label_weight > 0 and not has_labels:
            raise ValueError("hard_label_weight > 0 but the batch has no 'labels'; add labels to the dataset/collator "
                             "(e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)) or set "
                             "hard_label_weight=0 to train on the distillation loss alone.")
        if model.training and torch.is_grad_enabled() and self._fused_decision(trainer, model):
            return self._fused_compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)
        if engine.task == "encoder" or not has_labels:
            fwd = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "return_loss")}
            if need_attn:
                fwd["output_attentions"] = True
            outputs = model(**fwd)
            task_loss = None
        else:
            call_inputs = dict(inputs)
            if need_attn:
                call_inputs["output_attentions"] = True
            task_loss, outputs = original(model, call_inputs, return_outputs=True,
                                          num_items_in_batch=num_items_in_batch, **kw)
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if model.training and torch.is_grad_enabled() and torch.is_tensor(logits) and not logits.requires_grad:
            raise RuntimeError(
                f"{type(trainer).__name__}.compute_loss returned student logits without gradients, so distillation "
                "would train nothing. Use kd_plugins.DistillationTrainer, or a Trainer whose compute_loss returns "
                "the outputs of its training forward pass."
            )
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(trainer, "compute_loss_func", None) is not None
        scaled = bool(scaled) and task_loss is not None
        items_scale = 1.0
        args = trainer.args
        if scaled and getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            items_scale = float(trainer.accelerator.num_processes)
        ga = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
        mean_scale = 1.0 / ga if scaled else 1.0
        result = engine.compute(kd_inputs, outputs, num_items_in_batch=num_items_in_batch,
                                normalize_by_items=scaled, items_scale=items_scale, mean_scale=mean_scale)
        if task_loss is not None and not torch.isfinite(task_loss.detach()).all():
            raise FloatingPointError(f"Non-finite task loss at step {engine.step}: term 'task_loss' = "
                                     f"{float(task_loss.detach())}. Check the labels and the learning rate.")
        loss = result.loss
        if task_loss is not None and cfg.hard_label_weight > 0:
            loss = loss + cfg.hard_label_weight * task_loss
        self._record("train" if model.training else "eval", result, task_loss,
                     ga if scaled else 1, items_scale)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------- fused LM loss
    _FUSABLE = ("kl", "reverse_kl", "jsd", "tvd")

    def _fused_decision(self, trainer, model) -> bool:
        """Whether the causal-LM logit loss runs through the chunked fused linear+KD kernel.

        ``fused_loss=None`` ("where safe"): on for causal LMs whose logit objective the kernel computes exactly
        (one of kl / reverse_kl / jsd / tvd, equal vocabularies, plain ``nn.Linear`` heads on both models, no label
        smoothing or custom ``compute_loss_func``, a model accepting ``logits_to_keep``), off otherwise (the plain
        path computes the same objective with full logits). ``fused_loss=True`` raises instead of falling back.
        """
        if self._fused is not None:
            return self._fused
        cfg, engine = self.config, self.engine
        if cfg.fused_loss is False:
            self._fused = False
            return False
        reasons = []
        logit_terms = [n for n, k in cfg.kinds.items() if k == "logits"]
        student = unwrap_model(model)
        if engine.task != "causal_lm":
            reasons.append(f"the student task is {engine.task}, not causal_lm")
        if len(logit_terms) != 1 or logit_terms[0] not in self._FUSABLE:
            reasons.append(f"the fused kernel computes one of {self._FUSABLE}; loss_terms has logit terms "
                           f"{logit_terms}")
        if any(k == "attention" for k in cfg.kinds.values()):
            reasons.append("attention losses need the full forward outputs")
        if engine.retokenize:
            reasons.append("teacher and student tokenizers differ")
        if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "compute_loss_func", None):
            reasons.append("the Trainer uses label smoothing or a custom compute_loss_func")
        for role, m in (("student", student), ("teacher", engine.teacher)):
            if "logits_to_keep" not in inspect.signature(m.forward).parameters or not hasattr(m, "get_decoder"):
                reasons.append(f"the {role} does not support logits_to_keep/get_decoder()")
        sv = getattr(getattr(student, "config", None), "vocab_size", None)
        tv = getattr(getattr(engine.teacher, "config", None), "vocab_size", None)
        if sv != tv:
            reasons.append(f"vocab sizes differ ({sv} vs {tv})")
        if logit_terms:
            kw = cfg.loss_kwargs.get(logit_terms[0], {})
            if set(kw) - {"beta", "t2_scale"}:
                reasons.append(f"loss_kwargs {sorted(kw)} are not supported by the fused kernel")
        if not reasons:
            from ..kernels import check_fusable_head

            try:
                check_fusable_head(student)
                check_fusable_head(engine.teacher)
            except ValueError as e:
                reasons.append(str(e))
        if reasons and cfg.fused_loss:
            raise ValueError("fused_loss=True but the fused linear+KD loss cannot compute this objective exactly: "
                             + "; ".join(reasons) + ". Set fused_loss=None (automatic) or False.")
        self._fused = not reasons
        self.fused_reasons = reasons
        return self._fused

    def _fused_compute_loss(self, trainer, model, inputs, return_outputs, num_items_in_batch):
        from ..kernels import fused_linear_kd_loss

        cfg, engine = self.config, self.engine
        labels = inputs.get("labels")
        if cfg.hard_label_weight > 0 and labels is None:
            raise ValueError("hard_label_weight > 0 but the batch has no 'labels'; add labels or set "
                             "hard_label_weight=0.")
        student = unwrap_model(model)
        captured = {}
        hook = student.get_decoder().register_forward_hook(
            lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            fwd = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "return_loss")}
            outputs = model(**fwd, logits_to_keep=1)  # through the DDP wrapper; the head runs on one position only
        finally:
            hook.remove()
        t_captured = {}
        t_hook = engine.teacher.get_decoder().register_forward_hook(
            lambda m, a, out: t_captured.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            t_out = engine.teacher_forward(inputs, extra={"logits_to_keep": 1})
        finally:
            t_hook.remove()
        h_s, h_t = captured["h"][:, :-1], t_captured["h"][:, :-1].to(captured["h"].device)
        am = inputs.get("attention_mask")
        mask = am[:, 1:].reshape(-1).bool() if am is not None else None
        rows_labels = labels[:, 1:].reshape(-1) if labels is not None else None
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
                  and labels is not None)
        items_scale = float(trainer.accelerator.num_processes) if (
            scaled and getattr(trainer.args, "average_tokens_across_devices", False)) else 1.0
        name = next(n for n, k in cfg.kinds.items() if k == "logits")
        kw = cfg.loss_kwargs.get(name, {})
        s_head, t_head = student.get_output_embeddings(), engine.teacher.get_output_embeddings()
        w_s = s_head.weight
        hs = h_s.reshape(-1, h_s.shape[-1]).to(w_s.dtype)
        loss, parts = fused_linear_kd_loss(
            hs, w_s, h_t.reshape(-1, h_t.shape[-1]).to(t_head.weight.dtype), t_head.weight.detach(),
            student_head_bias=s_head.bias, teacher_head_bias=None if t_head.bias is None else t_head.bias.detach(),
            labels=rows_labels, mask=mask, divergence=name, beta=float(kw.get("beta", 0.5)),
            temperature=cfg.temperature, hard_label_weight=cfg.hard_label_weight, kd_weight=cfg.loss_terms[name],
            t2_scale=kw.get("t2_scale"), chunk_size=cfg.fused_chunk_size,
            num_items_in_batch=num_items_in_batch if scaled else None, return_parts=True)
        loss = loss * items_scale
        count = 1
        valid = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device)
        if rows_labels is not None:
            valid &= rows_labels.to(valid.device) != -100
        if mask is not None:
            valid &= mask.to(valid.device)
        count = max(int(valid.sum()), 1)
        to_mean = float(num_items_in_batch) / count if scaled else 1.0
        from ..distill.engine import KDResult

        result = KDResult(loss=loss)
        if "kd" in parts:
            result.terms[name] = parts["kd"] * to_mean
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"Non-finite distillation loss at step {engine.step}: term {name!r} (fused) = "
                                     f"{float(loss.detach())}.")
        hidden_terms = [n for n, k in cfg.kinds.items() if k == "hidden"]
        if hidden_terms:
            ga = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
            extra = engine.compute({k: v for k, v in inputs.items() if k != "labels"}, outputs,
                                   mean_scale=1.0 / ga if scaled else 1.0, teacher_outputs=t_out,
                                   kinds={"hidden"})
            loss = loss + extra.loss
            result.terms.update(extra.terms)
        task = parts.get("ce")
        task_loss = task * to_mean if task is not None else None
        self._record("train", result, task_loss, 1, 1.0)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------- logging
    def _record(self, mode: str, result, task_loss, ga: int, items_scale: float) -> None:
        sums = self._sums[mode]
        kd = 0.0
        for name, v in result.terms.items():
            val = float(v)
            sums[f"kd_{name}"] += val
            kd += self.config.loss_terms[name] * val
        sums["kd_loss"] += kd
        if task_loss is not None:
            sums["task_loss"] += float(task_loss.detach()) * ga / items_scale
        for k, v in result.metrics.items():
            sums[k] += v
        self._counts[mode] += 1



class DistillationTrainer(Trainer):
    """Drop-in ``transformers.Trainer`` that distils ``teacher_model`` into ``model``.

    Same arguments as ``Trainer`` plus ``teacher_model`` (a module, or omitted to load
    ``distillation_config.teacher_model_name_or_path``), ``distillation_config`` and ``teacher_tokenizer``.
    """

    def __init__(self, model=None, args=None, *pos, teacher_model: torch.nn.Module | str | None = None,
                 distillation_config: DistillationConfig | None = None, teacher_tokenizer=None, **kwargs):
        config = distillation_config or DistillationConfig()
        if teacher_model is None or isinstance(teacher_model, str):
            name = teacher_model or config.teacher_model_name_or_path
            if not name:
                raise ValueError("DistillationTrainer needs teacher_model= (a module or a path) or "
                                 "distillation_config.teacher_model_name_or_path.")
            from ..distill.engine import detect_task

            task = config.task if config.task != "auto" else detect_task(model)
            teacher_model = load_teacher(name, task, config.teacher_dtype)
        self.distillation_callback = DistillationCallback(teacher_model, config, teacher_tokenizer=teacher_tokenizer)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [self.distillation_callback]
        super().__init__(model, args, *pos, callbacks=callbacks, **kwargs)
        self.distillation_callback.attach(self)

    @property
    def teacher_model(self) -> torch.nn.Module:
        return self.distillation_callback.teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        return self.distillation_callback.compute_loss(super().compute_loss, model, inputs,
                                                       return_outputs=return_outputs,
                                                       num_items_in_batch=num_items_in_batch, **kwargs)
