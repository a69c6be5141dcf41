"""OFA-KD (Hao et al., NeurIPS 2023): exit branches that turn intermediate student stages into class logits, and
the adaptive target-enhancement loss, for heterogeneous (CNN <-> ViT) teacher/student pairs.

The loss (repository form) with teacher probabilities ``p = softmax(t / T)``, student ``q = softmax(z / T)``,
target class ``y`` and exponent ``eps`` (the paper's gamma)::

    l_OFA(z) = - sum_c w_c log q_c,   w_y = (1 + p_y) ** eps - 1,   w_c = p_c ** eps  (c != y)

With ``eps = 1`` it is the plain soft-target cross-entropy; larger ``eps`` amplifies the target class when the
teacher is confident. The task uses it on the final student logits (weight of the ``"ofa"`` loss term) and on
every exit branch (``ofa_branch_weight``, 1 in the paper), always next to the ordinary task loss.

Registered as ``get_loss("ofa", eps=..., temperature=...)`` (kind ``"logits"``; needs labels).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses._common import IGNORE_INDEX, compute_dtype, reduce_rows, rows, valid_mask
from ..losses.registry import _REGISTRY, register_loss

__all__ = ["ofa_loss", "OFALoss", "SepConv", "ConvExitBranch", "TokenExitBranch", "build_exit_branch",
           "default_ofa_stages", "is_token_model"]


def ofa_loss(student_logits, teacher_logits, *, labels, eps: float = 1.0, temperature: float = 1.0, mask=None,
             num_items_in_batch=None, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Adaptive target-enhancement loss of OFA-KD (see the module docstring); averaged over valid rows.

    ``labels`` are class indices ``[B]`` (rows equal to ``ignore_index`` are skipped). Not ``T^2``-scaled
    (the paper uses ``T = 1``).
    """
    if labels is None:
        raise ValueError("ofa_loss needs labels: the target class receives the enhanced weight (1 + p_y)^eps - 1.")
    if eps <= 0:
        raise ValueError(f"ofa_loss eps must be > 0, got {eps}")
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"ofa_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{None if teacher_logits is None else tuple(teacher_logits.shape)} must have the same shape "
            "(same number of classes).")
    prefix = student_logits.shape[:-1]
    valid = valid_mask(prefix, labels=labels, mask=mask, ignore_index=ignore_index, device=student_logits.device)
    dtype = compute_dtype(student_logits)
    s = rows(student_logits, valid).to(dtype) / temperature
    t = rows(teacher_logits, valid).to(s.device, dtype) / temperature
    y = labels.reshape(-1)[valid.reshape(-1)].to(s.device).long().unsqueeze(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= s.shape[-1]):
        raise ValueError(f"ofa_loss labels must lie in [0, {s.shape[-1]}); got max {int(y.max())}")
    p_t = torch.softmax(t, -1).detach()
    w = p_t.pow(eps)
    w_y = (1.0 + p_t.gather(-1, y)).pow(eps) - 1.0
    w = w.scatter(-1, y, w_y)
    per_row = -(w * torch.log_softmax(s, -1)).sum(-1)
    return reduce_rows(per_row, valid, reduction=reduction, num_items_in_batch=num_items_in_batch)


if "ofa" not in _REGISTRY:  # module reloads (tests) must not re-register a new class object under the same name

    @register_loss("ofa", kind="logits", function=ofa_loss, aliases=("ofa_kd", "target_enhancement"))
    class OFALoss(nn.Module):
        """OFA-KD adaptive target-enhancement loss (needs labels)."""

        def __init__(self, eps: float = 1.0, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                     reduction: str = "mean"):
            super().__init__()
            if eps <= 0:
                raise ValueError(f"OFA eps must be > 0, got {eps}")
            self.eps, self.temperature, self.ignore_index, self.reduction = eps, temperature, ignore_index, reduction

        def forward(self, student_logits, teacher_logits=None, *, labels=None, mask=None, num_items_in_batch=None,
                    teacher_topk=None):
            if teacher_topk is not None:
                raise ValueError("OFA needs dense teacher logits; a sparse top-k teacher signal is not supported.")
            return ofa_loss(student_logits, teacher_logits, labels=labels, eps=self.eps, mask=mask,
                            temperature=self.temperature, num_items_in_batch=num_items_in_batch,
                            reduction=self.reduction, ignore_index=self.ignore_index)

        def extra_repr(self) -> str:
            return f"eps={self.eps}, temperature={self.temperature}"
else:  # pragma: no cover
    OFALoss = _REGISTRY["ofa"].module_cls


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

    def __init__(self, in_dim: int, width: int, num_classes: int, num_merge: int, num_blocks: int,
                 num_heads: int | None = None):
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


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` patch tokens -> ``[B, C, s, s]``; drops leading prefix tokens when ``N`` is ``s*s + k``."""
    n = x.shape[1]
    s = int(math.isqrt(n))
    while s * s > n:
        s -= 1
    if s == 0:
        raise ValueError(f"cannot arrange {n} tokens on a square grid")
    x = x[:, n - s * s:]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], s, s)


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


def build_exit_branch(kind: str, feature_shape: Sequence[int], final_shape: Sequence[int], *, num_classes: int,
                      teacher_width: int, stage_pos: int, num_stages: int) -> nn.Module:
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
