"""LLaVA-MoD inside an unmodified ``transformers.Trainer``: ``MoEBalanceCallback`` (router balance loss and expert
load of an upcycled model) and ``PreferenceDistillationCallback`` (DPO with the frozen teacher as reference model).

Mimic distillation (dense teacher -> MoE student) is :class:`~kd_plugins.DistillationCallback` with the balance
callback beside it::

    upcycle_moe(student)
    trainer = Trainer(model=student, args=args, train_dataset=ds,
                      callbacks=[DistillationCallback(teacher, loss_terms="kl"), MoEBalanceCallback()])

Preference distillation replaces the Trainer's loss with DPO on (prompt, chosen, rejected) batches built by
:class:`~kd_plugins.moe.PreferenceCollator` (``remove_unused_columns=False`` keeps their fields)::

    trainer = Trainer(model=student, args=TrainingArguments(..., remove_unused_columns=False), train_dataset=pairs,
                      data_collator=PreferenceCollator(tokenizer),
                      callbacks=[PreferenceDistillationCallback(teacher, beta=0.1), MoEBalanceCallback()])

``MoEBalanceCallback`` wraps the Trainer's loss as it is when training starts, whatever computes it (the Trainer,
distillation or preference distillation): every forward of the student inside ``compute_loss`` is recorded and
``balance_weight * moe_balance`` is added (normalised like the task loss under gradient accumulation). It makes
itself the outermost wrapper at ``on_train_begin``; for an evaluation-only run list it after the other callbacks.

Logged (``eval_``-prefixed during evaluation): ``moe_balance`` (unweighted sum of the per-layer terms; 1 per layer
when balanced), ``moe_load_max`` / ``moe_load_min`` (the largest / smallest expert share per layer, averaged over
layers; ``1/E`` each when balanced); ``pref_loss``, ``pref_reward_chosen``, ``pref_reward_rejected``,
``pref_reward_margin``, ``pref_reward_accuracy``, ``pref_logp_chosen``, ``pref_logp_rejected`` (and ``pref_sft``).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from ..._config import resolve_config
from ...distill.teacher import Teacher
from ...distill.terms import check_finite, weighted_sum
from ...losses.preference import dpo_loss
from ...moe.config import MoEConfig, PreferenceDistillationConfig
from ...moe.preference import completion_logprobs, concat_preference_batch
from ...moe.upcycle import expert_load, moe_balance_loss, moe_layers, record_router
from ._trainer import TrainerPluginCallback, patch_trainer, trainer_loss_scaling

__all__ = ["MoEBalanceCallback", "PreferenceDistillationCallback"]


class MoEBalanceCallback(TrainerPluginCallback):
    """Adds ``balance_weight * sum_layers E * sum_e f_e P_e`` (Switch-style router balance loss) to the loss of a
    Trainer training an upcycled model (:func:`~kd_plugins.moe.upcycle_moe`), and logs it with the expert load.

    Args:
        teacher: must be ``None`` (the signature every kd_plugins callback shares); distil from a teacher with
            :class:`~kd_plugins.DistillationCallback` or :class:`PreferenceDistillationCallback` beside this one.
        config: a :class:`~kd_plugins.moe.MoEConfig`; this callback reads ``balance_weight`` and ``balance_form``.
        **overrides: ``MoEConfig`` fields that replace those of ``config``.
    """

    def __init__(self, teacher: None = None, config: MoEConfig | None = None, **overrides):
        if isinstance(teacher, MoEConfig):
            raise TypeError(
                "MoEBalanceCallback(teacher=None, config=None, **overrides): the teacher comes first, as in every "
                "kd_plugins callback; pass the config as config=MoEConfig(...)."
            )
        if teacher is not None:
            raise ValueError(
                "MoEBalanceCallback takes no teacher: it adds the router balance loss. Distil from the teacher with "
                "DistillationCallback(teacher) or PreferenceDistillationCallback(teacher) on the same Trainer."
            )
        self.config = resolve_config(MoEConfig, config, overrides)
        self.trainer: Trainer | None = None
        self._wrapper = None
        self._depth = 0
        self._reset_loss_logs()

    def _attach(self, trainer: Trainer) -> None:
        if not moe_layers(trainer.model):
            raise ValueError("MoEBalanceCallback needs an upcycled model: call kd_plugins.upcycle_moe(model) first")
        self.trainer = trainer
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)
        self._wrapper = trainer.compute_loss

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        if trainer.compute_loss is not self._wrapper:
            # A callback attached after this one wrapped the loss (and may not call what it wrapped, as preference
            # distillation does not): wrap again, outermost. The inner copy then passes through (see _depth).
            patch_trainer(trainer, loss_fn=self.compute_loss)
            self._wrapper = trainer.compute_loss

    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        """The wrapped loss plus the weighted balance loss of every student forward it ran."""
        if self._depth:  # an outer copy of this wrapper adds the term
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw)
        trainer = self._ensure_attached()
        cfg = self.config
        self._depth += 1
        try:
            with record_router(model):
                result = original(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kw
                )
        finally:
            self._depth -= 1
        loss, outputs = result if return_outputs else (result, None)
        balance = moe_balance_loss(model, form=cfg.balance_form)
        check_finite("moe_balance", balance, trainer.state.global_step, "Lower the learning rate or check the inputs.")
        scaling = trainer_loss_scaling(trainer, num_items_in_batch)
        if cfg.balance_weight:
            loss = loss + scaling.mean(cfg.balance_weight * balance.to(loss.device))
        loads = torch.stack(list(expert_load(model).values()))
        self._record(
            model.training,
            {
                "moe_balance": balance.detach(),
                "moe_load_max": loads.max(dim=-1).values.mean(),
                "moe_load_min": loads.min(dim=-1).values.mean(),
            },
        )
        return (loss, outputs) if return_outputs else loss


class PreferenceDistillationCallback(TrainerPluginCallback):
    """Replaces an unmodified Trainer's loss with DPO against the frozen teacher (LLaVA-MoD preference distillation).

    Each batch (from :class:`~kd_plugins.moe.PreferenceCollator`) runs the student once on the chosen and rejected
    sequences together and the teacher once under ``no_grad``; the loss is
    :func:`~kd_plugins.losses.preference.dpo_loss` of the completion log-probs (plus ``sft_weight`` times the
    per-token NLL of the chosen answers). The teacher must share the student's tokenizer.

    Args:
        teacher: the frozen reference model (the dense teacher).
        config: a :class:`~kd_plugins.moe.PreferenceDistillationConfig` (``beta=0.1``, ``loss_form="sigmoid"``).
        **overrides: ``PreferenceDistillationConfig`` fields that replace those of ``config``.

    It sets ``trainer.label_names = ["chosen_input_ids"]`` (unless ``TrainingArguments.label_names`` is set), so
    ``Trainer.evaluate`` computes the loss on preference batches; the returned outputs are the rewards ``[B, 2]``.
    """

    def __init__(self, teacher: torch.nn.Module, config: PreferenceDistillationConfig | None = None, **overrides):
        if isinstance(teacher, PreferenceDistillationConfig):
            raise TypeError(
                "PreferenceDistillationCallback(teacher, config=None, **overrides): the teacher comes first, as in "
                "every kd_plugins callback; pass the config as config=PreferenceDistillationConfig(...)."
            )
        if teacher is None:
            raise ValueError("PreferenceDistillationCallback needs the teacher: it is the DPO reference model")
        self.config = resolve_config(PreferenceDistillationConfig, config, overrides)
        self.teacher = Teacher(teacher)
        self.trainer: Trainer | None = None
        self._reset_loss_logs()

    def _attach(self, trainer: Trainer) -> None:
        if getattr(trainer.args, "remove_unused_columns", False):
            raise ValueError(
                "PreferenceDistillationCallback reads the 'prompt' / 'chosen' / 'rejected' fields, which the Trainer "
                "drops with remove_unused_columns=True: set TrainingArguments(remove_unused_columns=False)."
            )
        self.trainer = trainer
        if trainer.args.label_names is None:
            trainer.label_names = ["chosen_input_ids"]
        patch_trainer(trainer, loss_fn=self.compute_loss, logs_fn=self._add_logs)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        self.teacher.check_separate(trainer.model)
        self.teacher.place(trainer.model)

    def compute_loss(self, original, model, inputs, return_outputs=False, num_items_in_batch=None, **kw):
        """DPO of the student's completion log-probs against the teacher's (``original`` is not called)."""
        trainer = self._ensure_attached()
        cfg = self.config
        batch, n = concat_preference_batch(inputs)
        ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        t_logits = self.teacher(input_ids=ids, attention_mask=am, use_cache=False).logits
        if int(ids.max()) >= min(logits.shape[-1], t_logits.shape[-1]):
            raise ValueError(
                f"token id {int(ids.max())} is outside the vocabulary of the student ({logits.shape[-1]}) or the "
                f"teacher ({t_logits.shape[-1]}): preference distillation needs one tokenizer for both"
            )
        tokens = (cm[:, 1:].bool() & am[:, 1:].bool()).sum(-1)
        sums = completion_logprobs(logits, ids, cm, am)
        ref = completion_logprobs(t_logits, ids.to(t_logits.device), cm.to(t_logits.device), am.to(t_logits.device))
        ref = ref.to(sums.device)
        logps, ref_logps = sums, ref
        if cfg.average_logprobs:  # length-normalised: mean log-prob per answer token
            logps, ref_logps = sums / tokens.clamp(min=1), ref / tokens.clamp(min=1)
        pref = dpo_loss(
            logps[:n],
            logps[n:],
            ref_logps[:n],
            ref_logps[n:],
            beta=cfg.beta,
            form=cfg.loss_form,
            label_smoothing=cfg.label_smoothing,
        )
        values, weights = {"pref_loss": pref}, {"pref_loss": 1.0}
        if cfg.sft_weight:
            values["pref_sft"] = -sums[:n].sum() / tokens[:n].sum().clamp(min=1)
            weights["pref_sft"] = cfg.sft_weight
        loss = weighted_sum(values, weights, step=trainer.state.global_step, hint="Lower the learning rate.")
        loss = trainer_loss_scaling(trainer, num_items_in_batch).mean(loss)
        rewards = cfg.beta * (logps - ref_logps).detach().reshape(2, n).T  # [B, 2]: chosen, rejected
        self._log_step(model.training, values, rewards, logps.detach())
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def _log_step(self, training: bool, values: dict, rewards: torch.Tensor, logps: torch.Tensor) -> None:
        n = rewards.shape[0]
        logs = {k: v.detach() for k, v in values.items()}
        logs.update(
            pref_reward_chosen=rewards[:, 0].mean(),
            pref_reward_rejected=rewards[:, 1].mean(),
            pref_reward_margin=(rewards[:, 0] - rewards[:, 1]).mean(),
            pref_reward_accuracy=(rewards[:, 0] > rewards[:, 1]).float().mean(),
            pref_logp_chosen=logps[:n].mean(),
            pref_logp_rejected=logps[n:].mean(),
        )
        self._record(training, logs)
