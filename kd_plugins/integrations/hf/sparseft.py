"""Lottery-ticket sparse fine-tuning (LT-SFT) inside an unmodified ``transformers.Trainer``: two Trainer runs.

::

    from kd_plugins import SparseFTCallback
    base = copy.deepcopy(model.state_dict())                                  # optional: only to check
    select = SparseFTCallback(None, density=0.05)                             # phase A: full fine-tune, then select
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[select]).train()
    # the model is back at its pretrained weights; select.mask holds the K entries that moved most
    sparse = SparseFTCallback(select.mask)                                    # phase B: only those entries train
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[sparse]).train()
    sparse.diff.save("sft/task")                                              # the SparseDiff theta_2 - theta_0

``lottery_ticket_sparse_finetune(trainer_factory)`` runs both. Where the masking happens in the Trainer's step
(transformers 5.x: backward per micro-batch, then ``clip_grad_norm``, ``on_pre_optimizer_step``,
``optimizer.step()``, ``on_optimizer_step``, scheduler, ``zero_grad``):

* gradient hooks, registered when the callback attaches, zero the frozen entries of each micro-batch's gradient as
  backward computes it, so the norm that ``max_grad_norm`` clips is the norm of the sparse gradient and AdamW's
  moments stay zero on frozen entries. (``on_pre_optimizer_step`` fires *after* clipping, so zeroing there alone
  would clip the trainable entries by a norm that counts the frozen ones; it zeroes once more, for gradients written
  by other means.)
* ``on_optimizer_step`` writes the frozen entries back from a snapshot: AdamW's decoupled weight decay moves every
  entry it holds, gradient or not.
* Parameters with no trainable entry get ``requires_grad=False`` while the callback is attached when it attaches
  before the optimizer exists (``callbacks=[...]`` at construction): no gradient, no optimizer state.

Logged at every training log: ``sparseft_trainable`` (entries that train) and ``sparseft_density`` (trainable
fraction of all parameter entries). Multi-GPU: DDP is meant to work (identical masks on every rank, hooks run before
the all-reduce) but is untested; FSDP and DeepSpeed shard or flatten the parameters and are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import Trainer

from ..._config import resolve_config
from ..._utils import unwrap_model
from ...sparseft.config import SparseFTConfig
from ...sparseft.diff import SparseDiff
from ...sparseft.lt_sft import select_mask
from ...sparseft.mask import SparseMask, SparseUpdate
from ._trainer import TrainerPluginCallback, find_resume_dir, patch_trainer

__all__ = ["SparseFTCallback", "lottery_ticket_sparse_finetune"]

logger = logging.getLogger(__name__)


class SparseFTCallback(TrainerPluginCallback):
    """Sparse fine-tuning for any ``transformers.Trainer``.

    Args:
        mask_or_diff: a :class:`~kd_plugins.sparseft.SparseMask` or a :class:`~kd_plugins.sparseft.SparseDiff`
            (its entries): phase B, only those entries train and ``callback.diff`` holds their change when training
            ends. ``None``: phase A, the model trains in full; when training ends ``callback.mask`` holds the
            selection of ``config`` (LT-SFT: the ``density`` of entries that moved most) and, with
            ``reset_after_selection`` (default), the model is reset to its weights at the start of training.
        config: a :class:`~kd_plugins.sparseft.SparseFTConfig`.
        **overrides: ``SparseFTConfig`` fields that replace those of ``config``.
    """

    def __init__(
        self, mask_or_diff: SparseMask | SparseDiff | None = None, config: SparseFTConfig | None = None, **overrides
    ):
        if isinstance(mask_or_diff, SparseFTConfig):
            raise TypeError(
                "SparseFTCallback(mask_or_diff=None, config=None, **overrides): the mask (or diff, or None for phase "
                "A) comes first; pass the config as config=SparseFTConfig(...)."
            )
        if isinstance(mask_or_diff, SparseDiff):
            mask_or_diff = mask_or_diff.mask()
        if mask_or_diff is not None and not isinstance(mask_or_diff, SparseMask):
            raise TypeError(f"mask_or_diff must be a SparseMask, a SparseDiff or None, got {type(mask_or_diff)}")
        self.config = resolve_config(SparseFTConfig, config, overrides)
        self.mask: SparseMask | None = mask_or_diff
        self.phase = "select" if mask_or_diff is None else "sparse"
        self.update: SparseUpdate | None = None
        self.diff: SparseDiff | None = None
        self.base_state: dict[str, torch.Tensor] | None = None
        self.trainer: Trainer | None = None
        self._logged: dict[str, float] = {}

    def _attach(self, trainer: Trainer) -> None:
        for flag, what in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
            if getattr(trainer, flag, False):
                raise NotImplementedError(
                    f"SparseFTCallback does not support {what}: it shards or flattens the parameters the masks are "
                    "shaped like; use DDP or a single device"
                )
        self.trainer = trainer
        if self.phase == "sparse":
            # before the optimizer exists, untouched parameters can leave it (requires_grad=False)
            self.update = SparseUpdate(
                unwrap_model(trainer.model), self.mask, freeze_untouched=trainer.optimizer is None
            ).attach()
            total = sum(p.numel() for p in unwrap_model(trainer.model).parameters())
            self._logged = {
                "sparseft_trainable": float(self.update.num_trainable),
                "sparseft_density": round(self.update.num_trainable / max(total, 1), 6),
            }
        patch_trainer(trainer, logs_fn=self._add_logs)

    def _add_logs(self, logs: dict) -> None:
        if "loss" in logs:
            logs.update(self._logged)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._ensure_attached()
        model = unwrap_model(trainer.model)
        if self.phase == "sparse":
            if not self.update.attached:  # a second train() call
                self.update = SparseUpdate(model, self.mask, freeze_untouched=False).attach()
            self.update.snapshot()  # the weights as training starts (after any checkpoint load / device move)
            return
        if find_resume_dir() is not None:
            raise ValueError(
                "SparseFTCallback(None) (phase A) measures the change from the weights at the start of training; "
                "resuming would measure it from the checkpoint. Restart phase A, or select the mask yourself with "
                "kd_plugins.sparseft.select_mask(base_state, model)"
            )
        with torch.no_grad():
            self.base_state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.update is not None:
            self.update.zero_frozen_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.update is not None:
            self.update.restore()

    def on_train_end(self, args, state, control, **kwargs):
        model = unwrap_model(self.trainer.model)
        if self.phase == "sparse":
            self.diff = SparseDiff.from_update(self.update, info={"selection": "given mask"})
            self.update.detach()
            logger.info("sparse fine-tuning done: %s", self.diff.summary())
            return
        self.mask = select_mask(self.base_state, model, self.config)
        logger.info("LT-SFT phase A done: %r", self.mask)
        if self.config.reset_after_selection:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(self.base_state[n])
        self.base_state = None


def lottery_ticket_sparse_finetune(
    trainer_factory: Callable[[SparseFTCallback, str], Trainer], config: SparseFTConfig | None = None, **overrides
) -> SparseDiff:
    """Both LT-SFT phases with two Trainer runs; returns phase B's :class:`~kd_plugins.sparseft.SparseDiff`.

    ``trainer_factory(callback, phase)`` builds a Trainer with ``callback`` among its callbacks, for ``phase`` =
    ``"full"`` (phase A) then ``"sparse"`` (phase B). Both Trainers must train the same model object (phase A resets
    it to its starting weights, from which phase B starts); the factory may give the phases different arguments
    (steps, learning rate).
    """
    select = SparseFTCallback(None, config, **overrides)
    trainer_factory(select, "full").train()
    sparse = SparseFTCallback(select.mask, select.config)
    trainer_factory(sparse, "sparse").train()
    return sparse.diff
