"""Weight inheritance for timm ViTs (TinyCLIP-style manual inheritance): a shallower and/or narrower student built
from the teacher's own weights.

* **Depth**: teacher blocks chosen by :func:`kd_plugins.distill.inherit.select_layer_indices` (``"uniform"`` keeps
  ``floor(i * L / k)``, ``"first"``, ``"last"`` or explicit indices).
* **Width**: every tensor keeps its leading slice (first channels, first MLP neurons). The fused ``qkv`` projection
  keeps the first ``num_heads`` heads of each of q, k and v (and the first ``head_dim`` dims of each head when the
  head size shrinks); the attention output projection keeps the matching input columns.

The student is an ordinary timm model re-creatable with ``timm.create_model(student.kd_plugins_inherit["model_name"],
**student.kd_plugins_inherit["model_kwargs"])``. Families it cannot shrink (CNNs, Swin, EVA, ...) raise a
``ValueError``. (:func:`kd_plugins.distill.inherit_student` is the Hugging Face counterpart: it drops layers of a
``PreTrainedModel``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from ..distill.inherit import select_layer_indices

__all__ = ["inherit_vit_student", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = ("VisionTransformer", "VisionTransformerDistilled")


def _vit_attn(teacher):
    attn = teacher.blocks[0].attn
    if not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise ValueError(f"inherit_vit_student: {type(attn).__name__} attention (no fused qkv) is not supported")
    return attn


def inherit_vit_student(
    teacher: nn.Module,
    *,
    depth: int | None = None,
    width: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    strategy: str | Sequence[int] = "uniform",
    num_classes: int | None = None,
) -> nn.Module:
    """A shallower and/or narrower timm ViT student initialised from ``teacher``'s weights.

    Args:
        teacher: a timm ``VisionTransformer`` (``vit_*``, ``deit_*``; not the attention-pool variants).
        depth: number of blocks (default: the teacher's).
        width: embedding width (default: ``num_heads * head_dim``, i.e. the teacher's width unless ``num_heads``
            shrinks).
        num_heads: attention heads (default: ``width // teacher_head_dim``, keeping the head size).
        mlp_ratio: MLP hidden width / embedding width (default: the teacher's).
        strategy: which teacher blocks to keep (see :func:`~kd_plugins.distill.inherit.select_layer_indices`).
        num_classes: a new head (re-initialised) instead of slicing the teacher's.
    """
    import timm

    family = type(teacher).__name__
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"inherit_vit_student cannot shrink a {family}: depth/width inheritance is implemented for timm "
            f"VisionTransformer models (vit_*, deit_*) only. For CNNs (ResNet, EfficientNet, ConvNeXt) and "
            f"hierarchical transformers (Swin) build the student yourself and distil it from scratch."
        )
    if getattr(teacher, "attn_pool", None) is not None:
        raise ValueError("inherit_vit_student: ViTs with an attention-pool head (global_pool='map') are not supported")
    attn = _vit_attn(teacher)
    t_width, t_heads, t_depth = teacher.embed_dim, attn.num_heads, len(teacher.blocks)
    t_head_dim = attn.head_dim
    t_mlp = teacher.blocks[0].mlp.fc1.out_features
    if num_heads is None:
        num_heads = t_heads if width is None else max(1, width // t_head_dim)
    if width is None:
        width = num_heads * t_head_dim
    if width % num_heads:
        raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
    head_dim = width // num_heads
    if not (1 <= num_heads <= t_heads and 1 <= width <= t_width and head_dim <= t_head_dim):
        raise ValueError(
            f"the student must be no larger than the teacher: teacher width {t_width}, {t_heads} heads "
            f"of {t_head_dim}; asked width {width}, {num_heads} heads of {head_dim}"
        )
    mlp_ratio = t_mlp / t_width if mlp_ratio is None else float(mlp_ratio)
    if int(width * mlp_ratio) > t_mlp:
        raise ValueError(f"student MLP width {int(width * mlp_ratio)} exceeds the teacher's {t_mlp}")
    if isinstance(strategy, str):
        idx = select_layer_indices(t_depth, depth if depth is not None else t_depth, strategy)
    else:
        idx = select_layer_indices(t_depth, depth, strategy)

    arch = (getattr(teacher, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(
            "inherit_vit_student needs a teacher created with timm.create_model (pretrained_cfg.architecture)"
        )
    kwargs = dict(getattr(teacher, "_model_args", {}) or {})
    kwargs.update(depth=len(idx), embed_dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio)
    new_head = num_classes is not None and num_classes != teacher.num_classes
    kwargs["num_classes"] = num_classes if num_classes is not None else teacher.num_classes
    student = timm.create_model(arch, pretrained=False, **kwargs)

    t_sd = teacher.state_dict()
    s_sd = student.state_dict()
    new = {}
    for key, ref in s_sd.items():
        src_key = key
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            src_key = f"blocks.{idx[int(i)]}.{rest}"
        if new_head and key.startswith("head") and key.split(".")[0] in ("head", "head_dist"):
            new[key] = ref
            continue
        if src_key not in t_sd:
            raise ValueError(f"inherit_vit_student: teacher has no tensor {src_key!r} for student {key!r}")
        src = t_sd[src_key]
        if src_key.endswith("attn.qkv.weight") or src_key.endswith("attn.qkv.bias"):
            v = src.reshape(3, t_heads, t_head_dim, *src.shape[1:])[:, :num_heads, :head_dim]
            v = v.reshape(3 * width, *src.shape[1:])
            if v.dim() == 2:
                v = v[:, :width]
        elif src_key.endswith("attn.proj.weight"):
            v = src.reshape(t_width, t_heads, t_head_dim)[:width, :num_heads, :head_dim].reshape(width, width)
        else:
            if src.dim() != ref.dim():
                raise ValueError(f"inherit_vit_student: {src_key} {tuple(src.shape)} vs student {tuple(ref.shape)}")
            v = src[tuple(slice(0, n) for n in ref.shape)]
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(
                f"inherit_vit_student: {src_key} sliced to {tuple(v.shape)}, student expects {tuple(ref.shape)}"
            )
        new[key] = v.clone()
    student.load_state_dict(new, strict=True)
    student.kd_plugins_inherit = {"model_name": arch, "model_kwargs": kwargs, "teacher_layers": list(idx)}
    return student
