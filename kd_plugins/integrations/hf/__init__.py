"""Hugging Face ``Trainer`` adapters: one callback per capability, all with the signature
``<Capability>Callback(teacher=None, config=None, **overrides)`` (the distillation callback requires its teacher),
plus the drop-in :class:`DistillationTrainer`."""

from ._trainer import TrainerPluginCallback, patch_trainer, trainer_loss_scaling
from .acm import ACMCallback
from .distill import DistillationCallback, DistillationTrainer, load_teacher
from .had import HADCallback
from .moe import MoEBalanceCallback, PreferenceDistillationCallback
from .multiexit import MultiExitCallback
from .sparseft import SparseFTCallback, lottery_ticket_sparse_finetune
from .speculative import DraftEvalCallback
from .wad import WADCallback

__all__ = [
    "DistillationCallback",
    "DistillationTrainer",
    "ACMCallback",
    "MultiExitCallback",
    "MoEBalanceCallback",
    "PreferenceDistillationCallback",
    "SparseFTCallback",
    "lottery_ticket_sparse_finetune",
    "DraftEvalCallback",
    "WADCallback",
    "HADCallback",
    "load_teacher",
    "TrainerPluginCallback",
    "patch_trainer",
    "trainer_loss_scaling",
]
