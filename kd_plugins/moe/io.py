"""Save / load an upcycled (MoE) model: ``model.safetensors`` (the whole state dict: experts and routers included) +
``moe_config.json`` (the kd_plugins checkpoint manifest, kind ``"moe"``, with the MoE layout as metadata), written
atomically with per-tensor sha256 (:mod:`kd_plugins._checkpoint`).

Plain ``AutoModel*.from_pretrained`` would build the dense architecture and initialise its MLPs at random (the saved
tensors are the experts'): the saved ``config.json`` carries a load guard (:data:`HF_LOAD_GUARD`) that makes it
raise an error naming :func:`load_moe` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .._checkpoint import (
    CheckpointSpec,
    check_state_fits,
    read_checkpoint,
    rebuild_model,
    write_model_checkpoint,
)
from .upcycle import moe_layers, rebuild_moe_layout

__all__ = ["save_moe", "load_moe"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "moe_config.json"
#: What ``from_pretrained`` raises on a MoE checkpoint's ``config.json``
#: (:data:`kd_plugins._checkpoint.HF_LOAD_GUARD_KEY`).
HF_LOAD_GUARD = (
    "kd_plugins MoE checkpoint (upcycled experts and routers), which transformers cannot rebuild (from_pretrained "
    "would load the dense architecture with its MLPs initialised at random). Load it with "
    "`import kd_plugins; model = kd_plugins.load_moe(path)`"
)

SPEC = CheckpointSpec(
    kind="moe",
    manifest_name=CONFIG_NAME,
    tensor_file=WEIGHTS_NAME,
    description="a MoE checkpoint",
    writer="kd_plugins.save_moe",
    hf_load_guard=HF_LOAD_GUARD,
)


def save_moe(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write an upcycled ``model`` (every weight plus its MoE layout) to ``directory`` atomically.

    Nothing is left half-written if the save fails; an existing non-empty ``directory`` is replaced only with
    ``overwrite=True``. Hugging Face models also get their ``config.json`` (with the load guard) and, when given,
    the ``tokenizer`` files, so :func:`load_moe` rebuilds the model without the original checkpoint.
    """
    if not moe_layers(model) or not hasattr(model, "kd_moe"):
        raise ValueError("model has no MoE layers: call kd_plugins.upcycle_moe(model) first")
    return write_model_checkpoint(
        SPEC, directory, model, {"moe": model.kd_moe}, tokenizer=tokenizer, overwrite=overwrite
    )


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of the stored weights (the rebuilt skeleton is float32), or ``None`` if mixed."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def load_moe(directory: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Load a model written by :func:`save_moe` (in eval mode).

    ``model``: the dense architecture to rebuild the MoE layers on; by default it is created from the saved
    ``config.json``. The MoE layout is re-created (:func:`~kd_plugins.moe.upcycle.rebuild_moe_layout`) and every
    tensor is loaded (``verify``: sha256 checked), so outputs are bit-identical to the saved model's.
    """
    ckpt = read_checkpoint(SPEC, directory, verify=verify)
    layout = ckpt.metadata["moe"]
    if model is None:
        model = rebuild_model(ckpt.architecture or {}, ckpt.directory)
        dtype = _stored_dtype(ckpt.tensors)
        if dtype is not None:
            model.to(dtype)
    if moe_layers(model):
        raise ValueError("model already has MoE layers; pass the dense architecture (or nothing) to load_moe")
    rebuild_moe_layout(model, layout)
    flat = ckpt.state_dict()
    check_state_fits(model, flat, "MoE")
    model.load_state_dict(flat, strict=True)
    model.eval()
    return model
