"""Exits on chosen layers: ``add_exits`` and one-pass computation of every exit's output.

An *exit* at layer ``k`` (1-based: "after the k-th block") turns the hidden state leaving block ``k`` into the same
kind of output the full model produces:

==========================  ==================================  ===============================================
family                      ``head="shared"``                   ``head="separate"`` (per non-final exit)
==========================  ==================================  ===============================================
HF bare encoder             token states as they are (the       an elementwise affine ``h * w + b`` (2·d params,
(BertModel, MPNetModel)     caller pools, e.g. mean pooling)    identity init); folded into the block's last
                                                                LayerNorm by :func:`truncate`.
                                                                ``head="ffn"``: the exit's own copy of block
                                                                ``k``'s feed-forward half (``intermediate`` +
                                                                ``output``, LayerNorm included; 2·d·d_ff params),
                                                                run on block ``k``'s attention output; it
                                                                replaces that half in :func:`truncate`
HF ``*ForSequence-          the model's own pooler (if any) +   a copy of pooler + classifier
Classification`` encoder    dropout + classifier
HF Llama-family             the model's final norm + LM head    a copy of the final norm (d params); the LM head
``*ForCausalLM``            (optionally ``exit_embedding``: a   stays shared (a copy would cost vocab·d each)
                            learned d-vector added before the
                            norm, telling the head which exit
                            it serves; zero init)
timm ViT                    the model's final norm + pooling +  copies of norm, fc_norm and head
                            fc_norm + head
timm ResNet                 (only when widths match)            global average pool + ``Linear(C_k, classes)``
==========================  ==================================  ===============================================

``head="ffn"`` gives a truncation room to specialise outside the shared weights: only the attention half of its last
block and the blocks below stay shared with the full model, so it can fit the final embedding better for the same
movement of the shared layers (which is what moves the full model).

The exit at the model's last layer is always the model's own head, so the unmodified forward pass *is* the deepest
exit. The heads live in ``model.multi_exit`` (a sub-module, so the optimizer and ``state_dict`` see them); shared
parts are looked up on the model at call time and never registered twice.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..distill.inherit import find_layer_container

__all__ = [
    "add_exits",
    "get_exits",
    "has_exits",
    "remove_exits",
    "exit_outputs",
    "exit_embeddings",
    "MultiExitHeads",
    "ExitAffine",
    "ExitFFN",
    "convert_exit_heads",
    "fold_affine",
    "model_family",
    "num_exit_layers",
]

ATTR = "multi_exit"
FAMILIES = ("encoder", "seq_classifier", "causal_lm", "timm_vit", "timm_resnet")
_HF_SUPPORTED = (
    "bare HF encoders (BertModel, MPNetModel, ...), HF *ForSequenceClassification encoders, "
    "HF Llama-family *ForCausalLM decoders"
)
_TIMM_SUPPORTED = "timm VisionTransformer (blocks) and timm ResNet (layer1..layer4)"


class ExitAffine(nn.Module):
    """Elementwise affine ``h * weight + bias`` over the hidden width (identity at init; 2·d parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight.to(h.dtype) + self.bias.to(h.dtype)


class ExitFFN(nn.Module):
    """An exit's own copy of an encoder block's feed-forward half (``head="ffn"``).

    BERT-style blocks (BERT, RoBERTa, MPNet, ELECTRA, ...) compute ``output(intermediate(a), a)`` from the attention
    output ``a``; this module holds copies of ``intermediate`` and ``output`` (dense, dropout, residual LayerNorm) and
    applies them to the same ``a``, so at init the exit equals the block's own output.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.intermediate = copy.deepcopy(layer.intermediate)
        self.output = copy.deepcopy(layer.output)

    def forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(attention_output), attention_output)


def fold_affine(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor, what: str = "the block") -> None:
    """Fold ``h * weight + bias`` applied after ``module`` into its last affine LayerNorm (in place, exact)."""
    lns = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    if not lns or not lns[-1].elementwise_affine:
        raise ValueError(f"cannot fold the exit affine: {what} has no affine LayerNorm")
    ln = lns[-1]
    with torch.no_grad():
        ln.bias.copy_(ln.bias * weight.to(ln.bias) + bias.to(ln.bias))
        ln.weight.mul_(weight.to(ln.weight))


def _check_ffn_layer(layer: nn.Module, k: int) -> None:
    if not (
        isinstance(getattr(layer, "intermediate", None), nn.Module)
        and isinstance(getattr(layer, "output", None), nn.Module)
    ):
        raise ValueError(
            f"head='ffn' needs BERT-style blocks with `intermediate` and `output` sub-modules (BERT, "
            f"RoBERTa, MPNet, ELECTRA); layer {k} is a {type(layer).__name__} without them. Use "
            "head='separate' (an elementwise affine) instead"
        )


class MultiExitHeads(nn.Module):
    """What :func:`add_exits` attaches as ``model.multi_exit``: the exit layers, their heads and bookkeeping.

    Attributes:
        family: one of ``encoder``, ``seq_classifier``, ``causal_lm``, ``timm_vit``, ``timm_resnet``.
        layers: exit layers, 1-based, strictly increasing.
        num_layers: the model's depth ``L`` (blocks, or stages for CNNs).
        head: ``"shared"``, ``"separate"`` or ``"ffn"``.
        heads: ``ModuleDict`` of per-exit modules keyed by ``str(layer)`` (separate heads only).
        exit_embedding: ``ParameterDict`` of per-exit vectors (causal LMs with ``exit_embedding=True``).
        layer_path: dotted path of the HF layer list (HF models).
    """

    def __init__(
        self, family: str, layers: list[int], num_layers: int, head: str, layer_path: str = "", pooling: str = "mean"
    ):
        super().__init__()
        self.family, self.layers, self.num_layers, self.head = family, list(layers), int(num_layers), head
        self.layer_path, self.pooling = layer_path, pooling
        self.heads = nn.ModuleDict()
        self.exit_embedding = nn.ParameterDict()
        self.create_kwargs: dict | None = None

    @property
    def kind(self) -> str:
        """``"embedding"`` for bare encoders, ``"logits"`` otherwise."""
        return "embedding" if self.family == "encoder" else "logits"

    @property
    def deepest(self) -> int:
        return self.layers[-1]

    def extra_repr(self) -> str:
        return f"family={self.family}, layers={self.layers}, num_layers={self.num_layers}, head={self.head!r}"


# ------------------------------------------------------------------------------------------------ model families
def _timm_family(model: nn.Module) -> str | None:
    try:
        from timm.models.resnet import ResNet
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(model, VisionTransformer):
        return "timm_vit"
    if isinstance(model, ResNet):
        return "timm_resnet"
    return None


def model_family(model: nn.Module) -> str:
    """The exit family of ``model`` (see :data:`FAMILIES`); ``ValueError`` naming what was tried otherwise."""
    fam = _timm_family(model)
    if fam:
        return fam
    name = type(model).__name__
    is_hf = hasattr(model, "config") and hasattr(model, "base_model_prefix")
    if not is_hf:
        if hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"add_exits: {name} is a timm-style model with forward_intermediates(), but exits are "
                f"implemented for {_TIMM_SUPPORTED}; tried those classes."
            )
        raise ValueError(
            f"add_exits: cannot locate the layers of {name}: it is neither a Hugging Face model "
            f"({_HF_SUPPORTED}) nor one of {_TIMM_SUPPORTED}."
        )
    find_layer_container(model)  # raises, naming every path tried, when the blocks cannot be found
    if name.endswith("ForCausalLM"):
        if _final_norm(model) is None or model.get_output_embeddings() is None:
            raise ValueError(
                f"add_exits: {name} has no final norm at <base>.norm or no LM head; supported causal LMs "
                "are Llama-family decoders (Llama, Mistral, Qwen2, SmolLM, ...)."
            )
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        if not isinstance(getattr(model, "classifier", None), nn.Module):
            raise ValueError(f"add_exits: {name} has no `classifier` module; supported: {_HF_SUPPORTED}.")
        return "seq_classifier"
    if model.base_model is model and not getattr(model.config, "is_decoder", False):
        return "encoder"
    raise ValueError(f"add_exits: {name} is not supported; supported are {_HF_SUPPORTED} and {_TIMM_SUPPORTED}.")


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    norm = getattr(base, "norm", None) if base is not None else None
    return norm if isinstance(norm, nn.Module) else None


def num_exit_layers(model: nn.Module) -> int:
    """The depth ``L`` in which exit layers are counted: HF layers, ViT blocks or ResNet stages."""
    fam = model_family(model)
    if fam == "timm_vit":
        return len(model.blocks)
    if fam == "timm_resnet":
        return 4
    return len(find_layer_container(model)[1])


def _resnet_stage_width(model: nn.Module, stage: int) -> int:
    layer = getattr(model, f"layer{stage}")
    if len(layer) == 0:
        raise ValueError(f"ResNet stage {stage} (layer{stage}) has no blocks; cannot place an exit there")
    return int(model.feature_info[stage]["num_chs"])


# ------------------------------------------------------------------------------------------------------ add_exits
def _check_layers(layers: Sequence[int], num_layers: int, what: str) -> list[int]:
    if isinstance(layers, (int, str)) or layers is None:
        raise ValueError(f"layers must be a list of exit layers (1..{num_layers}), got {layers!r}")
    out = []
    for v in layers:
        if (
            isinstance(v, bool)
            or not isinstance(v, numbers.Integral)
            and not (torch.is_tensor(v) and v.dim() == 0 and not v.is_floating_point())
        ):
            raise ValueError(f"exit layers must be integers, got {v!r} in {list(layers)}")
        out.append(int(v))
    if not out:
        raise ValueError("add_exits needs at least one exit layer")
    bad = [v for v in out if not 1 <= v <= num_layers]
    if bad:
        raise ValueError(
            f"exit layers {bad} are out of range: the model has {num_layers} {what}, so exits must lie in "
            f"1..{num_layers} (layer k = after the k-th {what[:-1]}), got {out}"
        )
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"exit layers must be strictly increasing, got {out}")
    return out


def add_exits(
    model: nn.Module,
    layers: Sequence[int],
    head: str = "shared",
    *,
    exit_embedding: bool = False,
    pooling: str = "mean",
    create_kwargs: dict | None = None,
) -> nn.Module:
    """Attach exits after the given layers of ``model`` (in place) and return the model.

    Args:
        model: a Hugging Face bare encoder (BERT, MPNet, ...), ``*ForSequenceClassification`` encoder or
            Llama-family ``*ForCausalLM``; or a timm ``VisionTransformer`` / ``ResNet``.
        layers: exit layers, 1-based and strictly increasing: ``k`` is the output of the k-th transformer block
            (HF layer, ViT block) or of ResNet stage ``layerk`` (1..4). Including the last layer makes the model's
            own output the deepest exit (recommended: it is then the self-distillation teacher).
        head: ``"shared"`` (every exit reuses the model's head), ``"separate"`` (small per-exit heads, see the
            module docstring) or, for bare encoders, ``"ffn"`` (a per-exit copy of the exit block's feed-forward
            half). ResNet exits before the last stage need ``"separate"`` (widths differ).
        exit_embedding: causal LMs only: a learned per-exit vector added to the hidden state before the final norm
            (the head is told which exit it serves; MoSE's layer-index conditioning in additive form). Folded into
            the last kept layer's MLP bias by :func:`truncate` (needs a config with ``mlp_bias``, as Llama's).
        pooling: ``"mean"`` or ``"cls"``: how encoder exits are pooled into sentence embeddings.
        create_kwargs: timm only: the keyword arguments the model was built with (``timm.create_model(name,
            **create_kwargs)``); :func:`truncate` rebuilds the smaller model from them.

    Raises:
        ValueError: exits out of range or not increasing, unsupported model family (naming what was tried), a
            shared head that cannot serve an exit, or exits already attached.
    """
    if hasattr(model, ATTR):
        raise ValueError(
            f"{type(model).__name__} already has exits at {getattr(model, ATTR).layers}; call remove_exits(model) first"
        )
    if head not in ("shared", "separate", "ffn"):
        raise ValueError(f"head must be 'shared', 'separate' or 'ffn', got {head!r}")
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    family = model_family(model)
    L = num_exit_layers(model)
    what = "stages" if family == "timm_resnet" else "blocks" if family == "timm_vit" else "layers"
    layers = _check_layers(layers, L, what)
    if head == "ffn" and family != "encoder":
        raise ValueError(
            f"head='ffn' is for bare HF encoders (BertModel, MPNetModel, ...); {type(model).__name__} is "
            f"a {family} model: use head='separate'"
        )
    path = find_layer_container(model)[0] if family in ("encoder", "seq_classifier", "causal_lm") else ""
    heads = MultiExitHeads(family, layers, L, head, layer_path=path, pooling=pooling)
    heads.create_kwargs = dict(create_kwargs) if create_kwargs else None
    if exit_embedding:
        if family != "causal_lm":
            raise ValueError(f"exit_embedding=True is for causal LMs; {type(model).__name__} is a {family} model")
        if not hasattr(model.config, "mlp_bias"):
            raise ValueError(
                f"exit_embedding=True needs a config with `mlp_bias` (Llama) so that truncate() can fold "
                f"the exit vector into the MLP bias; {type(model.config).__name__} has none"
            )
    shallow = [k for k in layers if k != L]
    device = next(model.parameters()).device
    for k in shallow:
        key = str(k)
        if family == "encoder" and head == "separate":
            heads.heads[key] = ExitAffine(model.config.hidden_size)
        elif family == "encoder" and head == "ffn":
            block = model.get_submodule(path)[k - 1]
            _check_ffn_layer(block, k)
            heads.heads[key] = ExitFFN(block)
        elif family == "seq_classifier" and head == "separate":
            pooler = getattr(model.base_model, "pooler", None)
            heads.heads[key] = nn.ModuleDict({"classifier": copy.deepcopy(model.classifier)})
            if isinstance(pooler, nn.Module):
                heads.heads[key]["pooler"] = copy.deepcopy(pooler)
        elif family == "causal_lm":
            if head == "separate":
                heads.heads[key] = copy.deepcopy(_final_norm(model))
            if exit_embedding:
                heads.exit_embedding[key] = nn.Parameter(torch.zeros(model.config.hidden_size))
        elif family == "timm_vit" and head == "separate":
            if getattr(model, "attn_pool", None) is not None:
                raise ValueError(
                    "head='separate' is not supported for ViTs with attention pooling (global_pool="
                    "'map'); use head='shared'"
                )
            heads.heads[key] = nn.ModuleDict(
                {
                    "norm": copy.deepcopy(model.norm),
                    "fc_norm": copy.deepcopy(model.fc_norm),
                    "head": copy.deepcopy(model.head),
                }
            )
        elif family == "timm_resnet":
            width, final = _resnet_stage_width(model, k), int(model.num_features)
            if head == "shared":
                if width != final:
                    raise ValueError(
                        f"head='shared' needs every exit to have the classifier's input width, but the "
                        f"exit at stage {k} has {width} channels and the head expects {final}; use "
                        "head='separate' (a pooled linear classifier per exit)"
                    )
            else:
                if not isinstance(model.fc, nn.Linear):
                    raise ValueError("head='separate' needs a ResNet with a Linear classifier (num_classes > 0)")
                heads.heads[key] = nn.Linear(width, model.fc.out_features)
    heads.to(device)
    model.add_module(ATTR, heads)
    return model


def convert_exit_heads(model: nn.Module, head: str = "ffn") -> nn.Module:
    """Switch a bare encoder's exits to feed-forward heads (``head="ffn"``) without changing any exit's output.

    Each shallow exit gets a copy of its block's feed-forward half; an existing elementwise affine head
    (``head="separate"``) is folded into the copy's LayerNorm, so a model trained with affine heads continues exactly
    where it was. Exits that already have a feed-forward head are kept. Build the optimizer after converting (the
    new heads are new parameters). Returns ``model``.
    """
    ex = get_exits(model)
    if head != "ffn":
        raise ValueError(
            f"convert_exit_heads converts to head='ffn' only (the other direction is not exact), got {head!r}"
        )
    if ex.family != "encoder":
        raise ValueError(f"head='ffn' is for bare HF encoders; this model's exits are {ex.family} exits")
    blocks = model.get_submodule(ex.layer_path)
    for k in ex.layers:
        key = str(k)
        current = ex.heads[key] if key in ex.heads else None
        if k == ex.num_layers or isinstance(current, ExitFFN):
            continue
        _check_ffn_layer(blocks[k - 1], k)
        new = ExitFFN(blocks[k - 1])
        if current is not None:  # an ExitAffine: the only other encoder head
            fold_affine(new.output, current.weight.detach(), current.bias.detach(), f"layer {k}")
        ex.heads[key] = new
    ex.head = "ffn"
    return model


def has_exits(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTR, None), MultiExitHeads)


def get_exits(model: nn.Module) -> MultiExitHeads:
    """``model.multi_exit``; ``ValueError`` if :func:`add_exits` was not called."""
    from .._utils import unwrap_model

    m = unwrap_model(model)
    heads = getattr(m, ATTR, None)
    if not isinstance(heads, MultiExitHeads):
        raise ValueError(
            f"{type(m).__name__} has no exits; call kd_plugins.multiexit.add_exits(model, layers=[...]) first"
        )
    return heads


def remove_exits(model: nn.Module) -> MultiExitHeads:
    """Detach and return ``model.multi_exit`` (the model is then exactly the original architecture)."""
    heads = get_exits(model)
    delattr(model, ATTR)
    return heads


# ---------------------------------------------------------------------------------------------------- exit heads
def _hf_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(get_exits(model).layer_path)


def apply_head(
    model: nn.Module, layer: int, hidden: torch.Tensor, ffn_input: torch.Tensor | None = None
) -> torch.Tensor:
    """The exit output at ``layer`` from the hidden state leaving that layer.

    HF encoders: token states ``[B, T, D]`` (pool them with :func:`pool`); sequence classifiers: logits
    ``[B, C]``; causal LMs: logits ``[..., V]``; timm: logits ``[B, C]``. ``hidden`` is the layer output: token
    states for HF / ViT (prefix tokens included), an NCHW map for ResNet. ``ffn_input``: for ``head="ffn"`` exits,
    the block's attention output (the input of its feed-forward half), which that head needs instead of ``hidden``.
    """
    ex = get_exits(model)
    fam, key = ex.family, str(layer)
    final = layer == ex.num_layers
    if fam == "encoder":
        if key in ex.heads and isinstance(ex.heads[key], ExitFFN):
            if ffn_input is None:
                raise ValueError(
                    f"exit {layer} has a feed-forward head (head='ffn'): pass ffn_input, the attention "
                    f"output of layer {layer} (capture_hidden / exit_outputs record it)"
                )
            return ex.heads[key](ffn_input)
        return ex.heads[key](hidden) if key in ex.heads else hidden
    if fam == "seq_classifier":
        mods = (
            ex.heads[key]
            if key in ex.heads
            else {"classifier": model.classifier, "pooler": getattr(model.base_model, "pooler", None)}
        )
        pooler = mods["pooler"] if "pooler" in mods else None
        x = pooler(hidden) if isinstance(pooler, nn.Module) else hidden
        drop = getattr(model, "dropout", None)
        if isinstance(drop, nn.Dropout) and isinstance(pooler, nn.Module):
            x = drop(x)
        return mods["classifier"](x)
    if fam == "causal_lm":
        if key in ex.exit_embedding:
            hidden = hidden + ex.exit_embedding[key].to(hidden.dtype)
        norm = ex.heads[key] if key in ex.heads else _final_norm(model)
        return model.get_output_embeddings()(norm(hidden))
    if fam == "timm_vit":
        if key in ex.heads:
            h = ex.heads[key]
            x = model.pool(h["norm"](hidden))
            x = h["fc_norm"](x)
            return h["head"](model.head_drop(x))
        return model.forward_head(model.norm(hidden))
    if fam == "timm_resnet":
        if key in ex.heads:
            return ex.heads[key](torch.flatten(nn.functional.adaptive_avg_pool2d(hidden, 1), 1))
        if not final and hidden.shape[1] != model.num_features:
            raise ValueError(
                f"exit {layer} has {hidden.shape[1]} channels; the shared head expects {model.num_features}"
            )
        return model.forward_head(hidden)
    raise AssertionError(fam)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str = "mean") -> torch.Tensor:
    """Sentence embedding from token states: attention-mask mean (``"mean"``) or the first token (``"cls"``)."""
    from ..losses.feature import mean_pool

    return mean_pool(hidden, attention_mask) if pooling == "mean" else hidden[:, 0]


# -------------------------------------------------------------------------------------------- one-pass outputs
class HiddenStore(dict):
    """``layer -> hidden`` from :func:`capture_hidden`; ``ffn_inputs``: ``layer -> attention output`` for the layers
    whose exit has a feed-forward head (``head="ffn"``)."""

    def __init__(self):
        super().__init__()
        self.ffn_inputs: dict[int, torch.Tensor] = {}


def ffn_head_layers(model: nn.Module) -> set[int]:
    """Exit layers whose head is an :class:`ExitFFN` (they need the block's attention output)."""
    ex = get_exits(model)
    return {int(k) for k, h in ex.heads.items() if isinstance(h, ExitFFN)}


def hook_ffn_input(block: nn.Module, store: dict, k: int):
    """Forward pre-hook on ``block.intermediate`` recording its input (the attention output) as ``store[k]``."""

    def pre(mod, args):
        store[k] = args[0]

    return block.intermediate.register_forward_pre_hook(pre)


@contextlib.contextmanager
def capture_hidden(model: nn.Module, layers: Sequence[int]):
    """Context manager: forward hooks on the given (1-based) HF layers; yields a :class:`HiddenStore`
    (``layer -> hidden``, plus ``.ffn_inputs`` for feed-forward exit heads).

    Hooks exist only inside the ``with`` block, so copies and saved models never carry them.
    """
    mods = _hf_layers(model)
    store = HiddenStore()
    ffn = ffn_head_layers(model)
    handles = []
    for k in layers:

        def hook(mod, args, out, k=k):
            store[k] = out[0] if isinstance(out, (tuple, list)) else out

        handles.append(mods[k - 1].register_forward_hook(hook))
        if k in ffn:
            handles.append(hook_ffn_input(mods[k - 1], store.ffn_inputs, k))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _model_inputs(inputs: dict) -> dict:
    return {
        k: v
        for k, v in inputs.items()
        if k not in ("labels", "num_items_in_batch", "return_loss") and not k.startswith("positive_")
    }


def exit_outputs(model: nn.Module, *args, return_model_output: bool = False, **inputs):
    """Run ``model`` once and return every exit's output, ``OrderedDict(layer -> tensor)``, shallow to deep.

    HF: call with the model's keyword inputs (``input_ids=..., attention_mask=...``); encoders give token states,
    classifiers / LMs logits. timm: call with the image batch; gives logits. With ``return_model_output=True``
    returns ``(exits, model_output)``; the model output is the unmodified forward result (HF models) or ``None``.
    """
    ex = get_exits(model)
    if ex.family.startswith("timm"):
        if len(args) != 1 or inputs:
            raise ValueError("timm models: call exit_outputs(model, images)")
        outs = _timm_exit_outputs(model, args[0])
        return (outs, None) if return_model_output else outs
    if args:
        raise ValueError("HF models: call exit_outputs(model, input_ids=..., attention_mask=...)")
    L = ex.num_layers
    shallow = [k for k in ex.layers if k != L]
    fwd = _model_inputs(inputs)
    if ex.family == "causal_lm":
        fwd.setdefault("use_cache", False)
    with capture_hidden(model, shallow) as store:
        out = model(**fwd)
    result = _assemble(model, ex, store, out)
    return (result, out) if return_model_output else result


def _assemble(model, ex: MultiExitHeads, store: dict, out) -> OrderedDict[int, torch.Tensor]:
    result: OrderedDict[int, torch.Tensor] = OrderedDict()
    for k in ex.layers:
        if k == ex.num_layers:
            result[k] = out["last_hidden_state"] if ex.family == "encoder" else out["logits"]
        else:
            if k not in store:
                raise RuntimeError(f"layer {k} did not run during the forward pass; cannot compute its exit")
            result[k] = apply_head(model, k, store[k], ffn_input=getattr(store, "ffn_inputs", {}).get(k))
    return result


def _timm_exit_outputs(model: nn.Module, x: torch.Tensor) -> OrderedDict[int, torch.Tensor]:
    ex = get_exits(model)
    L = ex.num_layers
    result: OrderedDict[int, torch.Tensor] = OrderedDict()
    if ex.family == "timm_vit":
        idx = [k - 1 for k in ex.layers]
        r = model.forward_intermediates(
            x,
            indices=idx,
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            output_dict=True,
            stop_early=ex.deepest != L,
        )
        inter = r["image_intermediates"]
        prefix = r.get("image_intermediates_prefix")
        for n, k in enumerate(ex.layers):
            tokens = inter[n] if prefix is None else torch.cat([prefix[n], inter[n]], dim=1)
            if k == L:
                result[k] = model.forward_head(r["image_features"])
            else:
                result[k] = apply_head(model, k, tokens)
        return result
    # ResNet: forward_intermediates index i = stage layer_i (0 is the stem)
    final, inter = model.forward_intermediates(x, indices=list(ex.layers), stop_early=ex.deepest != L)
    for n, k in enumerate(ex.layers):
        result[k] = model.forward_head(final) if k == L else apply_head(model, k, inter[n])
    return result


def exit_embeddings(model: nn.Module, normalize: bool = False, **inputs) -> OrderedDict[int, torch.Tensor]:
    """Pooled sentence embeddings ``[B, D]`` of every exit of an HF encoder (pooling as set in :func:`add_exits`)."""
    ex = get_exits(model)
    if ex.family != "encoder":
        raise ValueError(f"exit_embeddings is for bare encoders; this model's exits give {ex.kind}")
    outs = exit_outputs(model, **inputs)
    am = inputs.get("attention_mask")
    res = OrderedDict()
    for k, h in outs.items():
        e = pool(h, am, ex.pooling)
        res[k] = nn.functional.normalize(e, dim=-1) if normalize else e
    return res
