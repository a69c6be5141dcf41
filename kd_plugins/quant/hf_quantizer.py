"""Load :func:`~kd_plugins.quant.save_quantized` checkpoints with plain ``AutoModel*.from_pretrained(dir)``.

``save_quantized`` writes a ``quantization_config`` with ``quant_method: "kd_plugins_w8a8"`` into ``config.json``;
this module registers, through transformers' public ``register_quantization_config`` / ``register_quantizer``,

* :class:`KDQuantConfig` -- the parsed ``quantization_config`` (method, alpha, per-layer table), and
* :class:`KDQuantHfQuantizer` -- a pre-quantized-only ``HfQuantizer`` that swaps the listed ``nn.Linear`` (and 1x1
  ``nn.Conv2d``) modules of the freshly built (meta-device) model for :class:`~kd_plugins.quant.QuantizedLinear`
  before the weights are read, lets the int8 / float32 buffers load in their stored dtypes, and afterwards verifies
  every loaded tensor against the SHA-256 checksums of ``quant_config.json`` next to the weights.

Registration happens on ``import kd_plugins`` (lazily: see :mod:`kd_plugins._hf_register`) or explicitly with
:func:`register`. With a transformers lacking that API, ``from_pretrained`` is simply unsupported and
:func:`~kd_plugins.quant.load_quantized` -- the reference, always-verified path -- keeps working.

Without kd_plugins, ``from_pretrained`` on such a checkpoint raises (``config.json`` carries a load guard, see
:data:`kd_plugins._checkpoint.HF_LOAD_GUARD_KEY`, that this quantizer drops) instead of initialising the quantized
layers at random (a re-save through ``model.save_pretrained`` has no guard: transformers drops that key when it
writes ``config.json``; use ``save_quantized``). A checkpoint written by a newer kd_plugins (newer ``format_version``,
unknown method) is refused with a message to upgrade.

What ``from_pretrained`` guarantees: with the default ``dtype="auto"`` and the checkpoint directory as written by
``save_quantized`` (``quant_config.json`` present) and the same model class, every tensor of the loaded model is checked
against the saved checksums (dtype, shape, SHA-256; the key set must match exactly), so the outputs are bit-identical
to the saved model and to ``load_quantized``'s; any mismatch raises :class:`~kd_plugins.quant.QuantizedCheckpointError`.
Caveats:

* ``dtype=`` other than the saved float dtype: the quantized layers' int8 / float32 buffers are kept as stored, the
  other float tensors are cast (a warning says outputs are then not bit-identical) and not checksummed.
* No ``quant_config.json`` next to the weights (e.g. a Hub repo loaded by id -- transformers only downloads
  ``config.json`` and the weights -- or a re-save through ``model.save_pretrained``): the model loads with a warning
  and without checksum verification. Use ``load_quantized(snapshot_dir)`` when you need the verification.
* Another class of the same architecture (``AutoModel`` on a ``*ForCausalLM`` checkpoint, an added head): layer and
  tensor names are mapped through ``base_model_prefix``; only the tensors present on both sides are verified and
  transformers reports the missing / unexpected ones as usual.
* ``device_map`` placing modules on one device per module works (buffers go where their module goes); disk offload
  is refused. Training / ``dequantize()`` are not supported (``is_trainable = False``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._checkpoint import HF_LOAD_GUARD_KEY, tensor_sha256
from .layers import QuantizedLinear, is_pointwise_conv
from .serialization import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    HF_QUANT_METHOD,
    QuantizedCheckpointError,
    _restore_buffer_dtypes,
    check_supported,
    layer_kwargs,
    read_quant_manifest,
)

__all__ = ["KDQuantConfig", "KDQuantHfQuantizer", "register", "HF_QUANT_METHOD"]

logger = logging.getLogger("kd_plugins.quant")

_LAYER_KEYS = ("kind", "in_features", "out_features", "bias", "method")


class KDQuantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a kd_plugins W8A8 checkpoint (written by :func:`~kd_plugins.quant.save_quantized`).

    Args:
        method: the quantization method (``crossquant_dynamic_int8``, ``crossquant``, ``per_token``, ``smoothquant``,
            ``crossquant_dynamic``).
        alpha: the global alpha (``None`` for per_token, ``"per_layer"`` / ``"auto"`` when ``layer_alpha`` is used).
        layers: ``{module name: {kind, in_features, out_features, bias, method, alpha, stride, mode}}`` (plus
            ``fallback``, ``fallback_rows``, ``compile_quantizer`` for ``crossquant_dynamic_int8``); every listed
            module is a :class:`~kd_plugins.quant.QuantizedLinear` with its own method / alpha.
        layer_alpha: the per-layer alphas, when they were chosen per layer.
        float_dtype: dtype of the non-quantized parameters (``None``: mixed).
        buffer_dtypes: dtypes of the non-persistent float buffers (RoPE ``inv_freq``, ...), which are recomputed.
    """

    def __init__(
        self,
        method: str | None = None,
        alpha: float | str | None = None,
        layers: dict[str, dict[str, Any]] | None = None,
        layer_alpha: dict[str, float] | None = None,
        float_dtype: str | None = None,
        buffer_dtypes: dict[str, str] | None = None,
        format: str = FORMAT,  # noqa: A002 - the JSON key
        format_version: int = FORMAT_VERSION,
        quant_method: str = HF_QUANT_METHOD,
        **kwargs,
    ):
        if quant_method != HF_QUANT_METHOD:
            raise ValueError(f"KDQuantConfig is for quant_method {HF_QUANT_METHOD!r}, got {quant_method!r}")
        if format != FORMAT:
            raise ValueError(f"quantization_config format is {format!r}, expected {FORMAT!r}")
        if not isinstance(layers, dict) or not layers:
            raise ValueError("quantization_config has no 'layers' table: not a kd_plugins W8A8 checkpoint")
        for name, entry in layers.items():
            missing = [k for k in _LAYER_KEYS if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise ValueError(f"quantization_config layer {name!r} lacks {missing}")
        check_supported(format_version, layers, "the quantization_config of config.json")
        self.quant_method = HF_QUANT_METHOD
        self.format = FORMAT
        self.format_version = int(format_version)
        self.method = method
        self.alpha = alpha
        self.layer_alpha = dict(layer_alpha) if layer_alpha else None
        self.float_dtype = float_dtype
        self.buffer_dtypes = dict(buffer_dtypes) if buffer_dtypes else {}
        self.layers = {str(n): dict(e) for n, e in layers.items()}


def _map_name(model: nn.Module, name: str, exists) -> str | None:
    """``name`` as saved -> the name in ``model`` (same, or with ``base_model_prefix`` stripped / added)."""
    if exists(name):
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and exists(name[len(prefix) + 1 :]):
            return name[len(prefix) + 1 :]
        if exists(f"{prefix}.{name}"):
            return f"{prefix}.{name}"
    return None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class KDQuantHfQuantizer(HfQuantizer):
    """Pre-quantized loading of kd_plugins W8A8 checkpoints (see the module docstring for the guarantees)."""

    requires_calibration = True  # pre-quantized checkpoints only: quantizing needs kd_plugins.quant.quantize
    quantization_config: KDQuantConfig

    def __init__(self, quantization_config: KDQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._cast = False
        self._saved: dict[str, Any] | None = None  # the quant_config.json manifest, when found next to the weights
        self._names: dict[str, str] = {}  # saved layer name -> model layer name
        self._checkpoint_dir: Path | None = None

    # ------------------------------------------------------------------ checks before building
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("kd_plugins W8A8 checkpoints cannot be disk-offloaded; use a device_map without 'disk'")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        saved = self.quantization_config.float_dtype
        if saved is not None and isinstance(dtype, torch.dtype) and str(dtype).replace("torch.", "") != saved:
            self._cast = True
            logger.warning(
                "kd_plugins W8A8: loading with dtype=%s but the checkpoint's float tensors are %s; the quantized "
                "layers keep their int8/float32 buffers, the other float tensors are cast, so outputs will not be "
                "bit-identical to the saved model (use the default dtype='auto' or load_quantized for that)",
                dtype,
                saved,
            )
        return dtype

    # ------------------------------------------------------------------ the load guard
    def update_attn_implementation(self, config):
        """Drop the load guard of ``config.json`` (:data:`~kd_plugins.quant.serialization.HF_LOAD_GUARD`).

        transformers reads that key as the weights file name and refuses it, which is what makes plain
        ``from_pretrained`` (kd_plugins not imported) fail loudly; this is the one quantizer hook that sees the config
        before the weights file is resolved, so it is dropped here.
        """
        config = super().update_attn_implementation(config)
        guard = getattr(config, HF_LOAD_GUARD_KEY, None)
        if isinstance(guard, str) and guard.startswith("kd_plugins"):
            delattr(config, HF_LOAD_GUARD_KEY)
        return config

    # ------------------------------------------------------------------ module swap
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = self.quantization_config.layers
        self._checkpoint_dir, self._saved = None, None
        if checkpoint_files:
            self._checkpoint_dir = Path(checkpoint_files[0]).parent
            if (self._checkpoint_dir / CONFIG_NAME).is_file():
                self._saved = read_quant_manifest(self._checkpoint_dir)
                if self._saved["metadata"]["layers"] != layers:
                    raise QuantizedCheckpointError(
                        f"{self._checkpoint_dir / CONFIG_NAME} and the quantization_config of config.json describe "
                        "different quantized layers (one of them was edited)"
                    )
        # resolve and check every layer before touching the model
        targets: dict[str, tuple[str, dict]] = {}
        for sname, entry in layers.items():
            mname = _map_name(model, sname, lambda n: _has_module(model, n))
            if mname is None:
                if self._same_class(model):
                    raise QuantizedCheckpointError(
                        f"{type(model).__name__} has no module {sname!r} listed in the quantization_config"
                    )
                continue  # e.g. a head that this class does not have
            sub = model.get_submodule(mname)
            if entry["kind"] == "linear":
                ok = isinstance(sub, nn.Linear) and (sub.in_features, sub.out_features) == (
                    entry["in_features"],
                    entry["out_features"],
                )
            else:
                ok = is_pointwise_conv(sub) and (sub.in_channels, sub.out_channels) == (
                    entry["in_features"],
                    entry["out_features"],
                )
            if not ok:
                raise QuantizedCheckpointError(
                    f"module {mname} is {sub!r}, which does not match the saved {entry['kind']} "
                    f"{entry['in_features']}->{entry['out_features']}"
                )
            targets[mname] = (sname, entry)
        self._names = {s: m for m, (s, _) in targets.items()}
        for mname, (_, entry) in targets.items():
            device = next(iter(model.get_submodule(mname).parameters())).device  # meta during from_pretrained
            with torch.device(device):
                q = QuantizedLinear(
                    entry["in_features"],
                    entry["out_features"],
                    bias=entry["bias"],
                    method=entry["method"],
                    alpha=entry.get("alpha"),
                    kind=entry["kind"],
                    stride=tuple(entry.get("stride", (1, 1))),
                    mode=entry.get("mode", "int8"),
                    **layer_kwargs(entry),
                )
            parent_name, _, leaf = mname.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, q)
        # A quantized layer has no `.weight` to tie (a quantized, tied lm_head was untied by quantize()).
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for key, src in list(tied.items()):
                if any(key.startswith(m + ".") or src.startswith(m + ".") for m in targets):
                    tied.pop(key)
        return model

    def _same_class(self, model) -> bool:
        """Is ``model`` of the class that was saved (then every layer and tensor must match exactly)?"""
        arch = (self._saved or {}).get("architecture") or {}
        if arch:
            return arch.get("kind") == "hf" and arch.get("class") == type(model).__name__
        saved = getattr(getattr(model, "config", None), "architectures", None) or []
        return type(model).__name__ in saved

    # ------------------------------------------------------------------ verification after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        # every buffer of a quantized layer must come from the checkpoint (otherwise it is uninitialized memory)
        for sname, mname in self._names.items():
            for bname, buf in model.get_submodule(mname).named_buffers(recurse=False):
                if buf is not None and (buf.is_meta or not getattr(buf, "_is_hf_initialized", False)):
                    raise QuantizedCheckpointError(
                        f"the checkpoint has no tensor for {mname}.{bname} (quantized layer {sname}): incomplete or "
                        "edited checkpoint"
                    )
        if not self._cast:
            buffers = {n for n, _ in model.named_buffers()}
            _restore_buffer_dtypes(
                model,
                self.quantization_config.buffer_dtypes or self._saved_metadata.get("buffer_dtypes"),
                rename=lambda n: _map_name(model, n, lambda k: k in buffers),
            )
        if self._saved is not None:
            self._verify(model)
        else:
            logger.warning(
                "kd_plugins W8A8: no %s next to the weights%s, so the loaded tensors were NOT checked against the "
                "saved SHA-256 checksums; kd_plugins.quant.load_quantized(<checkpoint dir>) is the verified path",
                CONFIG_NAME,
                f" ({self._checkpoint_dir})" if self._checkpoint_dir else "",
            )
        qc = self.quantization_config
        model.kd_quantization = {
            "method": qc.method,
            "alpha": qc.alpha,
            "skip": self._saved_metadata.get("skip", []),
            "default_skip": self._saved_metadata.get("default_skip", True),
            "layers": sorted(self._names.values()),
        }
        if qc.layer_alpha:
            model.kd_quantization["layer_alpha"] = {self._names.get(n, n): a for n, a in qc.layer_alpha.items()}
        return model

    @property
    def _saved_metadata(self) -> dict[str, Any]:
        return self._saved["metadata"] if self._saved is not None else {}

    def _verify(self, model) -> None:
        saved = self._saved
        state = model.state_dict()
        strict = self._same_class(model)
        layer_prefixes = tuple(m + "." for m in self._names.values())
        aliases = saved.get("aliases", {})
        mapped: dict[str, str] = {}  # saved tensor name -> model key
        for sname in list(saved["tensors"]) + list(aliases):
            k = _map_name(model, sname, lambda n: n in state)
            if k is None:
                if strict:
                    raise QuantizedCheckpointError(f"the loaded model has no tensor {sname!r} of the checkpoint")
                continue
            mapped[sname] = k
        if strict:
            extra = sorted(set(state) - set(mapped.values()))
            if extra:
                raise QuantizedCheckpointError(
                    f"the loaded model has tensors the checkpoint does not: {extra[:5]} (they were initialized, not "
                    "loaded); outputs would not match the saved model"
                )
        bad, cast = [], 0
        for sname, k in mapped.items():
            meta = saved["tensors"][aliases.get(sname, sname)]
            t = state[k]
            dtype = str(t.dtype).replace("torch.", "")
            if list(t.shape) != list(meta["shape"]):
                bad.append(f"{k}: shape {tuple(t.shape)}, saved {tuple(meta['shape'])}")
            elif dtype != meta["dtype"]:
                if self._cast and t.is_floating_point() and not k.startswith(layer_prefixes):
                    cast += 1
                    continue
                bad.append(f"{k}: dtype {dtype}, saved {meta['dtype']}")
            elif tensor_sha256(t) != meta["sha256"]:
                bad.append(f"{k}: checksum mismatch")
        if bad:
            raise QuantizedCheckpointError(
                f"{len(bad)} loaded tensor(s) differ from the saved checkpoint ({self._checkpoint_dir}): {bad[:5]}. "
                "Outputs would not be bit-identical; use kd_plugins.quant.load_quantized"
            )
        if cast:
            logger.info("kd_plugins W8A8: %d float tensors were cast to the requested dtype and not checksummed", cast)

    # ------------------------------------------------------------------ capabilities
    def is_serializable(self, *args, **kwargs) -> bool:
        # model.save_pretrained works (buffers + quantization_config), but writes no quant_config.json:
        # use kd_plugins.quant.save_quantized for checkpoints that load_quantized can verify.
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> bool:
    """Register :class:`KDQuantConfig` / :class:`KDQuantHfQuantizer` under ``"kd_plugins_w8a8"`` with transformers.

    Idempotent (also across a reload of this module). Returns ``True`` when ``from_pretrained`` can load kd_plugins
    checkpoints, ``False`` when this transformers has no quantizer registry or another package owns the name.
    """
    try:
        from transformers.quantizers import auto as qauto
    except Exception:  # noqa: BLE001 - transformers too old/new: from_pretrained unsupported, load_quantized works
        return False
    cfg_map = getattr(qauto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    q_map = getattr(qauto, "AUTO_QUANTIZER_MAPPING", None)
    reg_cfg = getattr(qauto, "register_quantization_config", None)
    reg_q = getattr(qauto, "register_quantizer", None)
    if not isinstance(cfg_map, dict) or not isinstance(q_map, dict) or reg_cfg is None or reg_q is None:
        return False
    ok = True
    for mapping, cls, reg in ((cfg_map, KDQuantConfig, reg_cfg), (q_map, KDQuantHfQuantizer, reg_q)):
        current = mapping.get(HF_QUANT_METHOD)
        if current is cls:
            continue
        if current is None:
            reg(HF_QUANT_METHOD)(cls)
        elif getattr(current, "__module__", "") == __name__:
            mapping[HF_QUANT_METHOD] = cls  # this module was reloaded: replace our own stale class
        else:
            logger.warning(
                "kd_plugins: quant_method %r is already registered by %s; not overriding it",
                HF_QUANT_METHOD,
                getattr(current, "__module__", current),
            )
            ok = False
    return ok


# Importing this module registers (also covers an import of it that itself triggered transformers' registry import,
# when the post-import hook of kd_plugins._hf_register found this module still half-initialized).
try:
    register()
except Exception:  # noqa: BLE001 - never fail the import; from_pretrained is then simply unsupported
    logger.debug("kd_plugins: registering the W8A8 quantizer with transformers failed", exc_info=True)
