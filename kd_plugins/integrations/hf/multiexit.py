"""Multi-exit training inside an unmodified ``transformers.Trainer``: ``MultiExitCallback``.

::

    from kd_plugins import MultiExitCallback
    from kd_plugins.multiexit import add_exits, MultiExitConfig
    add_exits(model, layers=[2, 4, 6])
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[MultiExitCallback(config=MultiExitConfig(weights="depth"))])

The callback attaches to its Trainer like every kd_plugins callback (:mod:`kd_plugins.integrations.hf._trainer`).
The wrapped ``compute_loss`` runs one forward pass with hooks on the exit layers: for models with labels it calls the
Trainer's own ``compute_loss`` (so the deepest exit's task loss keeps label smoothing / ``compute_loss_func``), then
adds cross-entropy at every shallower exit and the distillation terms (:func:`~kd_plugins.multiexit.multi_exit_loss`),
normalised like the task loss under gradient accumulation. Bare encoders train on pooled embeddings: distillation
from the deepest exit and/or a teacher, plus InfoNCE when ``embedding_task="infonce"``. Their batches may carry
several text groups, each a set of model inputs under a key prefix (set ``remove_unused_columns=False``):

==========================  ==========================================================================================
(no prefix)                 the queries: ``input_ids``, ``attention_mask``, ...
``positive_``               their positives (InfoNCE; distilled too with ``distill_positives=True``)
``extra_``                  additional queries, e.g. inverse-cloze sentences (``extra_pairs_weight > 0``)
``extra_positive_``         their positives
==========================  ==========================================================================================

Instead of running a teacher model, a batch may carry the teacher's pooled embeddings: ``teacher_embedding``
(``[B, D]``, the queries) and, with ``distill_positives``, ``positive_teacher_embedding`` (offline distillation, e.g.
from a cache).

Under mixed precision (``bf16`` / ``fp16``) the exit heads run under the Trainer's autocast, like the model's forward;
``embedding_losses_fp32`` keeps the encoder loss terms in float32.

Logged with the Trainer's logs: ``multi_exit_loss`` and ``exit{k}_task`` / ``exit{k}_self_kd`` /
``exit{k}_teacher_kd`` per exit, ``exit{k}_extra_infonce`` with extra pairs (``eval_``-prefixed during evaluation).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...distill.scaling import LossScaling
from ...distill.teacher import Teacher
from ...multiexit.config import MultiExitConfig
from ...multiexit.core import _assemble, _model_inputs, capture_hidden, get_exits, pool
from ...multiexit.loss import MultiExitLoss, exit_ce_losses, info_nce, multi_exit_loss
from ._trainer import TrainerPluginCallback, patch_trainer, trainer_loss_scaling

__all__ = ["MultiExitCallback"]

#: Key prefixes of the extra text groups an encoder batch may carry (longest first: ``extra_positive_`` is not
#: ``extra_``).
GROUP_PREFIXES = ("extra_positive_", "extra_", "positive_")
#: Batch key (after a group's prefix) of that group's precomputed teacher embeddings.
TEACHER_EMBEDDING_KEY = "teacher_embedding"
_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch", "return_loss", TEACHER_EMBEDDING_KEY)


def split_groups(inputs: dict) -> dict[str, dict]:
    """The batch by text group: ``{"": queries, "positive_": ..., "extra_": ..., "extra_positive_": ...}``, each
    group's keys without their prefix."""
    groups: dict[str, dict] = {g: {} for g in ("",) + GROUP_PREFIXES}
    for key, value in inputs.items():
        prefix = next((g for g in GROUP_PREFIXES if key.startswith(g)), "")
        groups[prefix][key[len(prefix) :]] = value
    return groups


def _forward_inputs(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in _NOT_MODEL_INPUTS}


def _head_precision(trainer: Trainer | None):
    """The autocast the Trainer's accelerator wraps around the model's forward under mixed precision (``bf16`` /
    ``fp16``), for the exit heads: they run on hooked hidden states after that forward returns, and belong to it."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def _loss_precision(fp32: bool, device: torch.device):
    """Autocast off for the loss terms (``embedding_losses_fp32``); otherwise the caller's precision."""
    return torch.autocast(device.type, enabled=False) if fp32 else contextlib.nullcontext()


class MultiExitCallback(TrainerPluginCallback):
    """Trains every exit added by :func:`~kd_plugins.multiexit.add_exits` inside a ``transformers.Trainer``.

    Args:
        teacher: optional frozen external teacher distilled into every exit (same tokenizer; logits of the same
            vocabulary, or an encoder whose pooled embeddings the exits match).
        config: a :class:`~kd_plugins.multiexit.MultiExitConfig` (default: i/L weights, KL / cosine
            self-distillation from the deepest exit).
        **overrides: ``MultiExitConfig`` fields that replace those of ``config``.
    """

    def __init__(self, teacher: torch.nn.Module | None = None, config: MultiExitConfig | None = None, **overrides):
        if isinstance(teacher, MultiExitConfig):
            raise TypeError(
                "MultiExitCallback(teacher=None, config=None, **overrides): the teacher comes first, as "
                "in every kd_plugins callback; pass the config as config=MultiExitConfig(...)."
            )
        self.config = resolve_config(MultiExitConfig, config, overrides)
        self.teacher = Teacher(teacher) if teacher is not None else None
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    # --------------------------------------------------------------------------------------------- wiring
    def _attach(self, trainer: Trainer) -> None:
        ex = get_exits(trainer.model)  # clear error now if add_exits was not called
        cfg = self.config
        if ex.kind != "embedding" and (cfg.distill_positives or cfg.extra_pairs_weight > 0):
            raise ValueError(
                "distill_positives and extra_pairs_weight apply to encoder exits (pooled embeddings); "
                f"this model's exits give {ex.kind}"
            )
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        if self.teacher is not None:
            self.teacher.check_separate(trainer.model)
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
        shallow = [k for k in ex.layers if k != ex.num_layers]
        groups = split_groups(inputs)
        final_task = None
        # Mixed precision: the exit heads run under the autocast the Trainer puts around the model's forward. For
        # encoders, the forward passes of a pair group (queries and positives; extra queries and extra positives)
        # share one autocast region, as in a hand-written bf16 loop (one weight cast per region, its gradients
        # summed in the low precision): the MiniLM benchmark's loop, which this reproduces step for step.
        encoder = ex.kind == "embedding"
        with _head_precision(trainer) if encoder else contextlib.nullcontext():
            with capture_hidden(base, shallow) as store:
                if inputs.get("labels") is not None and ex.kind == "logits":
                    call = {k: v for k, v in groups[""].items() if k != TEACHER_EMBEDDING_KEY}
                    final_task, outputs = original(
                        model, call, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw
                    )
                else:
                    outputs = model(**_forward_inputs(groups[""]))
            with _head_precision(trainer):
                exits = _assemble(base, ex, store, outputs)
            outs = self._pair_exits(model, base, ex, groups, shallow, ("positive_",)) if encoder else {}
        if encoder:
            with _head_precision(trainer):
                outs.update(self._pair_exits(model, base, ex, groups, shallow, ("extra_", "extra_positive_")))
        if model.training and torch.is_grad_enabled():
            _check_exit_gradients(base, ex, exits, trainer)
        if ex.kind == "logits":
            scaling = trainer_loss_scaling(trainer, num_items_in_batch, has_task_loss=inputs.get("labels") is not None)
            final_task = self.normalised_task_loss(final_task, outputs, inputs, scaling)
            result = self._logit_loss(ex, exits, inputs, final_task, scaling)
        else:
            result = self._embedding_loss(ex, {"": exits, **outs}, groups)
        self._record(model.training, result.terms)
        return (result.loss, outputs) if return_outputs else result.loss

    def _logit_loss(self, ex, exits, inputs, final_task, scaling: LossScaling) -> MultiExitLoss:
        labels, L = inputs.get("labels"), ex.num_layers
        causal = ex.family == "causal_lm"
        task_losses: dict[int, torch.Tensor] = {}
        if labels is not None:
            task_losses = exit_ce_losses(
                exits,
                labels,
                causal=causal,
                num_items_in_batch=scaling.num_items_in_batch if scaling.by_items else None,
                skip=[L] if final_task is not None else (),
            )
            task_losses = {k: v * scaling.items_scale for k, v in task_losses.items()}
            if final_task is not None and L in exits:
                task_losses[L] = final_task
        am = inputs.get("attention_mask")
        mask = am.bool() if causal and am is not None else None
        teacher_out = None
        if self.teacher is not None:
            extra = {"use_cache": False} if causal else {}
            teacher_out = self.teacher.forward_batch(_model_inputs(inputs), **extra)["logits"]
        return multi_exit_loss(
            exits,
            L,
            self.config,
            kind="logits",
            task_losses=task_losses,
            teacher=teacher_out,
            mask=mask,
            kd_scale=scaling.mean_scale,
        )

    def _pair_exits(self, model, base, ex, groups: dict, shallow, prefixes: tuple[str, ...]) -> dict:
        """Every exit's output (``prefix -> exits``) for those of the batch's other text groups among ``prefixes``
        that the objective uses."""
        cfg = self.config
        infonce = cfg.embedding_task == "infonce" and cfg.task_weight > 0
        used = {"positive_": infonce or cfg.distill_positives, "extra_": infonce and cfg.extra_pairs_weight > 0}
        used["extra_positive_"] = used["extra_"]
        why = {
            "positive_": "embedding_task='infonce'" if infonce else "distill_positives=True",
            "extra_": "extra_pairs_weight > 0",
            "extra_positive_": "extra_pairs_weight > 0",
        }
        return {g: self._group_exits(model, base, ex, groups, g, shallow, why[g]) for g in prefixes if used[g]}

    def _embedding_loss(self, ex, outs: dict, groups: dict) -> MultiExitLoss:
        """Pooled-embedding objective from every group's exit outputs (``outs``: prefix -> exits), pooled and scored
        in ``embedding_losses_fp32``'s precision."""
        cfg = self.config
        infonce = cfg.embedding_task == "infonce" and cfg.task_weight > 0
        exits = outs[""]
        distilled = ("", "positive_") if cfg.distill_positives else ("",)
        teacher = self._teacher_states(groups, distilled)
        fp32 = cfg.embedding_losses_fp32
        with _loss_precision(fp32, exits[ex.num_layers].device):
            emb = {
                g: {
                    k: pool(h.float() if fp32 else h, groups[g].get("attention_mask"), ex.pooling) for k, h in o.items()
                }
                for g, o in outs.items()
            }
            task_losses, extra_terms = {}, {}
            if infonce:
                task_losses = {k: info_nce(emb[""][k], emb["positive_"][k], cfg.infonce_scale) for k in emb[""]}
            if infonce and cfg.extra_pairs_weight > 0:
                for k in task_losses:
                    extra = info_nce(emb["extra_"][k], emb["extra_positive_"][k], cfg.infonce_scale)
                    task_losses[k] = task_losses[k] + cfg.extra_pairs_weight * extra
                    extra_terms[f"exit{k}_extra_infonce"] = float(extra.detach())
            student = {
                k: torch.cat([emb[g][k] for g in distilled]) if len(distilled) > 1 else v for k, v in emb[""].items()
            }
            teacher_out = None
            if teacher is not None:
                parts = [t if am is None else pool(t.float() if fp32 else t, am, ex.pooling) for t, am in teacher]
                teacher_out = torch.cat(parts) if len(parts) > 1 else parts[0]
                teacher_out = teacher_out.float() if fp32 else teacher_out
            result = multi_exit_loss(
                student, ex.num_layers, cfg, kind="embedding", task_losses=task_losses, teacher=teacher_out
            )
        result.terms.update(extra_terms)
        return result

    def _group_exits(self, model, base, ex, groups: dict, prefix: str, shallow, why: str):
        """Every exit's output for one text group of the batch (one forward pass with the exit hooks)."""
        group = _forward_inputs(groups[prefix])
        if "input_ids" not in group and "inputs_embeds" not in group:
            raise ValueError(
                f"{why} needs {prefix}input_ids / {prefix}attention_mask in the batch (and "
                "TrainingArguments(remove_unused_columns=False))"
            )
        with capture_hidden(base, shallow) as store:
            out = model(**group)
        with _head_precision(self.trainer):
            return _assemble(base, ex, store, out)

    def _teacher_states(self, groups: dict, names: tuple[str, ...]) -> list | None:
        """Per distilled group, ``(tensor, attention_mask)``: the teacher model's last hidden state and the mask to
        pool it with, or a precomputed pooled embedding from the batch (mask ``None``). ``None`` without a
        teacher."""
        given = [TEACHER_EMBEDDING_KEY in groups[g] for g in names]
        if any(given):
            if self.teacher is not None:
                raise ValueError(
                    f"the batch carries {TEACHER_EMBEDDING_KEY!r} and the callback has a teacher model: "
                    "give one source of teacher embeddings"
                )
            missing = [g + TEACHER_EMBEDDING_KEY for g, ok in zip(names, given) if not ok]
            if missing:
                raise ValueError(
                    f"the batch carries precomputed teacher embeddings for some distilled groups but "
                    f"not {missing} (distill_positives=True distils the positives too)"
                )
            return [(groups[g][TEACHER_EMBEDDING_KEY], None) for g in names]
        if self.teacher is None:
            return None
        return [
            (
                self.teacher.forward_batch(_forward_inputs(groups[g]))["last_hidden_state"],
                groups[g].get("attention_mask"),
            )
            for g in names
        ]


def _check_exit_gradients(base, ex, exits, trainer) -> None:
    """Every exit that depends on a trainable weight must carry a gradient: otherwise ``compute_loss`` did not return
    the outputs of its training forward pass. An exit fed only by frozen weights (e.g. the deepest exit when only the
    exit heads train) legitimately has none."""
    trunk_trains = any(p.requires_grad for n, p in base.named_parameters() if not n.startswith("multi_exit."))
    for k, v in exits.items():
        head = ex.heads[str(k)] if str(k) in ex.heads else None
        trains = trunk_trains or (head is not None and any(p.requires_grad for p in head.parameters()))
        if trains and not v.requires_grad:
            raise RuntimeError(
                f"exit {k} output has no gradient: {type(trainer).__name__}.compute_loss did not "
                "return the outputs of its training forward pass"
            )
