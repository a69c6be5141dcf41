"""Hugging Face Trainer integration: ``DistillationCallback`` (any unmodified Trainer) and ``DistillationTrainer``.

Three lines turn a working Trainer script into a distillation run::

    from kd_plugins import DistillationCallback, DistillationConfig
    trainer = Trainer(model=student, args=args, train_dataset=ds,
                      callbacks=[DistillationCallback(teacher, DistillationConfig(loss_terms="kl", temperature=2.0))])

The callback attaches to its Trainer (see :mod:`kd_plugins.integrations.hf._trainer`), runs the Trainer's own
loss, and adds the terms of the distillation core (:class:`~kd_plugins.distill.DistillationEngine`), normalised like
the task loss. The teacher never enters the optimizer, DDP, or checkpoints. Projectors (feature KD with different
widths) live outside the student with their own optimizer, stepped after the Trainer's and saved as
``kd_plugins_state.safetensors`` beside each checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import torch
from transformers import Trainer

from ..._config import resolve_config
from ...distill.config import DistillationConfig
from ...distill.engine import DistillationEngine, KDResult, detect_task
from ...distill.fused import FusedLogitLoss
from ...distill.onpolicy import OnPolicySampler
from ...distill.pairs import split_pairs
from ...distill.scaling import LossScaling
from ...distill.teacher_set import split_routing_columns
from ...distill.terms import gradmag_weights, weighted_sum
from ._onpolicy import trainer_on_policy_inputs
from ._trainer import (
    TrainerPluginCallback,
    find_resume_dir,
    is_trl_sft_trainer,
    model_inputs,
    patch_trainer,
    trainer_loss_scaling,
)

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


def _sft_task_loss(trainer):
    """TRL's SFTTrainer computes its NLL with a fused LM head and, asked for outputs, re-runs the model under
    no_grad: distilling those logits would silently train nothing. Use the base Trainer loss (the model's own
    shifted cross-entropy, the same NLL objective) whose logits carry gradients."""
    loss_type = getattr(trainer.args, "loss_type", "nll")
    if loss_type not in (None, "nll"):
        raise ValueError(
            f"DistillationCallback supports SFTTrainer with loss_type='nll' only (got {loss_type!r}); "
            "the distillation terms need the student's logits with gradients."
        )

    def task_loss(model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(
            trainer, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    return task_loss


class DistillationCallback(TrainerPluginCallback):
    """Adds knowledge distillation to an unmodified ``transformers.Trainer`` (or TRL ``SFTTrainer``).

    Args:
        teacher: the teacher model (frozen by the callback), or a :class:`~kd_plugins.TeacherCache` of its outputs
            over the training set (built once by :func:`~kd_plugins.build_teacher_cache`; no teacher runs), or a
            :class:`~kd_plugins.TeacherSet` of several teachers (its routing column is kept from the student).
        config: a :class:`~kd_plugins.DistillationConfig` (default: terms chosen by the student: forward KL at T=1
            when it has logits, ``embedding_cosine`` for a bare encoder).
        teacher_tokenizer: optional; compared with the Trainer's ``processing_class`` to catch tokenizer mismatches.
        **overrides: ``DistillationConfig`` fields that replace those of ``config``.

    Logged with the Trainer's own logs: ``kd_loss`` (weighted sum of terms), ``task_loss``, one ``kd_<term>`` per
    term, ``agreement`` (teacher/student top-1 agreement) or ``teacher_cosine`` (embeddings); ``eval_``-prefixed
    during evaluation. With ``lmbda > 0`` (on-policy data, :mod:`kd_plugins.distill.onpolicy`) also
    ``on_policy_fraction`` (share of training micro-batches generated) and ``generated_tokens`` (generated completion
    tokens per micro-batch, averaged like the other values).
    """

    def __init__(
        self, teacher: torch.nn.Module, config: DistillationConfig | None = None, *, teacher_tokenizer=None, **overrides
    ):
        config = resolve_config(DistillationConfig, config, overrides)
        self.engine = DistillationEngine(teacher, config, teacher_tokenizer=teacher_tokenizer)
        self.fused = FusedLogitLoss(self.engine)
        self.on_policy = OnPolicySampler.from_engine(self.engine)  # lmbda > 0: generated completions
        self._on_policy_logs: dict[str, float] = {}
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    @property
    def config(self) -> DistillationConfig:
        """The engine's config (unset ``loss_terms`` are resolved from the student when the engine is set up)."""
        return self.engine.config

    @property
    def teacher(self) -> torch.nn.Module:
        return self.engine.teacher

    @property
    def fused_reasons(self) -> list[str]:
        """Why the fused linear+KD path is off (empty when it is on or undecided)."""
        return self.fused.reasons

    # ---------------------------------------------------------------- wiring
    def _attach(self, trainer: Trainer) -> None:
        self.trainer = trainer
        # DistillationTrainer calls self.compute_loss from its own compute_loss; only its log is wrapped.
        wrap_loss = not isinstance(trainer, DistillationTrainer)
        sft = wrap_loss and is_trl_sft_trainer(trainer)
        patch_trainer(
            trainer,
            loss_fn=self.compute_loss if wrap_loss else None,
            logs_fn=self._add_logs,
            original_loss=_sft_task_loss(trainer) if sft else None,
        )
        self.engine.set_student_tokenizer(getattr(trainer, "processing_class", None))

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_attached()
        self.engine.setup(self.trainer.model)
        if state.global_step > 0:  # resuming: restore projector state saved beside the checkpoint
            ckpt = find_resume_dir() or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            found = self.engine.load(ckpt)
            if not found and self.config.feature_pairs and self.config.feature_projector:
                warnings.warn(
                    f"Resuming from {ckpt} without {self.engine.__class__.__name__} state "
                    "(kd_plugins_state.safetensors): projectors, if any, restart from scratch.",
                    stacklevel=2,
                )

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
        engine, cfg = self.engine, self.config
        if engine.needs_setup(trainer.model):
            engine.setup(trainer.model)
        engine.step = trainer.state.global_step
        inputs, routing = split_routing_columns(engine.teacher_set, inputs)  # a TeacherSet's column: not the student's
        self._on_policy_logs = {}
        if model.training and cfg.lmbda > 0:  # on-policy / sequence-level KD batch (kd_plugins.distill.onpolicy)
            inputs, num_items_in_batch, self._on_policy_logs = trainer_on_policy_inputs(
                self.on_policy, trainer, model, inputs, num_items_in_batch, engine.task
            )
        has_labels = inputs.get("labels") is not None
        if cfg.hard_label_weight > 0 and not has_labels:
            raise ValueError(
                "hard_label_weight > 0 but the batch has no 'labels'; add labels to the dataset/collator "
                "(e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False)) or set "
                "hard_label_weight=0 to train on the distillation loss alone."
            )
        custom = getattr(trainer, "label_smoother", None) is not None or bool(
            getattr(trainer, "compute_loss_func", None)
        )
        balance = cfg.term_balance != "none" and model.training and torch.is_grad_enabled()
        if (
            model.training
            and torch.is_grad_enabled()
            and not balance
            and self.fused.decide(model, custom_task_loss=custom)
        ):
            return self._fused_loss(trainer, model, inputs, return_outputs, num_items_in_batch)
        anchors, positives = split_pairs(inputs)
        task_loss, outputs = self._student_forward(original, model, anchors, num_items_in_batch, **kw)
        # A pair batch: the positives get their own forward (padded on their own, see kd_plugins.PairCollator).
        positive_outputs = model(**model_inputs(positives)) if positives is not None else None
        scaling = trainer_loss_scaling(trainer, num_items_in_batch, has_task_loss=task_loss is not None)
        task_loss = self.normalised_task_loss(task_loss, outputs, anchors, scaling)
        result = engine.compute({**inputs, **routing}, outputs, scaling=scaling, positive_outputs=positive_outputs)
        if task_loss is not None and not torch.isfinite(task_loss.detach()).all():
            raise FloatingPointError(
                f"Non-finite task loss at step {engine.step}: term 'task_loss' = "
                f"{float(task_loss.detach())}. Check the labels and the learning rate."
            )
        if balance:
            loss = self._balanced_loss(result, task_loss, outputs)
        else:
            loss = result.loss
            if task_loss is not None and cfg.hard_label_weight > 0:
                loss = loss + cfg.hard_label_weight * task_loss
        self._log_step(model.training, result, task_loss, scaling)
        return (loss, outputs) if return_outputs else loss

    def _balanced_loss(self, result: KDResult, task_loss, outputs) -> torch.Tensor:
        """``term_balance="gradmag"``: the terms (and the task loss) reweighted by their gradient norms at the
        student's logits (:func:`~kd_plugins.distill.terms.gradmag_weights`); the factors are logged as
        ``balance_<term>`` (effective weight / configured weight)."""
        cfg = self.config
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
        if not torch.is_tensor(logits) or not logits.requires_grad:
            raise ValueError(
                "term_balance='gradmag' measures each term's gradient at the student's logits, but this student "
                f"({self.engine.task}) returned no logits with gradients; use term_balance='none'."
            )
        values, weights = dict(result.values), dict(cfg.loss_terms)
        if task_loss is not None and cfg.hard_label_weight > 0:
            values["task_loss"], weights["task_loss"] = task_loss, cfg.hard_label_weight
        effective = gradmag_weights(values, weights, logits)
        for name, w in effective.items():
            if weights[name] > 0:
                result.metrics[f"balance_{name}"] = w / weights[name]
        return weighted_sum(values, effective, step=self.engine.step)

    def _student_forward(self, original, model, inputs, num_items_in_batch, **kw):
        """The student's outputs (with gradients) and the Trainer's task loss (``None`` without labels)."""
        need_attn = any(k == "attention" for k in self.config.kinds.values())
        extra = {"output_attentions": True} if need_attn else {}
        if self.engine.task == "encoder" or inputs.get("labels") is None:
            return None, model(**model_inputs(inputs), **extra)
        task_loss, outputs = original(
            model, {**inputs, **extra}, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw
        )
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if model.training and torch.is_grad_enabled() and torch.is_tensor(logits) and not logits.requires_grad:
            raise RuntimeError(
                f"{type(self.trainer).__name__}.compute_loss returned student logits without gradients, so "
                "distillation would train nothing. Use kd_plugins.DistillationTrainer, or a Trainer whose "
                "compute_loss returns the outputs of its training forward pass."
            )
        return task_loss, outputs

    def _fused_loss(self, trainer, model, inputs, return_outputs, num_items_in_batch):
        labels = inputs.get("labels")
        scaling = trainer_loss_scaling(trainer, num_items_in_batch, has_task_loss=labels is not None)
        out = self.fused(model, inputs, scaling)
        self._log_step(True, out.result, out.task_loss, LossScaling())
        return (out.loss, out.outputs) if return_outputs else out.loss

    # ------------------------------------------------------------- logging
    def _log_step(self, training: bool, result: KDResult, task_loss, scaling: LossScaling) -> None:
        values = {f"kd_{name}": float(v) for name, v in result.terms.items()}
        values["kd_loss"] = sum(self.config.loss_terms[name] * float(v) for name, v in result.terms.items())
        if task_loss is not None:
            values["task_loss"] = scaling.unscale_task_loss(float(task_loss.detach()))
        values.update(result.metrics)
        values.update(self._on_policy_logs if training else {})
        self._record(training, values)


class DistillationTrainer(Trainer):
    """Drop-in ``transformers.Trainer`` that distils ``teacher_model`` into ``model``.

    Same arguments as ``Trainer`` plus ``teacher_model`` (a module, or omitted to load
    ``distillation_config.teacher_model_name_or_path``), ``distillation_config`` and ``teacher_tokenizer``.
    """

    def __init__(
        self,
        model=None,
        args=None,
        *pos,
        teacher_model: torch.nn.Module | str | None = None,
        distillation_config: DistillationConfig | None = None,
        teacher_tokenizer=None,
        **kwargs,
    ):
        config = distillation_config or DistillationConfig()
        if teacher_model is None or isinstance(teacher_model, str):
            name = teacher_model or config.teacher_model_name_or_path
            if not name:
                raise ValueError(
                    "DistillationTrainer needs teacher_model= (a module or a path) or "
                    "distillation_config.teacher_model_name_or_path."
                )
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
        return self.distillation_callback.compute_loss(
            super().compute_loss,
            model,
            inputs,
            return_outputs=return_outputs,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )
