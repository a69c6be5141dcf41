"""Save / load an ACMized model: ``model.safetensors`` (the whole state dict) + ``acm_config.json`` (the kd_plugins
checkpoint manifest, kind ``"acm"``, with the ACM layout as metadata), written atomically
(:mod:`kd_plugins._checkpoint`). Checkpoints written before the common manifest (``format: "kd_plugins.acm"``) still
load.

Plain ``AutoModel*.from_pretrained`` cannot rebuild the ACM layers (it would initialise them at random): the saved
``config.json`` carries a load guard (:data:`HF_LOAD_GUARD`) that makes it raise an error naming :func:`load_acm`."""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from .._checkpoint import (
    CheckpointSpec,
    check_state_fits,
    read_checkpoint,
    rebuild_model,
    write_model_checkpoint,
)
from .convert import rebuild_layout
from .modules import acm_blocks

__all__ = ["save_acm", "load_acm"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "acm_config.json"
#: ``format`` of the manifests written before the common checkpoint manifest.
FORMAT = "kd_plugins.acm"
#: What ``from_pretrained`` raises on an ACM checkpoint's ``config.json``
#: (:data:`kd_plugins._checkpoint.HF_LOAD_GUARD_KEY`).
HF_LOAD_GUARD = (
    "kd_plugins ACM checkpoint, which transformers cannot rebuild (from_pretrained would initialise its ACM layers at "
    "random). Load it with `import kd_plugins; model = kd_plugins.acm.load_acm(path)`"
)

SPEC = CheckpointSpec(
    kind="acm",
    manifest_name=CONFIG_NAME,
    tensor_file=WEIGHTS_NAME,
    description="an ACM checkpoint",
    writer="kd_plugins.acm.save_acm",
    legacy_format=FORMAT,
    hf_load_guard=HF_LOAD_GUARD,
)


def save_acm(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    build_kwargs: dict | None = None,
) -> Path:
    """Write an ACMized ``model`` (all weights, gates included, plus its ACM layout) to ``out_dir`` atomically.

    Nothing is left half-written if the save fails; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``. HF models also get their ``config.json`` (and ``tokenizer`` files when given), so
    :func:`load_acm` can rebuild the architecture without the original checkpoint; timm models record their
    ``architecture`` name and ``build_kwargs`` (``num_classes`` automatically).
    """
    if not acm_blocks(model) or not hasattr(model, "kd_acm"):
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    return write_model_checkpoint(
        SPEC, out_dir, model, {"acm": model.kd_acm}, tokenizer=tokenizer, build_kwargs=build_kwargs, overwrite=overwrite
    )


def load_acm(path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True) -> nn.Module:
    """Load a model written by :func:`save_acm`.

    ``model``: the original dense architecture to rebuild the ACMs on (e.g. ``AutoModel.from_pretrained(...)``);
    by default it is created from the saved ``config.json`` (HF) or timm architecture name. The ACM layout is
    re-created with :func:`~kd_plugins.acm.acmize`'s block builder and every tensor is loaded (``verify``: sha256
    checked). A model with another layout raises an error naming the mismatching blocks / tensors.
    """
    ckpt = read_checkpoint(SPEC, path, verify=verify)
    layout = ckpt.metadata["acm"]
    if model is None:
        model = rebuild_model(ckpt.architecture or {}, ckpt.directory)
    if acm_blocks(model):
        if getattr(model, "kd_acm", {}).get("blocks", {}) != layout["blocks"]:
            raise ValueError(
                "model is already ACMized with another layout than the checkpoint; pass the original "
                "dense model to load_acm"
            )
    else:
        rebuild_layout(model, layout)
    flat = ckpt.state_dict()
    check_state_fits(model, flat, "ACM")
    model.load_state_dict(flat, strict=True)
    model.eval()
    return model
