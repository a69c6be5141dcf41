"""Intermediate features of timm models: ``forward_intermediates()`` where the model has it, forward hooks on named
modules otherwise (or when a module name is asked for), shape probing (:func:`probe_shapes`), plus layout/spatial
alignment helpers.

Feature specs are either an ``int`` (a ``forward_intermediates`` index = a position in ``model.feature_info``,
negative counts from the end) or a ``str`` (a dotted module name, captured with a temporary forward hook).
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FeatureSpec = int | str

__all__ = [
    "FeatureSpec",
    "ModelFeatures",
    "FeatureShapes",
    "num_feature_levels",
    "describe_feature_levels",
    "resolve_specs",
    "capture_modules",
    "forward_with_features",
    "probe_shapes",
    "default_input_size",
    "as_hw",
    "to_nchw",
    "tokens_to_grid",
    "align_spatial",
    "parse_spec",
    "model_label",
    "channel_project",
    "module_out_channels",
    "resize_to",
]


class ModelFeatures(NamedTuple):
    """One forward pass of a model: final ``logits``, ``features`` by spec and ``captured`` module outputs by name
    (as returned by the model, not yet brought to NCHW)."""

    logits: torch.Tensor
    features: dict
    captured: dict


class FeatureShapes(NamedTuple):
    """NCHW ``[C, H, W]`` shapes of a model's ``features`` (by spec) and ``captured`` module outputs (by name)."""

    features: dict
    captured: dict


def model_label(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def num_feature_levels(model: nn.Module) -> int:
    """Number of ``forward_intermediates`` levels (0 when the model has no ``forward_intermediates``)."""
    if not hasattr(model, "forward_intermediates"):
        return 0
    info = getattr(model, "feature_info", None)
    if info:
        return len(info)
    blocks = getattr(model, "blocks", None) or getattr(model, "stages", None) or getattr(model, "layers", None)
    return len(blocks) if blocks is not None else 0


def describe_feature_levels(model: nn.Module) -> str:
    info = getattr(model, "feature_info", None) or []
    return (
        ", ".join(f"{i}: {f.get('module')} ({f.get('num_chs')} ch, /{f.get('reduction')})" for i, f in enumerate(info))
        or "none"
    )


def parse_spec(value) -> FeatureSpec:
    """``"3"``/``"-1"`` -> int, anything else stays a module name."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        return text


def resolve_specs(model: nn.Module, specs: Iterable[FeatureSpec], role: str) -> list[FeatureSpec]:
    """Validate feature specs against ``model``; ints become non-negative. Raises ``ValueError`` with the valid
    range (or close module names) otherwise."""
    out: list[FeatureSpec] = []
    n = num_feature_levels(model)
    names = None
    for spec in specs:
        spec = parse_spec(spec)
        if isinstance(spec, int):
            if n == 0:
                raise ValueError(
                    f"{role} {model_label(model)} has no forward_intermediates(); name modules instead of indices "
                    f"(e.g. feature_pairs={{'layer3': 'layer3'}})."
                )
            if not -n <= spec < n:
                raise ValueError(
                    f"{role} feature index {spec} is out of range: {model_label(model)} has {n} feature levels "
                    f"(indices 0..{n - 1} or -{n}..-1): {describe_feature_levels(model)}."
                )
            out.append(spec % n)
        else:
            try:
                model.get_submodule(spec)
            except AttributeError:
                names = names or [k for k, _ in model.named_modules() if k]
                close = difflib.get_close_matches(spec, names, n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"{role} {model_label(model)} has no module named {spec!r}.{hint}") from None
            out.append(spec)
    return out


@contextlib.contextmanager
def capture_modules(model: nn.Module, names: Sequence[str]):
    """Temporarily hook ``names``; yields a dict filled with each module's (first tensor) output."""
    rec: dict[str, torch.Tensor] = {}
    handles = []

    def make(name):
        def hook(_m, _inp, out):
            if isinstance(out, (tuple, list)):
                out = next(o for o in out if torch.is_tensor(o))
            elif isinstance(out, dict):
                out = next(o for o in out.values() if torch.is_tensor(o))
            rec[name] = out

        return hook

    try:
        for name in dict.fromkeys(names):
            handles.append(model.get_submodule(name).register_forward_hook(make(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()


def forward_with_features(
    model: nn.Module, x: torch.Tensor, specs: Sequence[FeatureSpec], extra_modules: Sequence[str] = ()
) -> ModelFeatures:
    """One forward pass returning ``ModelFeatures(logits, {spec: feature}, {module_name: output})``.

    Integer specs come from ``forward_intermediates(x, indices, intermediates_only=False)`` followed by
    ``forward_head``; string specs and ``extra_modules`` from temporary forward hooks.
    """
    idx = sorted({s for s in specs if isinstance(s, int)})
    hook_names = [s for s in specs if isinstance(s, str)] + list(extra_modules)
    feats: dict = {}
    with capture_modules(model, hook_names) as rec:
        if idx:
            final, inter = model.forward_intermediates(x, indices=idx, intermediates_only=False)
            logits = model.forward_head(final)
            feats.update(zip(idx, inter))
        else:
            logits = model(x)
    for s in specs:
        if isinstance(s, str):
            feats[s] = rec[s]
    return ModelFeatures(logits, feats, {n: rec[n] for n in extra_modules})


def as_hw(size) -> tuple | None:
    """``224`` / ``(3, 224, 224)`` / ``(224, 224)`` -> ``(224, 224)``; ``None`` stays ``None``."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return size[-2:]


def default_input_size(model: nn.Module) -> tuple:
    """``(H, W)`` the model was built for: its patch embedding's ``img_size``, else ``pretrained_cfg``, else 224."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return as_hw(pe.img_size)
    return as_hw((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))


@torch.no_grad()
def probe_shapes(
    model: nn.Module, specs: Sequence[FeatureSpec], captures: Sequence[str], size: Sequence[int]
) -> FeatureShapes:
    """One eval-mode forward on zeros of ``size = (H, W)`` to learn the NCHW shapes ``[C, H, W]`` of ``specs`` and
    of the ``captures`` module outputs (the training mode is restored)."""
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, getattr(model, "in_chans", 3), *size, device=p.device, dtype=p.dtype)
        _, feats, captured = forward_with_features(model, x, list(dict.fromkeys(specs)), captures)
    finally:
        model.train(was)
    shapes = {}
    for s, f in feats.items():
        ch = module_out_channels(model.get_submodule(s)) if isinstance(s, str) else None
        shapes[s] = tuple(to_nchw(f, ch).shape[1:])
    captured_shapes = {
        n: tuple(to_nchw(f, module_out_channels(model.get_submodule(n))).shape[1:]) for n, f in captured.items()
    }
    return FeatureShapes(shapes, captured_shapes)


def module_out_channels(module: nn.Module) -> int | None:
    """Output width of a patch-embedding-like module: its last ``Linear``/``Conv2d``/``LayerNorm``."""
    width = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.LayerNorm):
            width = m.normalized_shape[0]
    return width


def to_nchw(x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """Bring a feature to ``[B, C, H, W]``: tokens ``[B, N, C]`` become a square grid (prefix tokens dropped),
    pooled ``[B, C]`` becomes ``[B, C, 1, 1]``, NHWC (``x.shape[-1] == channels != x.shape[1]``) is permuted."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return tokens_to_grid(x)
    if x.dim() == 4:
        if channels is not None and x.shape[-1] == channels and x.shape[1] != channels:
            return x.permute(0, 3, 1, 2)
        return x
    raise ValueError(f"unsupported feature shape {tuple(x.shape)}")


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` patch tokens -> ``[B, C, s, s]``; drops leading prefix tokens when ``N`` is ``s*s + k``."""
    n = x.shape[1]
    s = int(math.isqrt(n))
    while s * s > n:
        s -= 1
    if s == 0:
        raise ValueError(f"cannot arrange {n} tokens on a square grid")
    x = x[:, n - s * s :]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], s, s)


def align_spatial(s: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an NCHW student feature to the teacher's ``(H, W)``: average pooling when shrinking by an integer
    factor, bilinear interpolation otherwise."""
    h, w = s.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return s
    if h >= th and w >= tw and h % th == 0 and w % tw == 0:
        return F.adaptive_avg_pool2d(s, (th, tw))
    return F.interpolate(s, size=(th, tw), mode="bilinear", align_corners=False)


def channel_project(proj: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Apply a ``[..., C_s] -> [..., C_t]`` projector (e.g. ``FeatureProjector``) over the channels of NCHW ``x``."""
    if proj is None:
        return x
    return proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def resize_to(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` bilinearly resized to ``size`` (unchanged when ``None`` or already that size)."""
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x
