"""Quantized teachers: ``DistillationConfig(teacher_quantization="int8" | "nf4")``.

A teacher only runs forward passes under ``no_grad``, so its linear layers can be stored in fewer bits. The
conversion runs once, when :class:`~kd_plugins.distill.teacher.Teacher` places the teacher (after the
``teacher_dtype`` cast, before the move to its device, so the float weights never reach that device):

* ``"int8"``: kd_plugins' own W8A8 path, :func:`kd_plugins.quant.quantize` with ``method="per_token"``: int8 weights
  per output channel, activations quantized per token (row ``i`` with step ``max_j |x_ij| / 127``), int8 GEMMs
  (``torch._int_mm`` on CPU, Triton on CUDA). No calibration data. Runs wherever kd_plugins runs.
* ``"nf4"``: bitsandbytes ``Linear4bit`` (4-bit NormalFloat weights in blocks of 64, ``compute_dtype`` the
  teacher's float dtype). Needs ``pip install bitsandbytes`` (its CPU backend runs on x86-64 with AVX2; the fast
  kernels are CUDA's).

Why ``per_token`` and not the quantizer's default ``crossquant_dynamic_int8``: that method measures the column
maxima of each call's whole ``[tokens, features]`` input, so a token's teacher output depends on which other rows
(other sequences, padding, another rank's micro-batch) share the call. A teacher's target for an example should not
change with batch composition, shuffling or the number of ranks; per-token steps depend on the row alone, so the
int8 teacher gives every row the same output whatever it is batched with (``tests/test_teacher_quant.py`` checks it,
and that the default method does not).

Both keep the layers :func:`kd_plugins.quant.find_quantizable` skips by default in float: the output head
(``lm_head``, classifier), embeddings and norms. The output head is small next to the body of a large teacher, sets
the logits the student learns from most directly, and the fused linear+KD path reads its float weight.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..quant import find_quantizable, quantize
from .config import TEACHER_QUANTIZATIONS

__all__ = ["quantize_teacher", "teacher_memory_bytes", "INT8_TEACHER_METHOD", "require_bitsandbytes"]

logger = logging.getLogger("kd_plugins.distill")

#: The ``kd_plugins.quant`` method behind ``teacher_quantization="int8"`` (see the module docstring for why).
INT8_TEACHER_METHOD = "per_token"

_BNB_HINT = (
    "teacher_quantization='nf4' needs bitsandbytes: `pip install bitsandbytes` (CUDA GPUs, or its CPU backend on "
    "x86-64 with AVX2). Without it use teacher_quantization='int8' (kd_plugins' own int8 path, no extra package)."
)


def require_bitsandbytes():
    """Import bitsandbytes or raise ``ImportError`` saying how to install it and what it needs."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(_BNB_HINT) from e
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` already holds int8 (kd_plugins) or bitsandbytes 4/8-bit layers."""
    return hasattr(module, "kd_quantization") or any(
        type(m).__module__.startswith("bitsandbytes") for m in module.modules()
    )


def quantize_teacher(teacher: nn.Module, quantization: str) -> nn.Module:
    """Replace ``teacher``'s linear layers in place by ``quantization`` (``"int8"`` or ``"nf4"``) ones; returns it.

    Raises ``ValueError`` for an unknown value or a teacher that is already quantized (leave
    ``teacher_quantization`` unset for a teacher loaded quantized, e.g. with a ``BitsAndBytesConfig``), and
    ``ImportError`` for ``"nf4"`` without bitsandbytes.
    """
    if quantization not in TEACHER_QUANTIZATIONS or quantization is None:
        raise ValueError(
            f"teacher_quantization must be one of {[q for q in TEACHER_QUANTIZATIONS if q]}, got {quantization!r}"
        )
    if is_quantized(teacher):
        raise ValueError(
            f"The teacher {type(teacher).__name__} is already quantized; leave teacher_quantization unset for it "
            f"(it was set to {quantization!r})."
        )
    before = teacher_memory_bytes(teacher)
    if quantization == "int8":
        quantize(teacher, method=INT8_TEACHER_METHOD)
    else:
        _to_nf4(teacher)
    logger.info(
        "kd_plugins: teacher quantized to %s: %.1f MB -> %.1f MB",
        quantization,
        before / 2**20,
        teacher_memory_bytes(teacher) / 2**20,
    )
    return teacher


def _to_nf4(teacher: nn.Module) -> None:
    """Every linear layer ``find_quantizable`` targets becomes a bitsandbytes NF4 ``Linear4bit`` on its device."""
    bnb = require_bitsandbytes()
    targets, _ = find_quantizable(teacher)
    linears = {n: m for n, m in targets.items() if type(m) is nn.Linear}
    if not linears:
        raise ValueError(f"{type(teacher).__name__} has no nn.Linear layer to quantize to nf4")
    for name, lin in linears.items():
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=lin.weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(lin.weight.device)  # bitsandbytes packs the weight when it is moved to its device
        q.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(teacher.get_submodule(parent) if parent else teacher, leaf, q)


def teacher_memory_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (each storage once: tied weights count once), plus the
    block scales bitsandbytes keeps beside its 4-bit weights."""
    seen: set[tuple] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # bitsandbytes: absmax per block (itself quantized with nested states)
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
    return total
