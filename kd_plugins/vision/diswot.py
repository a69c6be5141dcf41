"""DisWOT (Dong et al., CVPR 2023): rank candidate student architectures for a teacher without training them.

One mini-batch of real images goes through the (trained) teacher and through every candidate at random
initialisation (N(0, 1) conv/linear weights, zero biases, unit norms, seeded). Two width-free similarities are
compared (lower distance = better student for this teacher); the score is ``-(M_s + M_r)``, higher is better:

* **semantic** ``M_s``: class-activation maps ``G = W A`` (classifier weights ``W [K, C]`` applied to the
  pre-pooling feature map ``A [B, C, HW]``), Gram ``G G^T`` (K x K) divided by its Frobenius norm;
  ``M_s = ||Gram_T - Gram_S||_F`` (the paper's form, which needs only equal class counts);
* **relation** ``M_r``: per-sample flattened feature maps, row-L2-normalised, ``B x B`` Gram normalised the same way;
  ``M_r = ||Gram_T - Gram_S||_F``.

Identical models score 0 (the maximum); the score is invariant to a positive rescaling of the feature maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["gaussian_init_", "feature_map_and_classifier", "diswot_score", "rank_students"]

Candidate = str | nn.Module | tuple


def gaussian_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """DisWOT's training-free initialisation: conv/linear weights ~ N(0, 1), biases 0, norm weights 1, biases 0."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float32))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for name, p in model.named_parameters():  # tokens and position embeddings
            if p.dim() >= 2 and ("token" in name or "pos_embed" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def feature_map_and_classifier(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [B, C, S], W [K, C])``: the pre-pooling features of ``model.forward_features`` and the classifier."""
    feats = model.forward_features(images)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__}: DisWOT needs a linear classifier (get_classifier() is {type(head).__name__})"
        )
    c = head.in_features
    if feats.dim() == 3:  # tokens [B, N, C]: drop class/register tokens
        feats = feats[:, int(getattr(model, "num_prefix_tokens", 0)) :]
        a = feats.transpose(1, 2)
    elif feats.dim() == 4:
        a = feats.permute(0, 3, 1, 2) if feats.shape[-1] == c and feats.shape[1] != c else feats
        a = a.flatten(2)
    elif feats.dim() == 2:
        a = feats[:, :, None]
    else:
        raise ValueError(f"unsupported forward_features shape {tuple(feats.shape)}")
    if a.shape[1] != c:
        raise ValueError(
            f"{type(model).__name__}: feature width {a.shape[1]} != classifier input {c}; the head has "
            "a pre-logits layer DisWOT cannot see through"
        )
    return a.float(), head.weight.float()


def _semantic_gram(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    g = torch.einsum("kc,bcs->kbs", w, a).reshape(w.shape[0], -1)
    m = g @ g.T
    return m / m.norm().clamp_min(1e-12)


def _relation_gram(a: torch.Tensor) -> torch.Tensor:
    f = F.normalize(a.reshape(a.shape[0], -1), dim=1)
    m = f @ f.T
    return m / m.norm().clamp_min(1e-12)


@torch.no_grad()
def _grams(model: nn.Module, images: torch.Tensor, train_mode: bool):
    was = model.training
    model.train(train_mode)
    try:
        a, w = feature_map_and_classifier(model, images)
    finally:
        model.train(was)
    return _semantic_gram(a, w), _relation_gram(a), w.shape[0]


def diswot_score(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    *,
    student_train_mode: bool = True,
    _teacher_grams=None,
) -> float:
    """``-(M_s + M_r)`` for ``student`` as it is (no re-initialisation). The teacher runs in eval mode; the
    student in train mode by default (BatchNorm batch statistics, as at random initialisation)."""
    gs_t, gr_t, k_t = _teacher_grams or _grams(teacher, images, train_mode=False)
    gs_s, gr_s, k_s = _grams(student, images, train_mode=student_train_mode)
    if k_t != k_s:
        raise ValueError(f"teacher has {k_t} classes, student {k_s}: DisWOT compares K x K class Grams")
    return -float((gs_t - gs_s).norm() + (gr_t - gr_s).norm())


def rank_students(
    teacher: nn.Module,
    candidates: Mapping[str, Candidate] | Iterable[Candidate],
    images: torch.Tensor,
    *,
    seed: int = 0,
    init: str = "gaussian",
    student_train_mode: bool = True,
) -> list[tuple[str, float]]:
    """Rank candidate students for ``teacher`` by the DisWOT score, best first.

    Args:
        teacher: the trained teacher (a timm model with ``forward_features`` and a linear classifier).
        candidates: timm model names, ``(name, kwargs)`` pairs, modules, or a ``{label: any of those}`` mapping.
            Names are created with ``pretrained=False`` and the teacher's ``num_classes``.
        images: one batch ``[B, 3, H, W]``, normalised for the models (B >= 2).
        seed: every candidate is initialised from this seed (same seed -> same scores).
        init: ``"gaussian"`` (DisWOT's N(0, 1) init) or ``"none"`` (score the modules as given).
    Returns:
        ``[(label, score), ...]`` sorted by decreasing score.
    """
    from .models import create_timm_model

    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError("rank_students needs a batch of at least 2 images [B, C, H, W]")
    if init not in ("gaussian", "none"):
        raise ValueError(f"init must be 'gaussian' or 'none', got {init!r}")
    items: Sequence[tuple[str, Candidate]]
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    else:
        items = []
        for c in candidates:
            label = c if isinstance(c, str) else (c[0] if isinstance(c, tuple) else type(c).__name__)
            items.append((label, c))
    if not items:
        raise ValueError("rank_students needs at least one candidate")
    num_classes = teacher.get_classifier().out_features
    t_grams = _grams(teacher, images, train_mode=False)
    scores = []
    for label, cand in items:
        if isinstance(cand, str):
            model = create_timm_model(cand, num_classes=num_classes)
        elif isinstance(cand, tuple):
            if len(cand) != 2 or not isinstance(cand[1], dict):
                raise TypeError(f"candidate {label!r}: a tuple must be (timm_name, kwargs_dict)")
            name, kw = cand
            model = create_timm_model(name, **{"num_classes": num_classes, **kw})
        elif isinstance(cand, nn.Module):
            model = cand
        else:
            raise TypeError(f"candidate {label!r}: expected a timm name, (name, kwargs) or a module")
        model = model.to(images.device)
        if init == "gaussian":
            gaussian_init_(model, seed)
        scores.append(
            (
                str(label),
                diswot_score(teacher, model, images, student_train_mode=student_train_mode, _teacher_grams=t_grams),
            )
        )
    return sorted(scores, key=lambda kv: kv[1], reverse=True)
