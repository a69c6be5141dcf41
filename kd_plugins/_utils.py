"""Small model helpers shared by every layer (no framework imports)."""

from __future__ import annotations

import torch
import torch.nn as nn

#: Wrapper classes whose ``.module`` is the real model (DDP, FSDP1, accelerate, kd_plugins' ModelForward).
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "ModelForward")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate / torch.compile wrappers (not peft: its base model is the student)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in _WRAPPERS:
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter, else of the first buffer (int8 layers keep their weights as buffers); CPU for
    a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The same mapping with every tensor moved to ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
