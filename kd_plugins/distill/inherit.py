"""Weight inheritance: build a shallower student from a teacher's own layers (DistilBERT-style init)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.nn as nn

# Where transformer blocks live, relative to the model or to its ``base_model_prefix`` sub-module.
LAYER_CONTAINER_PATHS = (
    "encoder.layer",  # BERT, RoBERTa, MPNet, ELECTRA
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3 (ForCausalLM wrappers)
    "layers",  # bare Llama-family decoders
    "transformer.layer",  # DistilBERT
    "transformer.h",  # GPT-2 family
    "gpt_neox.layers",
    "decoder.layers",
    "model.decoder.layers",
)


def find_layer_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the ``nn.ModuleList`` holding a model's transformer blocks.

    Returns ``(dotted_path, module_list)``. Raises a ``ValueError`` naming every path tried when the family is
    not recognised.
    """
    prefixes = [""]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        prefixes.append(prefix + ".")
    tried = []
    for pre in prefixes:
        for path in LAYER_CONTAINER_PATHS:
            full = pre + path
            tried.append(full)
            try:
                mod = model.get_submodule(full)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList) and len(mod) > 0:
                return full, mod
    raise ValueError(
        f"Could not locate the transformer layers of {type(model).__name__}; tried: {', '.join(tried)}. "
        "Pass a model of a supported family (BERT/RoBERTa/MPNet, Llama/Mistral/Qwen, GPT-2, DistilBERT) or build "
        "the student yourself."
    )


def select_layer_indices(
    num_teacher_layers: int, num_layers: int | None, strategy: str | Sequence[int] = "uniform"
) -> list[int]:
    """Teacher layer indices a ``num_layers``-deep student keeps.

    ``"uniform"``: ``floor(i * L / k)`` for ``i < k`` (6 -> 3 keeps 0, 2, 4, as DistilBERT's every-other-layer init);
    ``"first"``: ``0 .. k-1``; ``"last"``: the top ``k`` layers; or an explicit increasing list of indices.
    """
    L = num_teacher_layers
    if not isinstance(strategy, str):
        idx = [int(i) for i in strategy]
        if num_layers is not None and num_layers != len(idx):
            raise ValueError(f"num_layers={num_layers} but {len(idx)} layer indices were given: {idx}")
    else:
        if num_layers is None:
            raise ValueError("num_layers is required unless explicit layer indices are passed as strategy")
        if not 1 <= num_layers <= L:
            raise ValueError(f"num_layers must lie in [1, {L}] (the teacher has {L} layers), got {num_layers}")
        k = num_layers
        if strategy == "uniform":
            idx = [(i * L) // k for i in range(k)]
        elif strategy == "first":
            idx = list(range(k))
        elif strategy == "last":
            idx = list(range(L - k, L))
        else:
            raise ValueError(f"strategy must be 'uniform', 'first', 'last' or a list of indices, got {strategy!r}")
    if not idx:
        raise ValueError("at least one layer must be kept")
    if any(i < 0 or i >= L for i in idx):
        raise ValueError(f"layer indices {idx} out of range: the teacher has layers 0..{L - 1}")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise ValueError(f"layer indices must be strictly increasing, got {idx}")
    return idx


def inherit_student(
    teacher: nn.Module, num_layers: int | None = None, strategy: str | Sequence[int] = "uniform"
) -> nn.Module:
    """A shallower copy of ``teacher`` of the same architecture, initialised from a subset of its layers.

    Embeddings, final norms and heads are copied; the config's ``num_hidden_layers`` (and per-layer lists such as
    ``layer_types``) are updated and attention ``layer_idx`` attributes renumbered so KV caches work. The result is
    an ordinary ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` work without kd_plugins. The teacher
    is left untouched. The student is trainable (every parameter ``requires_grad``) even when the teacher was
    frozen, e.g. by an earlier ``DistillationCallback`` in the same process.

    Args:
        teacher: a Hugging Face model (BERT-, MPNet-, Llama-family and others with a standard layer list).
        num_layers: student depth ``k``.
        strategy: ``"uniform"``, ``"first"``, ``"last"`` or explicit teacher layer indices.
    """
    path, layers = find_layer_container(teacher)
    idx = select_layer_indices(len(layers), num_layers, strategy)
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)  # a copy of a frozen teacher would otherwise be a frozen student
    parent_path, _, attr = path.rpartition(".")
    parent = student.get_submodule(parent_path) if parent_path else student
    old = getattr(parent, attr)
    new = nn.ModuleList([old[i] for i in idx])
    setattr(parent, attr, new)
    for new_i, layer in enumerate(new):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_i
    cfg = getattr(student, "config", None)
    if cfg is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, key) and getattr(cfg, key) == len(layers):
                setattr(cfg, key, len(idx))
        for key in ("layer_types",):
            val = getattr(cfg, key, None)
            if isinstance(val, (list, tuple)) and len(val) == len(layers):
                setattr(cfg, key, [val[i] for i in idx])
        cfg.kd_plugins_inherited_layers = list(idx)
    return student
