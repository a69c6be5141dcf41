"""Adaptive Computation Modules (Wójcik et al., AAAI 2025): per-token adaptive MLP compute that runs faster for real.

::

    import copy
    from kd_plugins.acm import acmize, collect_block_io, stage1_distill, stage2_gates, ACMCallback, ACMConfig
    teacher = copy.deepcopy(model)                                  # frozen original
    acmize(model, targets="mlp", num_learners=4, init="slice")      # exact at k = N
    io = collect_block_io(teacher, model, batches)                   # hooked block inputs / outputs
    stage1_distill(model, io, steps=500)                             # stage 1: learners, MSE over every prefix k
    stage2_gates(model, io, steps=300)                               # stage 2: gates, CE on error-ratio labels
    Trainer(model=model, ..., callbacks=[ACMCallback(ACMConfig(budget=0.5), teacher=teacher)]).train()  # stage 3
    model.eval()                                                     # grouped sparse inference per token
    save_acm(model, "out/acm"); model = load_acm("out/acm")

timm: :class:`kd_plugins.acm.timm_task.ACMTask`.
"""

from .config import ACMConfig
from .convert import Candidate, acmize, find_candidates
from .io import load_acm, save_acm
from .modules import ACMBlock, ACMGate, acm_blocks, acm_stats, reset_acm_stats, set_acm_mode, token_flops
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


def __getattr__(name):
    if name == "ACMCallback":  # imports transformers.Trainer (slow): load on first use
        from .hf import ACMCallback

        return ACMCallback
    if name == "ACMTask":
        from .timm_task import ACMTask

        return ACMTask
    raise AttributeError(f"module 'kd_plugins.acm' has no attribute {name!r}")


__all__ = [
    "ACMConfig", "acmize", "find_candidates", "Candidate", "save_acm", "load_acm", "ACMBlock", "ACMGate",
    "acm_blocks", "acm_stats", "reset_acm_stats", "set_acm_mode", "token_flops", "collect_acm_inputs",
    "collect_block_io", "stage1_distill", "stage2_gates", "gate_labels", "block_errors", "sample_fractions",
    "budget_loss",
    "entropy_loss", "diversity_loss", "acm_regularizers", "ACMRegularizers", "distill_term", "set_recording",
    "calibrate_gate_budget",
    "ACMCallback", "ACMTask",
]
