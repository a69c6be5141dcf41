"""Per-group round-to-nearest quantization of singular-vector columns, with real bit packing.

This is a deliberately plain, documented routine (no calibration data, no Hessian): each column of a factor matrix
``X [n, k]`` (one column per singular component) is cut into groups of ``group_size`` consecutive entries; every group
gets one fp16 scale and ``2**bits`` evenly spaced levels placed symmetrically around zero (a "mid-rise" grid:
``value = (code - (2**bits - 1) / 2) * scale``, so all codes are used, which matters at 2 bits). The scale is the
group's max-abs value times a clipping ratio picked per group from a small grid to minimise the squared error
(RTN with MSE clipping search). Codes are packed 2 (4-bit) or 4 (2-bit) per byte along the row axis.

Widths 2, 4 and 8 are quantized; 16 and 32 mean "store as fp16 / fp32" (no quantization). GraftLLM itself uses GPTQ
on the factors with calibration activations; RTN needs no data, which keeps SkillPack extraction a pure function of
the two checkpoints.
"""

from __future__ import annotations

import math

import torch

QUANT_BITS = (2, 4, 8)
FLOAT_BITS = (16, 32)
SUPPORTED_BITS = QUANT_BITS + FLOAT_BITS
# Clipping ratios searched per group (a coarse grid is enough at 8 bits, where clipping rarely pays).
_CLIP_GRID = {2: (1.0, 0.9, 0.8, 0.7, 0.6), 4: (1.0, 0.95, 0.9, 0.85), 8: (1.0,)}


def check_bits(bits: int, group_size: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is a supported width and ``group_size`` a positive multiple of 4."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 4 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")


def padded_rows(n: int, group_size: int) -> int:
    return math.ceil(n / group_size) * group_size


def column_bytes(n: int, bits: int, group_size: int) -> int:
    """Stored bytes of one quantized column of length ``n`` (codes + fp16 scales)."""
    check_bits(bits, group_size)
    if bits in FLOAT_BITS:
        return n * bits // 8
    rows = padded_rows(n, group_size)
    return rows * bits // 8 + 2 * (rows // group_size)


def _fake_quant(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, unpacked) ``[rows, k]`` and fp16 scales ``[rows // group_size, k]`` for ``x [n, k]``."""
    n, k = x.shape
    rows = padded_rows(n, group_size)
    xp = torch.zeros(rows, k, dtype=torch.float32)
    xp[:n] = x.float()
    g = xp.reshape(rows // group_size, group_size, k)  # [G, gs, k]
    levels = 2**bits - 1
    half = levels / 2.0
    amax = g.abs().amax(dim=1, keepdim=True)  # [G, 1, k]
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.zeros_like(amax)
    for ratio in _CLIP_GRID[bits]:
        scale = (amax * ratio / half).half().float()  # the scale is stored in fp16: search with what is stored
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(g / scale + half), 0, levels)
        err = ((q - half) * scale - g).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(g / best_scale + half), 0, levels).to(torch.uint8).reshape(rows, k)
    return codes, best_scale.reshape(rows // group_size, k).half()


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    rows, k = codes.shape
    c = codes.reshape(rows // per, per, k).to(torch.int32)
    out = torch.zeros(rows // per, k, dtype=torch.int32)
    for j in range(per):
        out |= c[:, j] << (bits * j)
    return out.to(torch.uint8).contiguous()


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per = 8 // bits
    mask = 2**bits - 1
    p = packed.to(torch.int32)
    parts = [(p >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=1).reshape(packed.shape[0] * per, packed.shape[1]).to(torch.uint8)


def quantize_tensor(x: torch.Tensor, bits: int, group_size: int = 64) -> dict[str, torch.Tensor]:
    """Quantize the columns of ``x [n, k]``; returns the tensors to store: ``{"q": codes-or-floats, "s": scales}``
    (``"s"`` only for 2/4/8 bits)."""
    check_bits(bits, group_size)
    if x.dim() != 2:
        raise ValueError(f"quantize_tensor expects a 2-D [n, k] factor, got shape {tuple(x.shape)}")
    if bits == 32:
        return {"q": x.float().contiguous()}
    if bits == 16:
        return {"q": x.half().contiguous()}
    codes, scales = _fake_quant(x, bits, group_size)
    return {"q": _pack(codes, bits), "s": scales.contiguous()}


def dequantize_tensor(stored: dict[str, torch.Tensor], bits: int, n: int, group_size: int = 64) -> torch.Tensor:
    """Float32 ``[n, k]`` factor back from :func:`quantize_tensor`'s tensors."""
    check_bits(bits, group_size)
    if bits in FLOAT_BITS:
        return stored["q"].float()
    codes = _unpack(stored["q"], bits).float()
    rows, k = codes.shape
    half = (2**bits - 1) / 2.0
    scales = stored["s"].float().repeat_interleave(group_size, dim=0)
    return ((codes - half) * scales)[:n]


def roundtrip(x: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """``dequantize_tensor(quantize_tensor(x))`` without packing (same values)."""
    check_bits(bits, group_size)
    if bits == 32:
        return x.float()
    if bits == 16:
        return x.half().float()
    codes, scales = _fake_quant(x, bits, group_size)
    half = (2**bits - 1) / 2.0
    return ((codes.float() - half) * scales.float().repeat_interleave(group_size, dim=0))[: x.shape[0]]
