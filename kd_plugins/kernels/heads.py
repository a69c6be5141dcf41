"""Whether a model's output head can be fused: is it exactly ``logits = hidden @ W.T (+ b)``?

The fused loss (:func:`kd_plugins.kernels.fused_linear_kd_loss`) bypasses the head module and multiplies by its weight
directly; :func:`check_fusable_head` refuses every head or model config for which that would optimise a different
objective than the plain path.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["UnfusableHeadError", "check_fusable_head"]


class UnfusableHeadError(ValueError):
    """The model's output head is not a plain ``logits = hidden @ W.T + b``; the fused loss would optimise a
    different objective than the plain path, so it refuses instead."""


#: Config attributes that change the logits after the ``lm_head`` matmul -> why the fused path refuses them.
_LOGIT_TRANSFORM_ATTRS = (
    ("final_logit_softcapping", "logit soft-capping `tanh(logits / c) * c` (Gemma-2/3)"),
    ("logit_scale", "logit scaling `logits * logit_scale` (Cohere/Command-R)"),
    ("logits_scaling", "logit scaling `logits / logits_scaling` (Granite)"),
    ("lm_head_multiplier", "logit multiplier `logits * lm_head_multiplier` (Falcon-H1)"),
    ("output_multiplier_scale", "logit multiplier `logits * output_multiplier_scale` (Grok)"),
    ("mup_output_multiplier", "muP output multiplier"),
    ("dim_model_base", "hidden-state rescaling `h / (hidden_size / dim_model_base)` before the head (MiniCPM)"),
)
#: Values meaning "no transform" for the attributes above.
_NEUTRAL = (None, 1, 1.0, False)
#: T5-family model types that rescale the decoder output by ``d_model**-0.5`` before a tied head.
_T5_TYPES = ("t5", "mt5", "umt5", "longt5")


def _configs(model) -> list:
    """The model config and, when different, its text sub-config (multimodal models)."""
    cfg = getattr(model, "config", None)
    out = [cfg] if cfg is not None else []
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            text = cfg.get_text_config()
        except Exception:  # pragma: no cover - unusual configs
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def _check_plain_linear(name: str, head) -> None:
    """The head itself: a materialised, floating-point, hook-free ``nn.Linear`` with the stock ``forward``."""
    if head is None:
        raise UnfusableHeadError(
            f"{name} has no output head (get_output_embeddings() returned None); "
            "the fused loss needs the lm_head weight. Use fused_loss=False."
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise UnfusableHeadError(
            f"{name}'s output head is {type(head).__module__}.{type(head).__name__}, not a plain nn.Linear "
            "(LoRA/PEFT-wrapped, quantised or custom heads compute something other than hidden @ W.T + b). "
            "Use fused_loss=False, or merge/unwrap the head first."
        )
    w = head.weight
    if not torch.is_floating_point(w):
        raise UnfusableHeadError(
            f"{name}'s lm_head weight has dtype {w.dtype}; the fused loss needs a "
            "floating-point weight. Use fused_loss=False."
        )
    if w.device.type == "meta":
        raise UnfusableHeadError(
            f"{name}'s lm_head weight is on the meta device (offloaded); the fused loss needs "
            "the materialised weight. Use fused_loss=False or keep the head on the GPU."
        )
    if head._forward_hooks or head._forward_pre_hooks:
        raise UnfusableHeadError(
            f"{name}'s lm_head has forward hooks registered, which may change its output; the "
            "fused loss bypasses the module. Use fused_loss=False or remove the hooks."
        )


def _check_no_logit_transform(name: str, model) -> None:
    """The model config (and its text sub-config) applies nothing to the logits after the head's matmul."""
    for cfg in _configs(model):
        for attr, what in _LOGIT_TRANSFORM_ATTRS:
            val = getattr(cfg, attr, None)
            if val not in _NEUTRAL:
                raise UnfusableHeadError(
                    f"{name} applies {what} ({attr}={val!r}); the fused loss computes hidden @ W.T + b only and "
                    "would optimise a different objective. Use fused_loss=False."
                )
        if getattr(cfg, "model_type", None) in _T5_TYPES and getattr(cfg, "tie_word_embeddings", False):
            raise UnfusableHeadError(
                f"{name} rescales the decoder output by d_model**-0.5 before its tied head; use fused_loss=False."
            )


def check_fusable_head(model: nn.Module, head: nn.Module | None = None) -> nn.Linear:
    """Return the output head of ``model`` if the fused loss computes exactly the model's logits, else raise.

    The fused loss assumes ``logits = last_hidden_state @ head.weight.T (+ head.bias)``. This checks, in order:

    1. the head (``head`` if given, else ``model.get_output_embeddings()``, else ``model`` itself when it is a bare
       head module) exists and is a plain ``nn.Linear``:
       its class's ``forward`` is ``nn.Linear.forward`` (refuses LoRA/PEFT-wrapped heads, quantised heads such as
       bitsandbytes ``Linear8bitLt``/``Linear4bit``, custom ``forward`` overrides) with a floating-point weight that
       is materialised (not on the ``meta`` device, i.e. not CPU/disk-offloaded);
    2. no forward (pre-)hooks are registered on the head (they may rewrite its input or output);
    3. the model config (and its text sub-config) applies no transform to the logits: Gemma-2/3
       ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
       ``lm_head_multiplier``, Grok ``output_multiplier_scale``, muP ``mup_output_multiplier``, MiniCPM
       ``dim_model_base`` (hidden rescaling); T5-family models with tied embeddings (``d_model**-0.5`` rescaling).

    Tied input/output embeddings are fine when the head is a plain ``nn.Linear`` (the gradient goes to the shared
    weight). Raises :class:`UnfusableHeadError` (a ``ValueError``) naming the reason and the fix
    (``fused_loss=False``).
    """
    name = type(model).__name__
    if head is None:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else model  # ``model`` may be the head module itself
    _check_plain_linear(name, head)
    _check_no_logit_transform(name, model)
    return head
