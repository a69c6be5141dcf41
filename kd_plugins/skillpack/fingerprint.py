"""What a SkillPack can change in a model (:func:`model_tensors`) and which base model it belongs to
(:func:`model_fingerprint`)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: Attribute holding the apply state (base fingerprint, base values of touched tensors, applied packs) on a model.
STATE_ATTR = "_kd_skillpack_state"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and floating buffers of ``model`` by name: what a SkillPack can change."""
    out = {n: p for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        if b is not None and b.is_floating_point() and n not in out:
            out[n] = b
    return out


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the sorted names, dtypes, shapes and bytes of :func:`model_tensors`.

    A model with any changed weight, a different dtype or a different architecture gets another fingerprint. When
    SkillPacks are applied to ``model`` the fingerprint of its base weights (taken before the first pack) is kept.
    """
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        return state["base_fingerprint"]
    h = hashlib.sha256()
    for name, t in sorted(model_tensors(model).items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|{t.numel()}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
