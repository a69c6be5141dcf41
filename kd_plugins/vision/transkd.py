"""TransKD-style alignment (Liu et al., arXiv 2202.13393) for hierarchical and plain ViT students.

* **CSF** (cross selective fusion): a top-down path over the student's stage features (deepest first). Each
  stage is mapped to a mid width by a 1x1 conv, fused with the up-sampled mid feature of the deeper stage through
  selective-kernel attention (softmax over the two sources), then mapped to the teacher stage width by a 3x3 conv.
  The outputs are compared to the teacher stage features with the **HCL** loss (MSE plus MSE of 4x4, 2x2 and 1x1
  average-pooled maps weighted 1/2, 1/4, 1/8, normalised by the total weight).
* **PEA** (patch-embedding alignment): a linear map from each student patch embedding (``patch_embed`` and the
  patch-merging ``downsample`` modules of hierarchical models) to the teacher's width, MSE to the teacher's
  embedding, weights ``(0.1, 0.1, 0.5, 1.0)`` from the first embedding on.

Simplification: the SK attention's squeeze FC has no BatchNorm (so batch size 1 works).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["hcl_loss", "CrossSelectiveFusion", "find_patch_embeddings", "module_out_channels", "PEA_WEIGHTS"]

#: TransKD's patch-embedding alignment weights, first stage first.
PEA_WEIGHTS = (0.1, 0.1, 0.5, 1.0)


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor, levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss between NCHW maps of equal shape (ReviewKD/TransKD): ``MSE`` plus pooled MSEs at
    each level ``l < H`` weighted ``2**-m`` (m = 1, 2, ...), divided by the sum of the weights used."""
    if student.shape != teacher.shape:
        raise ValueError(f"hcl_loss: shapes differ {tuple(student.shape)} vs {tuple(teacher.shape)}")
    s, t = student.float(), teacher.float()
    total, wsum = F.mse_loss(s, t), 1.0
    h = s.shape[-2]
    w = 1.0
    for lvl in levels:
        if lvl >= h:
            continue
        w /= 2.0
        total = total + w * F.mse_loss(F.adaptive_avg_pool2d(s, lvl), F.adaptive_avg_pool2d(t, lvl))
        wsum += w
    return total / wsum


class _SelectiveFuse(nn.Module):
    """Selective-kernel fusion of two same-shape maps: softmax attention over the two sources per channel."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 8)
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=False))
        self.attn = nn.Linear(hidden, 2 * channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.squeeze((x + y).mean((2, 3)))
        a = self.attn(z).view(x.shape[0], 2, x.shape[1]).softmax(1)
        return a[:, 0, :, None, None] * x + a[:, 1, :, None, None] * y


class CrossSelectiveFusion(nn.Module):
    """TransKD CSF: student stage features (shallow -> deep, NCHW) -> teacher-width features (same spatial size as
    each student stage)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int = 64):
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError("CrossSelectiveFusion needs one teacher width per student stage")
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
            for c in in_channels)
        self.fuse = nn.ModuleList(_SelectiveFuse(mid_channels) for _ in in_channels[:-1])
        self.out = nn.ModuleList(
            nn.Sequential(nn.Conv2d(mid_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            for c in out_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        n = len(feats)
        outs: list = [None] * n
        prev = None
        for i in reversed(range(n)):
            m = self.lateral[i](feats[i])
            if prev is not None:
                m = self.fuse[i](m, F.interpolate(prev, size=m.shape[-2:], mode="nearest"))
            outs[i] = self.out[i](m)
            prev = m
        return outs


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


def find_patch_embeddings(model: nn.Module) -> list[str]:
    """Names of the patch-embedding modules, first stage first: ``patch_embed`` and non-identity ``downsample``
    (patch merging) modules of hierarchical transformers."""
    names = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "patch_embed" or (leaf == "downsample" and not isinstance(mod, nn.Identity)
                                     and module_out_channels(mod) is not None):
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no patch_embed/downsample modules; patch-embedding alignment "
                         "needs a transformer (ViT, DeiT, Swin, ...).")
    # stage order: patch_embed first, then downsample modules in definition order (named_modules is pre-order)
    names.sort(key=lambda n: (0 if n.endswith("patch_embed") else 1))
    return names
