"""OFA-KD (Hao et al., NeurIPS 2023) exit branches for heterogeneous (CNN <-> ViT) teacher/student pairs.

Exit branches turn intermediate student stages into class logits. Each is trained with OFA's adaptive
target-enhancement loss on the teacher's logits (:func:`kd_plugins.losses.ofa_loss`, registered as ``"ofa"``; it is
re-exported here). The final student logits get the same loss as an ordinary ``"ofa"`` logit term, and every exit
branch adds one more (weight ``ofa_branch_weight``, 1 in the paper), always next to the ordinary task loss.

:class:`OFABranchTerms` is the term provider (see :mod:`.terms`) that builds the branches and their loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.logit import OFALoss, ofa_loss
from .features import FeatureSpec, model_label, num_feature_levels, resolve_specs, to_nchw, tokens_to_grid
from .terms import TermProvider, Terms

__all__ = [
    "ofa_loss",
    "OFALoss",
    "SepConv",
    "ConvExitBranch",
    "TokenExitBranch",
    "build_exit_branch",
    "default_ofa_stages",
    "is_token_model",
    "resolve_ofa_stages",
    "OFABranchTerms",
    "tokens_to_grid",
]


# ----------------------------------------------------------------------------------------------------------------
# Exit branches
# ----------------------------------------------------------------------------------------------------------------


class SepConv(nn.Sequential):
    """Depthwise-separable down-sampling block of the OFA CNN branch (stride-2 dw3x3 -> pw1x1 -> BN -> ReLU ->
    dw3x3 -> pw1x1 -> BN -> ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2):
        super().__init__(
            nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, in_chs, 1, bias=False),
            nn.BatchNorm2d(in_chs),
            nn.ReLU(inplace=False),
            nn.Conv2d(in_chs, in_chs, 3, 1, 1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=False),
        )


class ConvExitBranch(nn.Module):
    """CNN exit branch: ``num_down`` SepConv blocks (channels double, the last reaches ``width``) or a 1x1 conv
    when ``num_down == 0``, then global average pooling and a linear classifier."""

    def __init__(self, in_chs: int, width: int, num_classes: int, num_down: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chs
        for k in range(num_down):
            out = width if k == num_down - 1 else min(c * 2, width)
            layers.append(SepConv(c, out))
            c = out
        if num_down == 0:
            layers += [nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # tokens [B, N, C] from a hook: make a square grid
            x = tokens_to_grid(x)
        x = self.body(x)
        return self.fc(x.mean((2, 3)))


class _PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm -> Linear (Swin-style), on NCHW grids (odd sides are zero-padded)."""

    def __init__(self, in_dim: int, out_dim: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C', H/2, W/2]
        h, w = x.shape[-2:]
        x = F.pad(x, (0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], 1)
        x = self.act(self.reduction(self.norm(x.permute(0, 2, 3, 1))))
        return x.permute(0, 3, 1, 2)


class TokenExitBranch(nn.Module):
    """ViT/MLP exit branch: ``num_merge`` patch-merging steps (the first maps to ``width``), ``num_blocks``
    transformer blocks, token mean, LayerNorm and a linear classifier."""

    def __init__(
        self, in_dim: int, width: int, num_classes: int, num_merge: int, num_blocks: int, num_heads: int | None = None
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        merges, c = [], in_dim
        for k in range(num_merge):
            merges.append(_PatchMerging(c, width, act=k < num_merge - 1))
            c = width
        self.merges = nn.Sequential(*merges)
        self.proj = nn.Linear(c, width) if c != width else nn.Identity()
        heads = num_heads or next(h for h in (4, 2, 1) if width % h == 0)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = tokens_to_grid(x)
        x = self.merges(x)
        x = self.proj(x.flatten(2).transpose(1, 2))  # [B, N, C]
        x = self.blocks(x)
        return self.fc(self.norm(x.mean(1)))


def is_token_model(model: nn.Module) -> bool:
    """True for attention-based (ViT, Swin, DeiT, ...) models: OFA then uses token branches."""
    return any("Attention" in type(m).__name__ for m in model.modules())


def default_ofa_stages(num_features: int, plain: bool) -> list[int]:
    """Default exit positions in ``forward_intermediates`` indices.

    Hierarchical models (CNNs, Swin): the last four feature levels. Plain ViTs: blocks after a 2-2-6-2 split
    (0-based 1, 3, 9, 11 of 12), scaled to the depth.
    """
    if num_features <= 0:
        raise ValueError("the student exposes no intermediate features")
    if not plain:
        return list(range(max(0, num_features - 4), num_features))
    idx = sorted({max(0, round(num_features * f) - 1) for f in (2 / 12, 4 / 12, 10 / 12, 12 / 12)})
    return idx


def build_exit_branch(
    kind: str,
    feature_shape: Sequence[int],
    final_shape: Sequence[int],
    *,
    num_classes: int,
    teacher_width: int,
    stage_pos: int,
    num_stages: int,
) -> nn.Module:
    """One OFA exit branch for a student feature of ``feature_shape = [C, H, W]``.

    ``final_shape`` is the student's last-stage feature shape; ``stage_pos`` (0-based) of ``num_stages`` tells how
    many stages lie above this one. The CNN branch adds one stride-2 SepConv block per halving needed to reach the
    final resolution (``4 - s`` for a ResNet stage ``s``); the token branch merges patches down to the final grid
    (plain ViTs: one merging step) and adds ``max(num_stages - 1 - stage_pos, 1)`` transformer blocks.
    """
    c, h, _ = feature_shape
    fc, fh, _ = final_shape
    remaining = num_stages - 1 - stage_pos
    if kind == "conv":
        num_down = 0
        while h > fh and num_down < 8:
            h = (h + 1) // 2
            num_down += 1
        return ConvExitBranch(c, max(fc, teacher_width), num_classes, num_down)
    if kind == "token":
        target = fh if fh < h else max(1, (h + 1) // 2)
        num_merge = 0
        while h > target and num_merge < 8:
            h = (h + 1) // 2
            num_merge += 1
        return TokenExitBranch(c, fc, num_classes, num_merge, max(remaining, 1))
    raise ValueError(f"branch kind must be 'conv' or 'token', got {kind!r}")


def resolve_ofa_stages(student: nn.Module, stages: str | Sequence[FeatureSpec] = "auto") -> list[FeatureSpec]:
    """Exit positions of the student: ``"auto"`` (:func:`default_ofa_stages`; plain ViTs are recognised by a
    single feature reduction) or explicit feature indices / module names (validated)."""
    if not isinstance(stages, str):
        return resolve_specs(student, list(stages), "student")
    if stages != "auto":
        raise ValueError(f"ofa_stages must be 'auto', a list of feature indices/module names or None; got {stages!r}")
    n = num_feature_levels(student)
    if n == 0:
        raise ValueError(
            f"student {model_label(student)} has no forward_intermediates(); pass ofa_stages as module names"
        )
    reductions = [f.get("reduction") for f in (getattr(student, "feature_info", None) or [])]
    return default_ofa_stages(n, len(set(reductions)) == 1)


class OFABranchTerms(TermProvider):
    """Term provider: OFA-KD exit branches at ``student_specs``, each trained with ``loss`` (the task's ``"ofa"``
    logit loss) against the teacher's logits. One term, ``"ofa_branches"`` (the sum over the branches), weighted by
    ``weight``.

    Args:
        loss: the OFA loss module (shared with the ``"ofa"`` logit term, so both use the same ``eps``/temperature).
        student / teacher: the plain models (the branches end in the student's classes; the CNN branch width is at
            least the teacher's ``num_features``).
        stages: ``"auto"`` or feature indices / module names (see :func:`resolve_ofa_stages`).
        weight: ``ofa_branch_weight``.
    """

    build_rank = 1
    output_key = "branch_logits"

    def __init__(
        self,
        loss: nn.Module,
        student: nn.Module,
        teacher: nn.Module,
        stages: str | Sequence[FeatureSpec] = "auto",
        weight: float = 1.0,
    ):
        self.loss, self.weight = loss, float(weight)
        self.student_specs = resolve_ofa_stages(student, stages)
        self.kind = "token" if is_token_model(student) else "conv"
        levels = num_feature_levels(student)
        self.final_spec = levels - 1 if levels else self.student_specs[-1]
        self.teacher_width = int(getattr(teacher, "num_features", 0) or 0)
        self.num_classes = int(student.num_classes)

    def build(self, student, teacher):
        # the final stage's shape when some provider reads that stage (always with "auto"), else the deepest branch's
        final = student.features.get(self.final_spec) or student.features[self.student_specs[-1]]
        return {
            "branches": nn.ModuleList(
                build_exit_branch(
                    self.kind,
                    student.features[s],
                    final,
                    num_classes=self.num_classes,
                    teacher_width=self.teacher_width or final[0],
                    stage_pos=i,
                    num_stages=len(self.student_specs),
                )
                for i, s in enumerate(self.student_specs)
            )
        }

    def student_outputs(self, modules, student):
        return {
            self.output_key: [b(to_nchw(student.features[s])) for s, b in zip(self.student_specs, modules.branches)]
        }

    def terms(self, student, teacher, labels) -> Terms:
        total = sum(self.loss(b, teacher.logits, labels=labels) for b in student[self.output_key])
        return {"ofa_branches": total}, {"ofa_branches": self.weight}
