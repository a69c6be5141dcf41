"""Multi-exit training inside an unmodified ``transformers.Trainer``: ``MultiExitCallback``.

::

    from kd_plugins.multiexit import add_exits, MultiExitCallback, MultiExitConfig
    add_exits(model, layers=[2, 4, 6])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[MultiExitCallback(MultiExitConfig(weights="depth"), teacher=None)])

Like :class:`~kd_plugins.integrations.hf.DistillationCallback`, the callback finds the calling Trainer on its first
event and wraps that instance's ``compute_loss`` and ``log``. The wrapped ``compute_loss`` runs one forward pass with
hooks on the exit layers: for models with labels it calls the Trainer's own ``compute_loss`` (so the deepest exit's
task loss keeps label smoothing / ``compute_loss_func``), then adds cross-entropy at every shallower exit and the
distillation terms (:func:`~kd_plugins.multiexit.multi_exit_loss`). Terms are normalised like the task loss under
gradient accumulation (by ``num_items_in_batch`` when the Trainer does so). Bare encoders train on embeddings:
distillation from the deepest exit and/or a teacher, plus InfoNCE when ``embedding_task="infonce"`` and the batch
carries ``positive_input_ids`` / ``positive_attention_mask`` (set ``remove_unused_columns=False``).

Logged with the Trainer's logs: ``multi_exit_loss`` and ``exit{k}_task`` / ``exit{k}_self_kd`` /
``exit{k}_teacher_kd`` per exit (``eval_``-prefixed during evaluation).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..distill.engine import unwrap_model
from ..integrations.hf import TrainerPluginCallback, freeze_teacher, patch_trainer
from .core import _assemble, _model_inputs, capture_hidden, get_exits, pool
from .loss import MultiExitConfig, exit_ce_losses, info_nce, multi_exit_loss

__all__ = ["MultiExitCallback"]


class MultiExitCallback(TrainerPluginCallback):
    """Trains every exit added by :func:`~kd_plugins.multiexit.add_exits` inside a ``transformers.Trainer``.

    Args:
        config: a :class:`~kd_plugins.multiexit.MultiExitConfig` (default: i/L weights, KL / cosine
            self-distillation from the deepest exit).
        teacher: optional frozen external teacher distilled into every exit (same tokenizer; logits of the same
            vocabulary, or an encoder whose pooled embeddings the exits match).
    """

    def __init__(self, config: MultiExitConfig | None = None, teacher: torch.nn.Module | None = None):
        self.config = config or MultiExitConfig()
        self.teacher = teacher
        if teacher is not None:
            freeze_teacher(teacher)
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    # --------------------------------------------------------------------------------------------- wiring
    def _attach(self, trainer: Trainer) -> None:
        get_exits(trainer.model)  # clear error now if add_exits was not called
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        wrapped = getattr(trainer, "model_wrapped", None)
        if type(wrapped).__name__ == "DistributedDataParallel" and not getattr(wrapped, "static_graph", False):
            # The exit heads run on hooked hidden states after the wrapped forward returns. DDP with
            # find_unused_parameters=True (the Trainer's default) would mark their parameters unused at the end of
            # the forward and then see their gradients arrive: "marked ready twice". The exits' graph is the same
            # every step, which is what DDP's static-graph mode needs (set before the first forward).
            wrapped._set_static_graph()

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        trainer = self._ensure_attached()
        base = unwrap_model(model)
        ex = get_exits(base)
        cfg = self.config
        labels = inputs.get("labels")
        L = ex.num_layers
        shallow = [k for k in ex.layers if k != L]
        final_task = None
        with capture_hidden(base, shallow) as store:
            if labels is not None and ex.kind == "logits":
                call = {k: v for k, v in inputs.items() if not k.startswith("positive_")}
                final_task, outputs = original(model, call, return_outputs=True,
                                               num_items_in_batch=num_items_in_batch, **kw)
            else:
                fwd = _model_inputs(inputs)
                outputs = model(**fwd)
        exits = _assemble(base, ex, store, outputs)
        if model.training and torch.is_grad_enabled():
            for k, v in exits.items():
                if not v.requires_grad:
                    raise RuntimeError(f"exit {k} output has no gradient: {type(trainer).__name__}.compute_loss did "
                                       "not return the outputs of its training forward pass")
        scaled = labels is not None and ex.kind == "logits" and (
            (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(trainer, "compute_loss_func", None) is not None)
        ga = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
        kd_scale = 1.0 / ga if scaled else 1.0
        items_scale = 1.0
        if scaled and getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            items_scale = float(trainer.accelerator.num_processes)

        task_losses: dict[int, torch.Tensor] = {}
        teacher_out = None
        mask = None
        if ex.kind == "logits":
            if labels is not None:
                task_losses = exit_ce_losses(exits, labels, causal=ex.family == "causal_lm",
                                             num_items_in_batch=num_items_in_batch if scaled else None,
                                             skip=[L] if final_task is not None else ())
                task_losses = {k: v * items_scale for k, v in task_losses.items()}
                if final_task is not None and L in exits:
                    task_losses[L] = final_task
            if ex.family == "causal_lm":
                am = inputs.get("attention_mask")
                mask = am.bool() if am is not None else None
            if self.teacher is not None:
                teacher_out = self._teacher_forward(inputs, ex.family == "causal_lm")["logits"]
            result = multi_exit_loss(exits, L, cfg, kind="logits", task_losses=task_losses, teacher=teacher_out,
                                     mask=mask, kd_scale=kd_scale)
        else:
            am = inputs.get("attention_mask")
            emb = {k: pool(h, am, ex.pooling) for k, h in exits.items()}
            if cfg.embedding_task == "infonce" and cfg.task_weight > 0:
                if "positive_input_ids" not in inputs:
                    raise ValueError("embedding_task='infonce' needs positive_input_ids / positive_attention_mask in "
                                     "the batch (and TrainingArguments(remove_unused_columns=False))")
                pos_in = {k[len("positive_"):]: v for k, v in inputs.items() if k.startswith("positive_")}
                with capture_hidden(base, shallow) as pstore:
                    pout = model(**pos_in)
                pexits = _assemble(base, ex, pstore, pout)
                pam = pos_in.get("attention_mask")
                task_losses = {k: info_nce(emb[k], pool(pexits[k], pam, ex.pooling), cfg.infonce_scale)
                               for k in emb}
            if self.teacher is not None:
                t = self._teacher_forward(inputs, False)
                teacher_out = pool(t["last_hidden_state"], am, ex.pooling)
            result = multi_exit_loss(emb, L, cfg, kind="embedding", task_losses=task_losses, teacher=teacher_out)
        self._record("train" if model.training else "eval", result.terms)
        loss = result.loss
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teacher_forward(self, inputs: dict, causal: bool) -> Any:
        t = self.teacher
        dev = next(t.parameters()).device
        fwd = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in _model_inputs(inputs).items()}
        if causal:
            fwd.setdefault("use_cache", False)
        return t(**fwd)

    # ------------------------------------------------------------------------------------------- logging
    def _record(self, mode: str, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self._sums[mode][k] += v
        self._counts[mode] += 1

