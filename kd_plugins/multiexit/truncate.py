"""``truncate``: export one exit as a standalone, smaller model of the original architecture.

* Hugging Face: an ordinary ``PreTrainedModel`` with the first ``k`` layers (config ``num_hidden_layers = k``);
  ``save_pretrained`` / ``from_pretrained`` work without kd_plugins. Separate exit heads are folded in: the encoder
  affine into the last kept block's output LayerNorm, an encoder feed-forward head (``head="ffn"``) replaces the last
  kept block's ``intermediate`` and ``output``, a classifier/pooler copy replaces the model's, a causal LM's
  norm copy replaces the final norm and an exit embedding becomes the last kept layer's ``down_proj`` bias (the
  config gets ``mlp_bias=True`` with zero biases elsewhere).
* timm: ``timm.create_model(arch, **kwargs)`` with ``depth=k`` (ViT) or ``layers=[..., 0, 0]`` and matching
  ``channels`` (ResNet: empty trailing stages are identities), plus the state dict; the kwargs are kept as
  ``model.kd_plugins_create_kwargs`` so ``timm.create_model(model.pretrained_cfg["architecture"],
  **model.kd_plugins_create_kwargs)`` + ``load_state_dict`` rebuilds it anywhere.

In eval mode the truncated model's output equals the exit's output (encoders: ``last_hidden_state`` equals the exit's
token states; classifiers / LMs / timm: logits).
"""

from __future__ import annotations

import copy
import numbers

import torch
import torch.nn as nn

from ..distill.inherit import inherit_student
from .core import ATTR, ExitFFN, fold_affine, get_exits

__all__ = ["truncate", "timm_truncation_kwargs"]


def _check_exit(model: nn.Module, exit_layer) -> tuple:
    ex = get_exits(model)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, numbers.Integral) or int(exit_layer) not in ex.layers:
        raise ValueError(
            f"there is no exit at layer {exit_layer!r}; this model's exits are at {ex.layers} "
            "(truncate only at an exit, whose head was trained)"
        )
    return ex


def truncate(model: nn.Module, exit_layer: int, **create_kwargs) -> nn.Module:
    """A standalone copy of ``model`` cut at its exit ``exit_layer`` (the source model is not modified).

    ``create_kwargs`` (timm only) override the ``create_kwargs`` given to :func:`~kd_plugins.multiexit.add_exits`:
    the keyword arguments the source model was built with.

    Raises:
        ValueError: ``exit_layer`` is not one of the model's exits, or the timm model cannot be rebuilt.
    """
    ex = _check_exit(model, exit_layer)
    exit_layer = int(exit_layer)
    if ex.family.startswith("timm"):
        return _truncate_timm(model, exit_layer, create_kwargs or ex.create_kwargs or {})
    return _truncate_hf(model, exit_layer)


# ----------------------------------------------------------------------------------------------------------- HF
def _truncate_hf(model: nn.Module, k: int) -> nn.Module:
    ex = get_exits(model)
    heads = getattr(model, ATTR)
    # Detach the exits while copying so the copy is exactly the original architecture.
    delattr(model, ATTR)
    try:
        small = inherit_student(model, strategy=list(range(k)))
    finally:
        model.add_module(ATTR, heads)
    cfg = small.config
    if hasattr(cfg, "kd_plugins_inherited_layers"):
        delattr(cfg, "kd_plugins_inherited_layers")
    key = str(k)
    layers = small.get_submodule(ex.layer_path)
    with torch.no_grad():
        if ex.family == "encoder" and key in heads.heads and isinstance(heads.heads[key], ExitFFN):
            layers[-1].intermediate = copy.deepcopy(heads.heads[key].intermediate)
            layers[-1].output = copy.deepcopy(heads.heads[key].output)
        elif ex.family == "encoder" and key in heads.heads:
            fold_affine(layers[-1], heads.heads[key].weight, heads.heads[key].bias, f"layer {k}")
        elif ex.family == "seq_classifier" and key in heads.heads:
            small.classifier = copy.deepcopy(heads.heads[key]["classifier"])
            if "pooler" in heads.heads[key]:
                small.base_model.pooler = copy.deepcopy(heads.heads[key]["pooler"])
        elif ex.family == "causal_lm":
            if key in heads.heads:
                getattr(small, small.base_model_prefix).norm = copy.deepcopy(heads.heads[key])
            if key in heads.exit_embedding:
                e = heads.exit_embedding[key].detach()
                for layer in layers:
                    for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                        if lin.bias is None:
                            lin.bias = nn.Parameter(
                                torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                            )
                layers[-1].mlp.down_proj.bias.add_(e.to(layers[-1].mlp.down_proj.bias.dtype))
                cfg.mlp_bias = True
    return small


# --------------------------------------------------------------------------------------------------------- timm
def timm_truncation_kwargs(model: nn.Module, exit_layer: int, **create_kwargs) -> dict:
    """``timm.create_model`` keyword arguments of the model truncated at ``exit_layer`` (see :func:`truncate`)."""
    ex = _check_exit(model, exit_layer)
    exit_layer = int(exit_layer)
    kw = dict(create_kwargs or ex.create_kwargs or {})
    if ex.family == "timm_vit":
        kw["depth"] = exit_layer
        return kw
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    blocks = [len(s) for s in stages]
    expansion = getattr(type(stages[0][0]), "expansion", 1)
    planes = [int(model.feature_info[i]["num_chs"]) // expansion for i in range(1, 5)]
    kw["layers"] = blocks[:exit_layer] + [0] * (4 - exit_layer)
    kw["channels"] = tuple(planes[:exit_layer] + [planes[exit_layer - 1]] * (4 - exit_layer))
    return kw


def _truncate_timm(model: nn.Module, k: int, create_kwargs: dict) -> nn.Module:
    import timm

    ex = get_exits(model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ValueError(
            "cannot truncate: the timm model has no pretrained_cfg['architecture']; build it with timm.create_model"
        )
    kw = timm_truncation_kwargs(model, k, **create_kwargs)
    small = timm.create_model(arch, pretrained=False, **kw)
    src = {n: t for n, t in model.state_dict().items() if not n.startswith(ATTR + ".")}
    key = str(k)
    if ex.family == "timm_vit":
        sd = {n: t for n, t in src.items() if not n.startswith("blocks.") or int(n.split(".")[1]) < k}
        if key in ex.heads:
            for part in ("norm", "fc_norm", "head"):
                sd = {n: t for n, t in sd.items() if not n.startswith(part + ".")}
                sd.update({f"{part}.{n}": t for n, t in ex.heads[key][part].state_dict().items()})
    else:
        sd = {n: t for n, t in src.items() if not any(n.startswith(f"layer{i}.") for i in range(k + 1, 5))}
        if key in ex.heads:
            sd = {n: t for n, t in sd.items() if not n.startswith("fc.")}
            sd.update({f"fc.{n}": t for n, t in ex.heads[key].state_dict().items()})
    try:
        small.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"timm.create_model({arch!r}, **{kw}) does not match the source model; pass the keyword "
            f"arguments the model was created with (truncate(model, {k}, **create_kwargs) or "
            f"add_exits(..., create_kwargs=...)). {e}"
        ) from None
    small.to(next(model.parameters()).device)
    small.train(model.training)
    small.kd_plugins_create_kwargs = kw
    return small
