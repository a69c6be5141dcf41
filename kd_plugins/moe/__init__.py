"""LLaVA-MoD for text LMs (Shu et al., ICLR 2025): a sparse-MoE student upcycled from a dense one, trained by mimic
distillation (KL to a dense teacher) and then preference distillation (DPO with the teacher as reference model).

::

    import copy
    from kd_plugins import DistillationCallback, MoEBalanceCallback, PreferenceDistillationCallback
    from kd_plugins.moe import upcycle_moe, save_moe, load_moe, PreferenceCollator
    teacher = ...                                       # the large dense model, frozen
    upcycle_moe(student, num_experts=4, top_k=2)        # exact at init: same outputs as the dense student
    Trainer(model=student, ..., callbacks=[DistillationCallback(teacher), MoEBalanceCallback()]).train()   # mimic
    Trainer(model=student, args=TrainingArguments(..., remove_unused_columns=False), train_dataset=pairs,
            data_collator=PreferenceCollator(tokenizer),
            callbacks=[PreferenceDistillationCallback(teacher), MoEBalanceCallback()]).train()          # preference
    save_moe(student, "out/moe"); student = load_moe("out/moe")

HF ``Trainer`` adapters: :mod:`kd_plugins.integrations.hf.moe`.
"""

from .config import MoEConfig, PreferenceDistillationConfig
from .io import load_moe, save_moe
from .layers import MoEContext, MoEMLP, RouterRecord, balance_term, load_fractions
from .preference import PreferenceCollator, completion_logprobs, concat_preference_batch, dpo_loss, sequence_logprobs
from .upcycle import (
    clear_router_records,
    expert_load,
    moe_balance_loss,
    moe_layers,
    moe_param_counts,
    rebuild_moe_layout,
    record_router,
    upcycle_moe,
)

#: Framework adapters live in the integration layer (a method package never imports upward).
_MOVED = {
    "MoEBalanceCallback": "kd_plugins.integrations.hf",
    "PreferenceDistillationCallback": "kd_plugins.integrations.hf",
}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(
            f"{name} is a framework adapter and lives in {_MOVED[name]}: "
            f"`from kd_plugins import {name}` (or `from {_MOVED[name]} import {name}`)."
        )
    raise AttributeError(f"module 'kd_plugins.moe' has no attribute {name!r}")


__all__ = [
    "MoEConfig",
    "PreferenceDistillationConfig",
    "upcycle_moe",
    "rebuild_moe_layout",
    "moe_layers",
    "moe_balance_loss",
    "expert_load",
    "moe_param_counts",
    "record_router",
    "clear_router_records",
    "save_moe",
    "load_moe",
    "MoEMLP",
    "MoEContext",
    "RouterRecord",
    "balance_term",
    "load_fractions",
    "PreferenceCollator",
    "completion_logprobs",
    "sequence_logprobs",
    "concat_preference_batch",
    "dpo_loss",
]
