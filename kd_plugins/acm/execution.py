"""How an ACM block runs its learners for a given per-token ``k``: the execution paths and the ``"auto"`` choice.

Every path computes ``h(x_t, k_t) = act(x_t W1[:k_t w].T + b1) W2[:k_t w] (+ b2 when k_t >= 1)`` (learners are
contiguous slices of one weight; ``k_t = 0`` gives 0); they differ in how the work is laid out:

- ``"grouped"``: sort tokens by ``k``, gather, one GEMM pair of width ``k*w`` per group, concatenate, scatter
  (:meth:`ACMBlock.grouped_forward`, the first implementation).
- ``"prefix"``: sort tokens by ``k`` in *descending* order once and gather only the tokens with ``k >= 1``; then
  learner ``j`` runs one GEMM pair over the contiguous prefix of tokens with ``k > j`` (``c_j`` rows), the second
  GEMM accumulating in place into the prefix of one output buffer (``addmm_``), and one ``index_copy_`` scatters the
  rows back. ``N`` GEMM pairs over large row blocks, no concatenation, no per-group tensors
  (:func:`prefix_forward`). Differentiable.
- ``"dense_masked"``: every learner for every token, masked (:meth:`ACMBlock.reference_forward`; dense cost — the
  released code's execution and the reference of the others).
- ``"triton"``: two Triton kernels with the gather and the scatter fused (:mod:`kd_plugins.kernels.acm_grouped`;
  CUDA, inference only).
- ``"auto"``: inference on CPU and on CUDA -> ``"prefix"`` (CPU, 1 thread: as fast as ``"grouped"`` or faster in
  the MiniLM / ViT benchmark, docs/acm.md; 2 threads and CUDA not measured yet, ``benchmarks/gpu_check.py`` times
  ``"triton"`` against it); training (``straight_through=False``, the only training path that executes by ``k``)
  -> ``"dense_masked"``, unchanged from before. Name ``"prefix"`` explicitly to train with FLOPs proportional to
  ``k`` (same gradients, tested).

All paths agree to floating-point rounding (tested); they are bitwise equal where the arithmetic is the same (every
token at ``k = N`` runs the one dense GEMM pair, ``k = 0`` tokens are exactly 0).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EXECUTIONS

__all__ = ["EXECUTIONS", "activation_kind", "prefix_forward", "resolve_execution", "triton_forward"]

logger = logging.getLogger(__name__)

#: What ``"auto"`` runs at inference, per device type (the measurements are in docs/acm.md, "Execution paths").
AUTO_INFERENCE = {"cpu": "prefix", "cuda": "prefix"}
_warned: set[str] = set()


def check_execution(execution: str) -> str:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r} ('auto' picks the fastest)")
    return execution


def resolve_execution(execution: str, device: torch.device, training: bool, needs_grad: bool) -> str:
    """The path a block runs: ``execution`` with ``"auto"`` resolved (see the module docstring) and ``"triton"``
    replaced by ``"prefix"`` where a gradient is needed (the kernels have no backward; warned once)."""
    check_execution(execution)
    if execution == "auto":
        return "dense_masked" if training else AUTO_INFERENCE.get(device.type, "prefix")
    if execution == "triton" and needs_grad:
        if "triton_grad" not in _warned:
            _warned.add("triton_grad")
            logger.warning(
                "ACM execution='triton' has no backward: this forward needs gradients, so it runs 'prefix' "
                "(same outputs); wrap inference in torch.no_grad() to use the kernels"
            )
        return "prefix"
    return execution


_PROBE = torch.linspace(-6.0, 6.0, 241)
_ACT_FUNCTIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda v: v,
}


@torch.no_grad()
def activation_kind(act: nn.Module) -> str | None:
    """Which of the Triton kernels' activations ``act`` computes (probed on float32 values in [-6, 6]), or None."""
    try:
        y = act(_PROBE)
    except Exception:  # noqa: BLE001  (an activation that cannot run on a CPU probe is not one we know)
        return None
    for name, fn in _ACT_FUNCTIONS.items():
        if y.shape == _PROBE.shape and torch.allclose(y, fn(_PROBE), rtol=1e-5, atol=1e-6):
            return name
    return None


def _prefix_counts(k: torch.Tensor, num_learners: int) -> list[int]:
    """``c_j`` = number of tokens with ``k > j``, for ``j = 0..N-1`` (one host sync)."""
    counts = torch.bincount(k, minlength=num_learners + 1)[: num_learners + 1]
    return (k.numel() - counts.cumsum(0)[:num_learners]).tolist()


def prefix_forward(block, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``"prefix"`` path of ``block`` (an :class:`~kd_plugins.acm.ACMBlock`): ``x [..., d_in]``, ``k [...]``."""
    lead = x.shape[:-1]
    x2, k2 = x.reshape(-1, block.d_in), k.reshape(-1)
    T, N, w = x2.shape[0], block.num_learners, block.width
    c = _prefix_counts(k2, N) if T else [0] * N
    if c[N - 1] == T:  # every token runs every learner: the dense block
        return block.output_k(x2, N).view(*lead, block.d_out)
    if c[0] == 0:
        return x.new_zeros(*lead, block.d_out)
    order = torch.sort(k2, descending=True, stable=True).indices[: c[0]]  # the tokens with k >= 1, most work first
    xs = x2.index_select(0, order)
    out = None
    for j in range(N):
        if c[j] == 0:
            break
        units = slice(j * w, (j + 1) * w)
        rows = xs[: c[j]]
        h = block.act(F.linear(rows, block.w1[units], None if block.b1 is None else block.b1[units]))
        if block.glu:
            h = h * F.linear(rows, block.w3[units], None if block.b3 is None else block.b3[units])
        if out is None:
            out = h @ block.w2[units]
        else:
            out[: c[j]].addmm_(h, block.w2[units])
    if block.b2 is not None:  # every gathered token has k >= 1
        out.add_(block.b2)
    y = x2.new_zeros(T, block.d_out)
    y.index_copy_(0, order, out)
    return y.view(*lead, block.d_out)


def triton_forward(block, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``"triton"`` path (:func:`kd_plugins.kernels.acm_grouped.acm_grouped_mlp`); inference only."""
    from ..kernels.acm_grouped import acm_grouped_mlp

    act = getattr(block, "_act_kind", "unprobed")
    if act == "unprobed":
        act = block._act_kind = activation_kind(block.act)
    if act is None:
        raise ValueError(
            f"execution='triton' supports the activations gelu, gelu_tanh, relu, silu and identity; this block's "
            f"{type(block.act).__name__} is none of them: use execution='prefix'"
        )
    lead = x.shape[:-1]
    out = acm_grouped_mlp(
        x.reshape(-1, block.d_in),
        k.reshape(-1),
        block.w1,
        block.b1,
        block.w2,
        block.b2,
        num_learners=block.num_learners,
        width=block.width,
        act=act,
        w3=block.w3,
        b3=block.b3,
    )
    return out.view(*lead, block.d_out)
