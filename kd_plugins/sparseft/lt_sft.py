"""Lottery-ticket sparse fine-tuning (LT-SFT; Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer", ACL 2022; the language- and task-adaptation step of BiStil, Ansell et al., "Distilling Efficient
Language-Specific Models for Cross-Lingual Transfer", Findings of ACL 2023), without any training framework.

With pretrained weights ``theta_0`` over N participating entries and density d (K = round(d N)):

1. **Phase A**, full fine-tune: train every parameter from ``theta_0`` to ``theta_1`` (your own loop or Trainer).
2. **Select**: keep the K entries with the largest ``|theta_1 - theta_0|`` (:func:`select_mask`; one top-K over all
   participating entries by default, ``allocation="per_tensor"`` for the same density in every tensor;
   ``selection="random"`` draws K uniformly instead, the paper's random baseline, which needs no phase A).
3. **Reset** the model to ``theta_0`` (phase A's weights are discarded; only the mask is kept).
4. **Phase B**, sparse fine-tune: train again from ``theta_0``, updating only the K selected entries (the mask is
   applied to the *update*, not just the gradient: :class:`~kd_plugins.sparseft.SparseUpdate`).
5. The result is the sparse difference ``phi = theta_2 - theta_0``, nonzero on at most K entries:
   a :class:`~kd_plugins.sparseft.SparseDiff` (``SparseDiff.from_update(update)``), applied by addition and
   composed by addition (``language_sft + task_sft``).

::

    base = copy.deepcopy(model).state_dict()              # theta_0
    train(model)                                            # phase A
    mask = select_mask(base, model.state_dict(), density=0.05)
    model.load_state_dict(base)                             # reset
    with apply_sparse_update(model, mask) as update:        # phase B
        train(model, step=update.step)                      # optimizer.step() -> update.step(optimizer)
        diff = SparseDiff.from_update(update)

LT-SFT's released code may repeat select + sparse phase (``n_ft_iterations``); one iteration, the setting of both
papers' experiments, is what this module implements.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .._config import resolve_config
from .config import SparseFTConfig
from .mask import SparseMask
from .select import count_for, split_targets, top_k_masks, unique_floating

__all__ = ["select_mask", "as_state"]


def as_state(obj: nn.Module | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """A name -> tensor mapping of floating-point tensors, each storage once: a model's ``named_parameters()`` or the
    given state dict."""
    if isinstance(obj, nn.Module):
        return dict(obj.named_parameters())
    if isinstance(obj, Mapping):
        return unique_floating(obj)
    raise TypeError(f"{what} must be an nn.Module or a state dict (name -> tensor), got {type(obj).__name__}")


def check_same_tensors(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """Raise a ``ValueError`` naming the tensors ``tuned`` lacks or whose shape differs from ``base``."""
    missing = [n for n in names if n not in tuned]
    if missing:
        raise ValueError(
            f"the tuned model has no tensor {missing[:5]} ({len(missing)} missing): base and tuned must share one "
            "architecture (same parameter names)"
        )
    bad = [
        f"{n}: base {tuple(base[n].shape)}, tuned {tuple(tuned[n].shape)}"
        for n in names
        if base[n].shape != tuned[n].shape
    ]
    if bad:
        raise ValueError("base and tuned tensors differ in shape: " + "; ".join(bad[:5]))


def _scores(base, tuned, names: list[str], config: SparseFTConfig) -> dict[str, torch.Tensor]:
    if config.selection == "random":
        gen = torch.Generator().manual_seed(config.seed)
        return {n: torch.rand(tuple(base[n].shape), generator=gen) for n in names}
    if tuned is None:
        raise ValueError(
            "selection='magnitude_of_change' needs the fully fine-tuned weights (phase A): pass tuned_state, or use "
            "selection='random'"
        )
    check_same_tensors(base, tuned, names)
    with torch.no_grad():
        return {n: (tuned[n].detach().float().cpu() - base[n].detach().float().cpu()).abs() for n in names}


def select_mask(
    base_state: nn.Module | Mapping[str, torch.Tensor],
    tuned_state: nn.Module | Mapping[str, torch.Tensor] | None = None,
    config: SparseFTConfig | None = None,
    **overrides,
) -> SparseMask:
    """The LT-SFT mask: the K = round(density * N) participating entries that moved most from ``base_state`` to
    ``tuned_state`` (or K random ones with ``selection="random"``, where ``tuned_state`` may be ``None``).

    ``base_state`` / ``tuned_state`` are models (their parameters) or state dicts (their floating-point tensors,
    tied ones once). Ties at the K-th value are broken by model order, so exactly K entries are selected. Tensors
    of ``dense_targets`` are selected whole. Raises ``ValueError`` for missing / reshaped tensors, non-finite
    weights or targets that match nothing; ``TypeError`` for an unknown override.
    """
    cfg = resolve_config(SparseFTConfig, config, overrides)
    base = as_state(base_state, "base_state")
    tuned = None if tuned_state is None else as_state(tuned_state, "tuned_state")
    sparse, dense = split_targets(list(base), cfg)
    scores = _scores(base, tuned, sparse, cfg)
    if cfg.allocation == "global":
        masks = top_k_masks(scores, count_for(cfg.density, sum(s.numel() for s in scores.values())))
    else:
        masks = {}
        for n, s in scores.items():
            masks[n] = top_k_masks({n: s}, count_for(cfg.density, s.numel()))[n] if s.numel() else s.bool()
    for n in dense:
        masks[n] = torch.ones(tuple(base[n].shape), dtype=torch.bool)
    return SparseMask({n: masks[n] for n in base if n in masks}, tuple(dense))
