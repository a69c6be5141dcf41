"""Fused / low-level kernels.

Importing this package never imports ``triton`` (it is an optional dependency): Triton code is loaded lazily, on
the first call that needs it.

* :func:`fused_linear_kd_loss` / :class:`FusedLinearKDLoss`: memory-efficient ``lm_head`` + distillation loss
  (chunked PyTorch; ``backend="triton"`` for the fused Triton kernels).
* :func:`check_fusable_head`, :func:`fused_kd_loss_from_heads`: integration helpers for the trainer callback.
* :func:`spread_tail`: a dense teacher row rebuilt around exact head log-probs (the fused kernel's
  ``teacher_exact_head``; low-rank teacher caches).
* ``int8_gemm``: int8 GEMM kernels (own module; its public names are also reachable from this package lazily).
* ``cpu_int8``: native CPU passes of the int8 layers (C, compiled on first use; the eager PyTorch steps' results).
* :func:`triton_available`, :func:`interpreter_enabled`: whether Triton kernels can run (the one reader of
  ``TRITON_INTERPRET``, with Triton's own rule).
"""

from __future__ import annotations

import importlib
import importlib.util

from ._spec import spread_tail
from ._triton import interpreter_enabled, triton_available
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
    "spread_tail",
    "triton_available",
    "interpreter_enabled",
]

#: Old name of :func:`interpreter_enabled`.
triton_interpreter_enabled = interpreter_enabled

#: Submodules whose public names are reachable from this package lazily (they import triton).
_LAZY_MODULES = ("int8_gemm",)


def __getattr__(name: str):
    # Lazily expose the int8 GEMM module (and its public names) without importing triton at package import time.
    if name.startswith("__"):
        raise AttributeError(name)
    for mod_name in _LAZY_MODULES:
        if importlib.util.find_spec(f"{__name__}.{mod_name}") is None:
            continue
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        if name == mod_name:
            return mod
        public = getattr(mod, "__all__", None)
        if (public is None or name in public) and hasattr(mod, name) and not name.startswith("_"):
            return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
