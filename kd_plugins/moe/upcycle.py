"""Sparse upcycling of a dense decoder (LLaVA-MoD's student) and what is measured on the result.

::

    from kd_plugins.moe import upcycle_moe, moe_balance_loss, expert_load
    upcycle_moe(model)                        # 4 experts, top-2, every other layer; same outputs as before
    out = model(**batch)
    loss = out.loss + 0.01 * moe_balance_loss(model)
    expert_load(model)                        # {"model.layers.0.mlp": tensor([0.26, 0.24, ...]), ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

from .._config import resolve_config
from .._utils import unwrap_model
from .config import MoEConfig
from .layers import MoEContext, MoEMLP, balance_term, load_fractions

__all__ = [
    "upcycle_moe",
    "moe_layers",
    "moe_balance_loss",
    "expert_load",
    "moe_param_counts",
    "record_router",
    "clear_router_records",
    "rebuild_moe_layout",
]

logger = logging.getLogger(__name__)

#: Where decoder layers live, relative to the model (first match wins), and the names of their dense MLP.
LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3 (*ForCausalLM)
    "layers",  # the bare decoder (LlamaModel, ...)
    "model.model.layers",  # a wrapper holding a *ForCausalLM
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT-style decoders (only with a single MLP sub-module)
)
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_layers(model: nn.Module) -> tuple[str, nn.Module, str]:
    """``(layers_path, layers_owner, mlp_name)`` of the first known layout that fits ``model``; a ``ValueError``
    naming every path tried otherwise."""
    for path in LAYER_PATHS:
        layers = _get(model, path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        for name in MLP_NAMES:
            if all(isinstance(getattr(layer, name, None), nn.Module) for layer in layers):
                owner = _get(model, path.rpartition(".")[0]) if "." in path else model
                return path, owner, name
    tried = ", ".join(f"{p}[i].{n}" for p in LAYER_PATHS for n in MLP_NAMES)
    raise ValueError(
        f"upcycle_moe found no decoder layers with a dense MLP in {type(model).__name__}; tried {tried}. "
        "It supports Llama-family decoders (model.model.layers[i].mlp) and the layouts above."
    )


def _select(spec: str | list[int], n: int) -> list[int]:
    if spec == "every_other":
        return list(range(0, n, 2))
    if spec == "all":
        return list(range(n))
    if spec == "first_half":
        return list(range(n // 2))
    if spec == "second_half":
        return list(range(n // 2, n))
    bad = [i for i in spec if i >= n]
    if bad:
        raise ValueError(f"MoEConfig.layers names layer(s) {bad} but the model has {n} layers (indices 0..{n - 1})")
    return list(spec)


def _hidden_size(model: nn.Module, dense: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    first = next((m for m in dense.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError(f"cannot tell the hidden size of {type(dense).__name__}: the model has no config.hidden_size")
    return first.in_features


def _capture_mask(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook on the module holding the decoder layers: the MoE layers read the padding mask from here.
    A module-level function reading the context off the hooked module, so deep copies of the model keep working."""
    ctx = getattr(module, "kd_moe_context", None)
    if ctx is None:
        return
    am = kwargs.get("attention_mask")
    if am is None and len(args) > 1 and torch.is_tensor(args[1]):
        am = args[1]
    ctx.token_mask = am.bool() if torch.is_tensor(am) and am.dim() == 2 else None


def _release_mask(module: nn.Module, args, kwargs, output) -> None:
    ctx = getattr(module, "kd_moe_context", None)
    if ctx is not None:
        ctx.token_mask = None


def _install(model: nn.Module, owner: nn.Module, layout: dict, blocks: dict[int, nn.Module], mlp_name: str) -> None:
    ctx = MoEContext()
    layers = _get(model, layout["layers_path"])
    for i, block in blocks.items():
        block._ctx[0] = ctx
        setattr(layers[i], mlp_name, block)
    owner.kd_moe_context = ctx
    owner.register_forward_pre_hook(_capture_mask, with_kwargs=True)
    owner.register_forward_hook(_release_mask, with_kwargs=True, always_call=True)
    model.kd_moe = layout


def _build(model: nn.Module, cfg: MoEConfig, indices: list[int] | None = None) -> nn.Module:
    if moe_layers(model):
        raise ValueError("the model already has MoE layers (upcycle_moe ran on it); pass the dense model")
    path, owner, mlp_name = _find_layers(model)
    layers = _get(model, path)
    chosen = indices if indices is not None else _select(cfg.layers_spec, len(layers))
    hidden = _hidden_size(model, getattr(layers[0], mlp_name))
    blocks = {
        i: MoEMLP(
            getattr(layers[i], mlp_name),
            hidden,
            cfg.num_experts,
            cfg.top_k,
            router_init=cfg.router_init,
            router_std=cfg.router_std,
            router_jitter=cfg.router_jitter,
        )
        for i in chosen
    }
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    layout = {"layers_path": path, "mlp_name": mlp_name, "indices": chosen, "hidden_size": hidden, "config": config}
    _install(model, owner, layout, blocks, mlp_name)
    return model


def upcycle_moe(model: nn.Module, config: MoEConfig | None = None, **overrides) -> nn.Module:
    """Replace the dense MLPs of the selected decoder layers of ``model`` by :class:`~kd_plugins.moe.MoEMLP` (in
    place) and return ``model``.

    Every expert is an exact copy of the dense MLP and the chosen experts' weights are renormalised to sum to 1, so
    the upcycled model gives the dense model's outputs (up to float rounding) until training moves the experts
    apart. Decoder layers are found at ``model.model.layers[i].mlp`` (Llama family) or the other layouts of
    :data:`LAYER_PATHS`; an unknown architecture raises an error listing what was tried.

    Args:
        model: a dense decoder (e.g. ``LlamaForCausalLM``); modified in place.
        config: a :class:`~kd_plugins.moe.MoEConfig` (default: 4 experts, top-2, every other layer).
        **overrides: ``MoEConfig`` fields that replace those of ``config``.
    """
    cfg = resolve_config(MoEConfig, config, overrides)
    _build(model, cfg)
    layout = model.kd_moe
    logger.info(
        "upcycle_moe: %d of %d layers (%s) -> %d experts, top-%d",
        len(layout["indices"]),
        len(_get(model, layout["layers_path"])),
        ",".join(map(str, layout["indices"])),
        cfg.num_experts,
        cfg.top_k,
    )
    return model


def rebuild_moe_layout(model: nn.Module, layout: dict) -> nn.Module:
    """Re-create the MoE layers recorded in ``layout`` (``model.kd_moe`` of an upcycled model) on the dense
    ``model``, for loading saved weights (:func:`~kd_plugins.moe.load_moe`)."""
    cfg = MoEConfig(**layout["config"])
    path, _, mlp_name = _find_layers(model)
    if (path, mlp_name) != (layout["layers_path"], layout["mlp_name"]):
        raise ValueError(
            f"the MoE checkpoint has its layers at {layout['layers_path']}[i].{layout['mlp_name']} but this model at "
            f"{path}[i].{mlp_name}: load it into the architecture it was saved from"
        )
    n = len(_get(model, path))
    if max(layout["indices"], default=-1) >= n:
        raise ValueError(
            f"the MoE checkpoint has MoE layers {layout['indices']} but this model has {n} layers: load it into the "
            "architecture it was saved from"
        )
    return _build(model, cfg, indices=list(layout["indices"]))


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    """``{qualified name: MoEMLP}`` of ``model`` (wrappers such as DDP are looked through)."""
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, MoEMLP)}


def _require_layers(model: nn.Module, what: str) -> dict[str, MoEMLP]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no MoE layers; call kd_plugins.upcycle_moe(model) first")
    if not any(layer.records for layer in layers.values()):
        raise RuntimeError(f"{what}: no router records yet; run a forward pass of the model first")
    return layers


def moe_balance_loss(model: nn.Module, form: str | None = None) -> torch.Tensor:
    """Sum over MoE layers (and over the forwards recorded inside :func:`record_router`; otherwise the last forward)
    of the Switch-style balance term ``E * sum_e f_e P_e`` (:func:`~kd_plugins.moe.layers.balance_term`), padding
    tokens excluded. Unweighted: multiply by ``MoEConfig.balance_weight`` (0.01) before adding it to the loss.

    ``form``: ``"switch"`` or ``"top1"``; default: ``balance_form`` of the config the model was upcycled with.
    """
    layers = _require_layers(model, "moe_balance_loss")
    form = form or unwrap_model(model).kd_moe["config"]["balance_form"]
    terms = [balance_term(r, layer.num_experts, form) for layer in layers.values() for r in layer.records]
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def expert_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: f [E]}``: the fraction of the real tokens' top-k assignments each expert received in the
    recorded forward(s) (sums to 1 per layer; ``1/E`` each when balanced)."""
    layers = _require_layers(model, "expert_load")
    out = {}
    for name, layer in layers.items():
        experts = [r.real()[1] for r in layer.records]
        out[name] = load_fractions(torch.cat(experts), layer.num_experts).cpu()
    return out


def moe_param_counts(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "active": parameters one token uses}``: each MoE layer adds ``E - 1`` MLP copies
    and a router to the total; a token uses ``top_k`` experts and the router."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in moe_layers(model).values():
        per_expert = sum(p.numel() for p in layer.experts[0].parameters())
        idle += (layer.num_experts - layer.top_k) * per_expert
    return {"total": total, "active": total - idle}


def clear_router_records(model: nn.Module) -> None:
    """Drop the router records of every MoE layer (they hold the last forward's probabilities and graph)."""
    for layer in moe_layers(model).values():
        layer.records.clear()


@contextlib.contextmanager
def record_router(model: nn.Module) -> Iterator[None]:
    """Inside the block, MoE layers keep the records of *every* forward (starting empty), so
    :func:`moe_balance_loss` and :func:`expert_load` cover all of them (e.g. chosen and rejected passes run
    separately); outside it, each forward replaces the previous record."""
    layers = moe_layers(model)
    contexts = {id(layer.context): layer.context for layer in layers.values()}
    previous = {key: ctx.accumulate for key, ctx in contexts.items()}
    clear_router_records(model)
    for ctx in contexts.values():
        ctx.accumulate = True
    try:
        yield
    finally:
        for key, ctx in contexts.items():
            ctx.accumulate = previous[key]
