"""BiStil's two distillation phases as :class:`DistillationConfig` s (Ansell et al., "Distilling Efficient
Language-Specific Models for Cross-Lingual Transfer", Findings ACL 2023).

Phase 1 distils a shallower student from the multilingual teacher on the two languages' text; phase 2 distils the
task from the teacher with its task head while the student trains as a lottery-ticket sparse fine-tuning
(:class:`~kd_plugins.integrations.hf.SparseFTCallback`). The student keeps every ``factor``-th teacher layer, the
last of each group (:func:`regular_layer_map`; build it with ``inherit_student(teacher, strategy=...)``).

Losses, from BiStil's reference code (``src/sft/distil.py``), weights 1 each, every term averaged over its pairs:

* ``hidden_mse`` between the embedding outputs and between student layer ``i`` and teacher layer
  ``regular_layer_map[i]`` (BiStil's hidden states ``h_S[i]`` vs ``h_T[i * factor]``, index 0 being the embeddings);
* ``attention_mse`` between the same layers' attention maps, over unpadded (query, key) entries;
* phase 2 only: ``soft_ce`` at T = 2 *without* the T^2 factor, and no gold-label term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from .config import DistillationConfig
from .inherit import find_layer_container

__all__ = ["regular_layer_map", "bistil_config"]

_EMBEDDING_NAMES = ("embeddings", "embed_tokens")


def regular_layer_map(num_teacher_layers: int, factor: int = 2) -> list[int]:
    """BiStil's "regular" student init: student layer ``j`` takes teacher layer ``(j + 1) * factor - 1``.

    12 teacher layers, factor 2 -> ``[1, 3, 5, 7, 9, 11]``.
    """
    if factor < 1 or num_teacher_layers % factor:
        raise ValueError(
            f"factor must be >= 1 and divide the teacher's {num_teacher_layers} layers, got {factor}; pick a divisor "
            "or pass explicit layer indices to inherit_student."
        )
    return [(j + 1) * factor - 1 for j in range(num_teacher_layers // factor)]


def _embeddings_name(model: nn.Module, layers_path: str) -> str:
    # the embeddings sit beside the encoder ("bert.encoder.layer" -> "bert.") or the layer list ("model.layers")
    suffix = "encoder.layer" if layers_path.endswith("encoder.layer") else layers_path.rpartition(".")[2]
    root = layers_path[: -len(suffix)]
    for name in _EMBEDDING_NAMES:
        try:
            model.get_submodule(root + name)
        except AttributeError:
            continue
        return root + name
    raise ValueError(
        f"{type(model).__name__} has no {' or '.join(root + n for n in _EMBEDDING_NAMES)} module to match the "
        "embedding outputs; pass include_embeddings=False."
    )


def bistil_config(
    student: nn.Module,
    teacher: nn.Module,
    phase: int,
    *,
    teacher_layers: Sequence[int] | None = None,
    temperature: float = 2.0,
    hidden_weight: float = 1.0,
    attention_weight: float = 1.0,
    logit_weight: float = 1.0,
    include_embeddings: bool = True,
) -> DistillationConfig:
    """The :class:`DistillationConfig` of BiStil's ``phase`` (1: general, 2: task) for this student and teacher.

    Args:
        student: a Hugging Face transformer (any head); its layers are matched in order.
        teacher: the teacher (phase 2: with its task head); module names are looked up on each model, so a student
            with a classification head and a bare teacher encoder (or the reverse) pair correctly.
        phase: 1 (hidden + attention MSE) or 2 (also soft cross-entropy on the logits at ``temperature``, no T^2).
        teacher_layers: the teacher layer each student layer matches; default: the layers the student was built
            from (``config.kd_plugins_inherited_layers``, written by :func:`~kd_plugins.inherit_student` and kept by
            ``save_pretrained``).

    Load both models with ``attn_implementation="eager"`` and the student with ``attention_probs_dropout_prob=0``:
    the attention term reads the maps Hugging Face returns after dropout.
    """
    if phase not in (1, 2):
        raise ValueError(f"BiStil has phases 1 (general distillation) and 2 (task distillation), got {phase!r}")
    s_path, s_layers = find_layer_container(student)
    t_path, t_layers = find_layer_container(teacher)
    if teacher_layers is None:
        teacher_layers = getattr(getattr(student, "config", None), "kd_plugins_inherited_layers", None)
        if teacher_layers is None:
            raise ValueError(
                "The student does not record which teacher layers it was built from; build it with "
                "kd_plugins.inherit_student(teacher, strategy=regular_layer_map(n)) or pass teacher_layers=[...]."
            )
    teacher_layers = [int(t) for t in teacher_layers]
    if len(teacher_layers) != len(s_layers):
        raise ValueError(
            f"teacher_layers has {len(teacher_layers)} entries but the student has {len(s_layers)} layers: one "
            "teacher layer per student layer."
        )
    if any(not 0 <= t < len(t_layers) for t in teacher_layers):
        raise ValueError(f"teacher_layers {teacher_layers} out of range: the teacher has layers 0..{len(t_layers) - 1}")
    pairs = {f"{s_path}.{i}": f"{t_path}.{t}" for i, t in enumerate(teacher_layers)}
    if include_embeddings:
        pairs = {_embeddings_name(student, s_path): _embeddings_name(teacher, t_path), **pairs}
    terms = {"hidden_mse": hidden_weight, "attention_mse": attention_weight}
    kwargs = {}
    if phase == 2:
        terms = {"soft_ce": logit_weight, **terms}
        kwargs = {"soft_ce": {"t2_scale": False}}
    terms = {k: v for k, v in terms.items() if v != 0}
    # feature pairs without a hidden term would make DistillationConfig add its default one: pass them only when used
    return DistillationConfig(
        loss_terms=terms,
        loss_kwargs={k: v for k, v in kwargs.items() if k in terms},
        temperature=temperature,
        feature_pairs=pairs if "hidden_mse" in terms else None,
        attention_layer_map=dict(enumerate(teacher_layers)) if "attention_mse" in terms else None,
        hard_label_weight=0.0,
    )
