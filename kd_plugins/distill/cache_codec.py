"""Compact encodings of per-token top-k teacher rows (``indices`` / ``log_probs``, each ``[R, k]``), in pure PyTorch.

Used by the sharded offline teacher cache (``distill/cache_store.py``, written by ``kd-plugins cache-teacher``).

**Indices** are bit-packed row by row: each index takes ``b = ceil(log2 V)`` bits (at least 1), least significant
bit first, and a row of ``k`` indices fills ``ceil(k * b / 8)`` bytes (at most 7 bits of padding per row, so any
row range can be sliced straight out of a shard). ``V = 49152`` gives 16 bits; ``V = 50257`` gives 16; ``V = 96``
gives 7.

**Log-probs** (sorted in descending order, as ``topk`` returns them) in one of three forms:

* ``"fp32"``: exact (4 bytes per value; for tests and small caches);
* ``"bf16"``: the *probabilities* ``exp(log_probs)`` in bfloat16 (round to nearest; 2 bytes per value), so every
  probability keeps a relative error of at most ``2**-8`` whatever its size (bf16 has float32's exponent range).
  Log-probs in bf16 would give a probability the relative error ``|log p| * 2**-8``: 2% at ``p = e**-5``. Decoding
  takes the log and, should rounding push the top-k mass above 1, scales the row down to mass 1 (the sparse losses
  require mass <= 1);
* ``"head_tail"``: the first ``head_k`` values as in ``"bf16"`` and the remaining
  ``k - head_k`` as a least-squares polynomial of degree ``tail_degree`` in ``log(rank)`` (``rank`` = 1-based
  position in the top-k), whose intercept is then shifted so that the fitted tail holds exactly the teacher's tail
  mass ``sum(exp(values[head_k:]))``. ``tail_degree + 1`` float32 coefficients per row. The idea (exact head,
  fitted tail) follows DistillKit's compressed logits (Arcee AI); the basis, the mass-preserving intercept and the
  probability-space head are ours. Zipf-like next-token distributions are close to linear in ``log(rank)``, and the
  preserved mass keeps the tail bucket of the sparse losses exact.
"""

from __future__ import annotations

import torch

__all__ = [
    "VALUE_FORMATS",
    "index_bits",
    "pack_indices",
    "unpack_indices",
    "encode_log_probs",
    "decode_log_probs",
    "row_bytes",
    "check_value_format",
]

VALUE_FORMATS = ("fp32", "bf16", "head_tail")
_CHUNK_ROWS = 8192  # rows per step of the bit (un)packing: bounds the [rows, k, bits] intermediate


# ------------------------------------------------------------------------------------------------------ indices
def index_bits(vocab_size: int) -> int:
    """Bits per index for a vocabulary of ``vocab_size`` entries: ``ceil(log2 V)``, at least 1."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (int(vocab_size) - 1).bit_length())


def _packed_width(k: int, bits: int) -> int:
    return (k * bits + 7) // 8


def pack_indices(indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[R, k]`` integer indices in ``[0, vocab_size)`` -> ``[R, ceil(k * bits / 8)]`` uint8 (see module doc)."""
    if indices.dim() != 2:
        raise ValueError(f"pack_indices takes [rows, k] indices, got shape {tuple(indices.shape)}")
    bits = index_bits(vocab_size)
    x = indices.detach().to("cpu", torch.int64)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"indices must lie in [0, {vocab_size}), got [{int(x.min())}, {int(x.max())}]")
    rows, k = x.shape
    width = _packed_width(k, bits)
    out = torch.empty(rows, width, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = (2 ** torch.arange(8, dtype=torch.int64)).reshape(1, 1, 8)
    for start in range(0, rows, _CHUNK_ROWS):
        part = x[start : start + _CHUNK_ROWS]
        flat = ((part.unsqueeze(-1) >> shifts) & 1).reshape(part.shape[0], k * bits)
        flat = torch.nn.functional.pad(flat, (0, width * 8 - k * bits))
        out[start : start + _CHUNK_ROWS] = (flat.reshape(-1, width, 8) * weights).sum(-1).to(torch.uint8)
    return out


def unpack_indices(packed: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``[R, ceil(k * bits / 8)]`` uint8 -> ``[R, k]`` int64."""
    bits = index_bits(vocab_size)
    if packed.dim() != 2 or packed.shape[1] != _packed_width(k, bits) or packed.dtype != torch.uint8:
        raise ValueError(
            f"packed indices must be [rows, {_packed_width(k, bits)}] uint8 for k={k}, vocab_size={vocab_size}; "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    p = packed.to("cpu", torch.int64)
    rows = p.shape[0]
    out = torch.empty(rows, k, dtype=torch.int64)
    byte_shifts = torch.arange(8, dtype=torch.int64)
    weights = (2 ** torch.arange(bits, dtype=torch.int64)).reshape(1, 1, bits)
    for start in range(0, rows, _CHUNK_ROWS):
        part = p[start : start + _CHUNK_ROWS]
        flat = ((part.unsqueeze(-1) >> byte_shifts) & 1).reshape(part.shape[0], -1)[:, : k * bits]
        out[start : start + _CHUNK_ROWS] = (flat.reshape(-1, k, bits) * weights).sum(-1)
    return out


# ------------------------------------------------------------------------------------------------------ values
def _probs_bf16(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probs -> probabilities in bfloat16 (relative error <= 2**-8 at any magnitude)."""
    return log_probs.double().exp().to(torch.bfloat16)


def _tail_basis(head_k: int, k: int, degree: int) -> torch.Tensor:
    """``[k - head_k, degree + 1]`` float64 features ``log(rank) ** d`` of the tail ranks ``head_k + 1 .. k``."""
    log_rank = torch.arange(head_k + 1, k + 1, dtype=torch.float64).log()
    return torch.stack([log_rank**d for d in range(degree + 1)], dim=-1)


def check_value_format(value_format: str, k: int, head_k: int, tail_degree: int) -> None:
    """Refuse a value format that cannot encode rows of ``k`` values (errors name the fix)."""
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
    if value_format == "head_tail" and not (0 <= head_k and tail_degree >= 0 and k - head_k > tail_degree + 1):
        raise ValueError(
            f"value_format='head_tail' fits degree-{tail_degree} polynomials to the k - head_k = {k - head_k} tail "
            f"values of each row, which needs more than tail_degree + 1 = {tail_degree + 1} of them (k={k}, "
            f"head_k={head_k}); lower head_k or tail_degree, or use value_format='bf16'."
        )


def encode_log_probs(
    log_probs: torch.Tensor, value_format: str, *, head_k: int = 8, tail_degree: int = 2
) -> dict[str, torch.Tensor]:
    """``[R, k]`` float log-probs (each row sorted descending) -> the tensors of ``value_format`` (module doc)."""
    k = log_probs.shape[-1]
    check_value_format(value_format, k, head_k, tail_degree)
    lp = log_probs.detach().to("cpu", torch.float32)
    if value_format == "fp32":
        return {"log_probs": lp.contiguous()}
    if value_format == "bf16":
        return {"probs": _probs_bf16(lp)}
    # Very unlikely tokens (-inf at masked vocabulary entries) would dominate a least-squares fit; their mass is 0.
    tail = lp[:, head_k:].double().clamp(min=-100.0)
    basis = _tail_basis(head_k, k, tail_degree)
    coeffs = tail @ torch.linalg.pinv(basis).T
    fitted = coeffs @ basis.T
    coeffs[:, 0] += torch.logsumexp(tail, -1) - torch.logsumexp(fitted, -1)  # keep the tail's mass exactly
    return {"head_probs": _probs_bf16(lp[:, :head_k]), "tail_coeffs": coeffs.float()}


def decode_log_probs(tensors: dict[str, torch.Tensor], value_format: str, k: int) -> torch.Tensor:
    """Inverse of :func:`encode_log_probs` (exact for ``fp32``): ``[R, k]`` float32 log-probs with mass <= 1."""
    if value_format == "fp32":
        return tensors["log_probs"].float()
    if value_format == "bf16":
        lp = tensors["probs"].float().log()
    elif value_format == "head_tail":
        head, coeffs = tensors["head_probs"].float().log(), tensors["tail_coeffs"].double()
        basis = _tail_basis(head.shape[-1], k, coeffs.shape[-1] - 1)
        lp = torch.cat([head, (coeffs @ basis.T).float()], dim=-1)
    else:
        raise ValueError(f"value_format must be one of {VALUE_FORMATS}, got {value_format!r}")
    # rounding may push the top-k mass a hair above 1: the sparse losses require <= 1.
    excess = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(min=0.0)
    return lp - excess


def row_bytes(k: int, vocab_size: int, value_format: str, *, head_k: int = 8, tail_degree: int = 2) -> int:
    """Bytes one cached row takes in a shard (packed indices + values)."""
    check_value_format(value_format, k, head_k, tail_degree)
    values = {"fp32": 4 * k, "bf16": 2 * k, "head_tail": 2 * head_k + 4 * (tail_degree + 1)}[value_format]
    return _packed_width(k, index_bits(vocab_size)) + values
