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

Term providers (see :mod:`.terms`): :class:`CSFTerms` (CSF + HCL on the feature pairs) and
:class:`PatchEmbedTerms` (PEA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import FeatureProjector
from .features import align_spatial, channel_project, module_out_channels, to_nchw
from .terms import FeaturePairTerms, TermProvider, Terms

__all__ = [
    "hcl_loss",
    "CrossSelectiveFusion",
    "find_patch_embeddings",
    "module_out_channels",
    "PEA_WEIGHTS",
    "CSFTerms",
    "PatchEmbedTerms",
]

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
            nn.Sequential(nn.Conv2d(c, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)) for c in in_channels
        )
        self.fuse = nn.ModuleList(_SelectiveFuse(mid_channels) for _ in in_channels[:-1])
        self.out = nn.ModuleList(
            nn.Sequential(nn.Conv2d(mid_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)) for c in out_channels
        )

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


def find_patch_embeddings(model: nn.Module) -> list[str]:
    """Names of the patch-embedding modules, first stage first: ``patch_embed`` and non-identity ``downsample``
    (patch merging) modules of hierarchical transformers."""
    names = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "patch_embed" or (
            leaf == "downsample" and not isinstance(mod, nn.Identity) and module_out_channels(mod) is not None
        ):
            names.append(name)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no patch_embed/downsample modules; patch-embedding alignment "
            "needs a transformer (ViT, DeiT, Swin, ...)."
        )
    # stage order: patch_embed first, then downsample modules in definition order (named_modules is pre-order)
    names.sort(key=lambda n: 0 if n.endswith("patch_embed") else 1)
    return names


class CSFTerms(FeaturePairTerms):
    """Term provider: the feature pairs of :class:`~.terms.FeaturePairTerms` through TransKD's cross selective
    fusion (one :class:`CrossSelectiveFusion` over all paired student stages, ``mid_channels`` wide), every
    ``hidden`` loss term computed as the :func:`hcl_loss` averaged over the pairs."""

    def __init__(self, config, student: nn.Module, teacher: nn.Module, mid_channels: int = 64):
        super().__init__(config, student, teacher)
        self.mid_channels = mid_channels

    def build(self, student, teacher):
        self.student_channels = [student.features[s][0] for s in self.student_specs]
        t_channels = [teacher.features[t][0] for t in self.teacher_specs]
        return {"csf": CrossSelectiveFusion(self.student_channels, t_channels, self.mid_channels)}

    def student_outputs(self, modules, student):
        return {self.output_key: modules.csf(self.student_maps(student))}

    def pair_loss(self, name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return hcl_loss(s, t)


class PatchEmbedTerms(TermProvider):
    """Term provider: TransKD patch-embedding alignment. The first ``k`` patch embeddings of both models
    (:func:`find_patch_embeddings`, ``k`` = the smaller count) are captured. The student's are projected to the
    teacher's widths by linear projectors, resized to the teacher's grid and compared by MSE with ``stage_weights``
    (1 past their end). One term, ``"patch_embed"``, weighted by ``weight``."""

    build_rank = 2
    output_key = "patch_embeds"

    def __init__(
        self, student: nn.Module, teacher: nn.Module, weight: float, stage_weights: Sequence[float] = PEA_WEIGHTS
    ):
        s_all, t_all = find_patch_embeddings(student), find_patch_embeddings(teacher)
        k = min(len(s_all), len(t_all))
        self.student_captures, self.teacher_captures = s_all[:k], t_all[:k]
        self.weight = float(weight)
        self.stage_weights = [float(stage_weights[i]) if i < len(stage_weights) else 1.0 for i in range(k)]
        self.student_channels: list[int] = []
        self.teacher_channels: list[int] = []

    def build(self, student, teacher):
        self.student_channels = [student.captured[n][0] for n in self.student_captures]
        self.teacher_channels = [teacher.captured[n][0] for n in self.teacher_captures]
        return {
            "pe_projectors": nn.ModuleList(
                nn.Identity() if a == b else FeatureProjector(a, b)
                for a, b in zip(self.student_channels, self.teacher_channels)
            )
        }

    def student_outputs(self, modules, student):
        return {
            self.output_key: [
                channel_project(p, to_nchw(student.captured[n], c))
                for n, c, p in zip(self.student_captures, self.student_channels, modules.pe_projectors)
            ]
        }

    def terms(self, student, teacher, labels) -> Terms:
        vals = []
        for s, n, c, w in zip(
            student[self.output_key], self.teacher_captures, self.teacher_channels, self.stage_weights
        ):
            t = to_nchw(teacher.captured[n], c).to(s.dtype)
            vals.append(w * F.mse_loss(align_spatial(s, t.shape[-2:]), t))
        return {"patch_embed": sum(vals)}, {"patch_embed": self.weight}
