"""Stage 3 of ACM (end-to-end fine-tuning with a compute budget) inside an unmodified ``transformers.Trainer``.

::

    from kd_plugins import ACMCallback
    from kd_plugins.acm import acmize, ACMConfig
    teacher = copy.deepcopy(model)
    acmize(model, "mlp", num_learners=4)         # then stage1_distill / stage2_gates
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ACMCallback(teacher, ACMConfig(budget=0.5))])
    trainer.train()

Loss: ``task_weight * task + distill_weight * distill(original -> ACM model) + alpha_b L_b + alpha_e L_e +
alpha_d L_d``. ``task`` is the Trainer's own ``compute_loss`` when the batch has labels. The gates run hard
Gumbel-softmax in training and, with ``straight_through=True`` (default), every ACM outputs
``sum_k onehot_k * h(z, k)`` (all learners computed) so the task / distillation loss reaches the gates through the
straight-through estimator. The released code indexes learners with the argmax instead, so there the gates learn
only from ``L_b, L_e, L_d``: ``straight_through=False`` reproduces that.

Logged: ``acm_loss``, ``acm_task``, ``acm_distill``, ``acm_budget``, ``acm_entropy``, ``acm_diversity`` and
``acm_fraction`` (executed learner fraction), ``eval_``-prefixed during evaluation.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...acm.config import ACMConfig
from ...acm.modules import acm_blocks, set_acm_mode
from ...acm.stages import acm_regularizers, distill_term, set_recording
from ...distill.teacher import Teacher
from ...distill.terms import weighted_sum
from ._trainer import TrainerPluginCallback, model_inputs, patch_trainer

__all__ = ["ACMCallback"]


class ACMCallback(TrainerPluginCallback):
    """Trains an ACMized model (gates, learners and the rest) with the budget, entropy and diversity losses.

    Args:
        teacher: optional frozen original model (distilled into the ACM model; logits -> KL, bare encoders ->
            cosine of mean-pooled embeddings).
        config: an :class:`~kd_plugins.acm.ACMConfig` (``budget`` = target beta, ``alpha_*``, ``gumbel_tau``...).
        **overrides: ``ACMConfig`` fields that replace those of ``config``.
    """

    def __init__(self, teacher: torch.nn.Module | None = None, config: ACMConfig | None = None, **overrides):
        if isinstance(teacher, ACMConfig):
            raise TypeError(
                "ACMCallback(teacher=None, config=None, **overrides): the teacher comes first, as in "
                "every kd_plugins callback; pass the config as config=ACMConfig(...)."
            )
        self.config = resolve_config(ACMConfig, config, overrides)
        self.teacher = None
        if teacher is not None:
            if acm_blocks(teacher):
                raise ValueError(
                    "the teacher is ACMized: pass the original dense model (copy.deepcopy it before acmize)"
                )
            self.teacher = Teacher(teacher)
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    def _attach(self, trainer: Trainer) -> None:
        base = unwrap_model(trainer.model)
        if not acm_blocks(base):
            raise ValueError("ACMCallback needs an ACMized model: call kd_plugins.acm.acmize(model, ...) first")
        set_acm_mode(
            base,
            "gated",
            gumbel_tau=self.config.gumbel_tau,
            gate_noise=self.config.gate_noise,
            straight_through=self.config.straight_through,
        )
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_attached()
        if self.teacher is not None:
            self.teacher.check_separate(self.trainer.model)

    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        cfg = self.config
        base = unwrap_model(model)
        set_recording(base, True)
        try:
            task = None
            if inputs.get("labels") is not None and cfg.task_weight:
                task, outputs = original(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kw
                )
            else:
                outputs = model(**model_inputs(inputs, drop=("labels",)))
            reg = acm_regularizers(base, cfg.budget)
        finally:
            set_recording(base, False)
        values = {"acm_budget": reg.budget, "acm_entropy": reg.entropy, "acm_diversity": reg.diversity}
        weights = {
            "acm_budget": cfg.alpha_budget,
            "acm_entropy": cfg.alpha_entropy,
            "acm_diversity": cfg.alpha_diversity,
        }
        if task is not None:
            values["acm_task"], weights["acm_task"] = task, cfg.task_weight
        if self.teacher is not None and cfg.distill_weight:
            t_out = self.teacher.forward_batch(model_inputs(inputs, drop=("labels",)))
            values["acm_distill"] = distill_term(
                outputs, t_out, inputs.get("attention_mask"), cfg.distill_loss, cfg.hidden_weight
            )
            weights["acm_distill"] = cfg.distill_weight
        loss = weighted_sum(values, weights, hint="Lower the learning rate or check the inputs.")
        logs = {k: v.item() for k, v in values.items()}
        logs.update(acm_fraction=reg.fraction.item(), acm_loss=loss.item())
        self._record(model.training, logs)
        return (loss, outputs) if return_outputs else loss
