"""Fused / low-level kernels.

Importing this package never imports ``triton`` (it is an optional dependency): Triton code is loaded lazily, on
the first call that needs it.

* :func:`fused_linear_kd_loss` / :class:`FusedLinearKDLoss`: memory-efficient ``lm_head`` + distillation loss
  (chunked PyTorch; ``backend="triton"`` for the fused Triton kernels).
* :func:`check_fusable_head`, :func:`fused_kd_loss_from_heads`: integration helpers for the trainer callback.
* ``int8_gemm``: int8 GEMM kernels (own module; its public names are also reachable from this package lazily).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .fused_linear_kd import (
    DIVERGENCE_ALIASES,
    FusedLinearKDLoss,
    UnfusableHeadError,
    check_fusable_head,
    fused_kd_loss_from_heads,
    fused_linear_kd_loss,
)

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "fused_kd_loss_from_heads",
    "check_fusable_head",
    "UnfusableHeadError",
    "DIVERGENCE_ALIASES",
    "triton_available",
]


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors, slowly, for testing)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _require_triton_runtime(tensor: torch.Tensor) -> None:
    """Raise a clear error when the Triton backend cannot run on ``tensor``'s device."""
    if not triton_available():
        raise RuntimeError("backend='triton' needs the optional `triton` package (pip install 'kd-plugins[gpu]'); "
                           "use backend='torch' (chunked PyTorch, same loss) instead.")
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and triton_interpreter_enabled():
        return
    raise RuntimeError(
        f"backend='triton' runs on CUDA tensors, got tensors on {tensor.device}"
        f"{'' if torch.cuda.is_available() else ' and no CUDA device is available'}. Use backend='torch' "
        "(chunked PyTorch, same loss), or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU "
        "in Triton's (slow) interpreter for debugging.")


def __getattr__(name: str):
    # Lazily expose the int8 GEMM module (and its public names) without importing triton at package import time.
    if name.startswith("__"):
        raise AttributeError(name)
    for mod_name in ("int8_gemm",):
        if importlib.util.find_spec(f"{__name__}.{mod_name}") is None:
            continue
        if name == mod_name:
            return importlib.import_module(f"{__name__}.{mod_name}")
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        public = getattr(mod, "__all__", None)
        if (public is None or name in public) and hasattr(mod, name) and not name.startswith("_"):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
