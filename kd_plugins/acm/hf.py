"""Stage 3 (end-to-end fine-tuning with a compute budget) inside an unmodified ``transformers.Trainer``.

::

    from kd_plugins.acm import acmize, ACMCallback, ACMConfig
    teacher = copy.deepcopy(model)
    acmize(model, "mlp", num_learners=4)         # then stage1_distill / stage2_gates
    cfg = ACMConfig(budget=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ACMCallback(cfg, teacher=teacher)])
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

from ..distill.engine import unwrap_model
from ..integrations.hf import TrainerPluginCallback, freeze_teacher, patch_trainer
from .config import ACMConfig
from .modules import acm_blocks, set_acm_mode
from .stages import acm_regularizers, distill_term, set_recording

__all__ = ["ACMCallback"]

_NON_MODEL_KEYS = ("labels",)


class ACMCallback(TrainerPluginCallback):
    """Trains an ACMized model (gates, learners and the rest) with the budget, entropy and diversity losses.

    Args:
        config: an :class:`~kd_plugins.acm.ACMConfig` (``budget`` = target beta, ``alpha_*``, ``gumbel_tau``...).
        teacher: optional frozen original model (distilled into the ACM model; logits -> KL, bare encoders ->
            cosine of mean-pooled embeddings).
    """

    def __init__(self, config: ACMConfig | None = None, teacher: torch.nn.Module | None = None):
        self.config = config or ACMConfig()
        self.teacher = teacher
        if teacher is not None:
            if acm_blocks(teacher):
                raise ValueError("the teacher is ACMized: pass the original dense model (copy.deepcopy it before "
                                 "acmize)")
            freeze_teacher(teacher)
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    def _attach(self, trainer: Trainer) -> None:
        base = unwrap_model(trainer.model)
        if not acm_blocks(base):
            raise ValueError("ACMCallback needs an ACMized model: call kd_plugins.acm.acmize(model, ...) first")
        set_acm_mode(base, "gated", gumbel_tau=self.config.gumbel_tau, gate_noise=self.config.gate_noise,
                     straight_through=self.config.straight_through)
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_attached()

    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        cfg = self.config
        base = unwrap_model(model)
        set_recording(base, True)
        try:
            labels = inputs.get("labels")
            task = None
            if labels is not None and cfg.task_weight:
                task, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch,
                                         **kw)
            else:
                fwd = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
                outputs = model(**fwd)
            reg = acm_regularizers(base, cfg.budget)
        finally:
            set_recording(base, False)
        loss = reg.total(cfg.alpha_budget, cfg.alpha_entropy, cfg.alpha_diversity)
        terms = {"acm_budget": reg.budget.item(), "acm_entropy": reg.entropy.item(),
                 "acm_diversity": reg.diversity.item(), "acm_fraction": reg.fraction.item()}
        if task is not None:
            loss = loss + cfg.task_weight * task
            terms["acm_task"] = task.item()
        if self.teacher is not None and cfg.distill_weight:
            t = self.teacher
            t.eval()
            dev = next(t.parameters()).device
            fwd = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            with torch.no_grad():
                t_out = t(**fwd)
            kd = distill_term(outputs, t_out, inputs.get("attention_mask"), cfg.distill_loss, cfg.hidden_weight)
            loss = loss + cfg.distill_weight * kd
            terms["acm_distill"] = kd.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ACM loss is not finite ({terms}); lower the learning rate or check inputs")
        terms["acm_loss"] = loss.item()
        mode = "train" if model.training else "eval"
        for k, v in terms.items():
            self._sums[mode][k] += v
        self._counts[mode] += 1
        return (loss, outputs) if return_outputs else loss

