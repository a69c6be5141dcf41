"""Sparse fine-tuning (LT-SFT, Ansell et al. 2022; the adaptation step of BiStil, Ansell et al. 2023): train a small
set of a model's entries, chosen as those that moved most in a full fine-tune, and keep the result as a sparse,
composable difference.

    from kd_plugins.sparseft import SparseDiff, apply_sparse_update, select_mask
    mask = select_mask(base_state, tuned_state, density=0.05)   # phase A's top-K moved entries
    with apply_sparse_update(model, mask) as update:             # phase B: only those entries move
        ...  # your loop, with update.step(optimizer) in place of optimizer.step()
        diff = SparseDiff.from_update(update)
    diff.save("sft/task")

Hugging Face Trainer: :class:`kd_plugins.integrations.hf.SparseFTCallback`. See docs/sparseft.md.
"""

from .config import DEFAULT_DENSITY, SparseFTConfig
from .diff import SparseDiff, load_sparse_diff, save_sparse_diff
from .lt_sft import select_mask
from .mask import SparseMask, SparseUpdate, apply_sparse_update

__all__ = [
    "SparseFTConfig",
    "DEFAULT_DENSITY",
    "SparseDiff",
    "SparseMask",
    "SparseUpdate",
    "apply_sparse_update",
    "select_mask",
    "save_sparse_diff",
    "load_sparse_diff",
]
