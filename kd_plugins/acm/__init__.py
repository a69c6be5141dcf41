"""Adaptive Computation Modules (Wójcik et al., AAAI 2025): per-token adaptive MLP compute that runs faster for real.

::

    import copy
    from kd_plugins import ACMCallback
    from kd_plugins.acm import acmize, collect_block_io, stage1_distill, stage2_gates, acm_param_groups, ACMConfig
    teacher = copy.deepcopy(model)                                  # frozen original
    acmize(model, targets="mlp", num_learners=4, init="slice")      # exact at k = N
    io = collect_block_io(teacher, model, batches)                   # hooked block inputs / outputs
    stage1_distill(model, io, steps=500)                             # stage 1: learners, MSE over every prefix k
    stage2_gates(model, io, steps=300)                               # stage 2: gates, CE on error-ratio labels
    opt = torch.optim.AdamW(acm_param_groups(model, lr=1e-4, gate_lr=1e-3))  # gates: their own learning rate
    Trainer(model=model, ..., optimizers=(opt, sched),
            callbacks=[ACMCallback(teacher, ACMConfig(budget=0.5))]).train()  # stage 3
    model.eval()                                                     # sparse inference (set_acm_execution)
    save_acm(model, "out/acm"); model = load_acm("out/acm")

HF ``Trainer``: :class:`kd_plugins.integrations.hf.ACMCallback`; timm: :class:`kd_plugins.integrations.timm.ACMTask`.
"""

from .config import ACMConfig
from .convert import Candidate, acmize, find_candidates
from .io import load_acm, save_acm
from .modules import (
    ACMBlock,
    ACMGate,
    acm_blocks,
    acm_stats,
    reset_acm_stats,
    set_acm_execution,
    set_acm_mode,
    token_flops,
)
from .optim import acm_param_groups
from .stages import (
    ACMRegularizers,
    acm_regularizers,
    block_errors,
    budget_loss,
    calibrate_gate_budget,
    collect_acm_inputs,
    collect_block_io,
    distill_term,
    diversity_loss,
    entropy_loss,
    gate_labels,
    sample_fractions,
    set_recording,
    stage1_distill,
    stage2_gates,
)

#: Framework adapters live in the integration layer (a method package never imports upward).
_MOVED = {"ACMCallback": "kd_plugins.integrations.hf", "ACMTask": "kd_plugins.integrations.timm"}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(
            f"{name} is a framework adapter and lives in {_MOVED[name]}: "
            f"`from kd_plugins import {name}` (or `from {_MOVED[name]} import {name}`)."
        )
    raise AttributeError(f"module 'kd_plugins.acm' has no attribute {name!r}")


__all__ = [
    "ACMConfig",
    "acmize",
    "find_candidates",
    "Candidate",
    "save_acm",
    "load_acm",
    "ACMBlock",
    "ACMGate",
    "acm_blocks",
    "acm_stats",
    "reset_acm_stats",
    "set_acm_mode",
    "set_acm_execution",
    "token_flops",
    "collect_acm_inputs",
    "collect_block_io",
    "stage1_distill",
    "stage2_gates",
    "gate_labels",
    "block_errors",
    "sample_fractions",
    "budget_loss",
    "entropy_loss",
    "diversity_loss",
    "acm_regularizers",
    "ACMRegularizers",
    "distill_term",
    "set_recording",
    "calibrate_gate_budget",
    "acm_param_groups",
]
