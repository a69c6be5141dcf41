"""Few-row matrix products in the layout a CPU BLAS runs fast: the verification step of speculative decoding.

Speculative decoding pays when the target's forward over ``gamma + 1`` tokens costs about what one decoded token
costs. On the 2-core AMD EPYC this project benchmarks on (torch's MKL), ``F.linear(x, W)`` with 2 to 8 rows of ``x``
is 1.6x to 3.5x slower than with one row (``benchmarks/speculative/verify_row_cost.py``), and a one-row product with a
large matrix (the LM head) runs a slow matrix-vector path. The same product written as ``torch.mm(W, x.T).T`` (the
weight as the left operand, a tall-skinny GEMM) is much faster at those shapes: for SmolLM2's 49,152 x 576 head
(``verify_row_cost.py``, 2 threads), 4.0 ms at 2 rows and 5.6 ms at 5 rows against 22.6 and 17.7 ms for
``F.linear``, and 4.1 ms for one row duplicated into two against 10.1 ms for the matrix-vector path.

:func:`use_few_row_gemm` switches a model's ``nn.Linear`` layers, in place, to :class:`FewRowLinear`, an
``nn.Linear`` whose forward takes that route for calls with ``2 <= rows <= max_rows``, and for one-row calls of the
output embeddings (LM head). Parameters, their ties (a head tied to the input embeddings stays tied), state-dict
keys, hooks and ``isinstance(m, nn.Linear)`` are unchanged. Each output element is the same ``in_features``-term
dot product, so results equal ``F.linear``'s to float rounding (tested), not bit for bit: greedy output can change
only at a near-exact tie of two logits, which the losslessness check of
:func:`~kd_plugins.speculative.measure_speculative` would show. :func:`restore_linear` switches back. Apply it to the
target *and* the draft: the target-alone baseline of ``measure_speculative`` then runs with it too, so a speedup is
measured against the faster target.

It is a serving form: the fused linear + KD loss refuses a ``FewRowLinear`` head (its forward is not
``nn.Linear.forward``) with a clear error; call :func:`restore_linear` before training such a model.

Whether it helps depends on the BLAS and the CPU: time your own target with and without it (the benchmark does, and
``benchmarks/speculative/verify_row_cost.py`` shows both layouts). On CUDA it changes nothing (calls on CUDA
tensors take ``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FewRowLinear", "use_few_row_gemm", "restore_linear"]

DEFAULT_MAX_ROWS = 16


class FewRowLinear(nn.Linear):
    """An ``nn.Linear`` computing CPU calls with ``2 <= rows <= max_rows`` (rows: the product of the input's
    leading dimensions) as ``torch.mm(weight, x.T).T``, and one-row calls the same way on the row duplicated when
    ``one_row_gemm`` is set (meant for a large LM head). Every other call is ``F.linear``. Made by
    :func:`use_few_row_gemm` (class swap in place); ``max_rows`` and ``one_row_gemm`` are plain attributes."""

    max_rows: int = DEFAULT_MAX_ROWS
    one_row_gemm: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.device.type != "cpu" or not (2 <= rows <= self.max_rows or (rows == 1 and self.one_row_gemm)):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = torch.cat([flat, flat])  # a real second row: a zero-stride view would take the slow path again
        out = torch.mm(self.weight, flat.t()).t()[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def use_few_row_gemm(model: nn.Module, *, max_rows: int = DEFAULT_MAX_ROWS, head_one_row: bool = True) -> int:
    """Switch every ``nn.Linear`` of ``model`` (exact type; subclasses such as quantized layers are left alone) to
    :class:`FewRowLinear`, in place, and return how many were switched.

    Args:
        max_rows: calls with up to this many rows take the GEMM route (verification forwards have ``gamma + 1``).
        head_one_row: the output embeddings (``get_output_embeddings()``, also inside a restricted draft head) take
            it for one-row calls too, through a duplicated row: the decode step of a large-vocabulary head.
    """
    if not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}")
    head = _output_embeddings(model)
    heads = {id(m) for m in (head.modules() if isinstance(head, nn.Module) else ()) if isinstance(m, nn.Linear)}
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is FewRowLinear:
            switched += type(module) is nn.Linear
            module.__class__ = FewRowLinear
            module.max_rows = max_rows
            module.one_row_gemm = bool(head_one_row and id(module) in heads)
    return switched


def restore_linear(model: nn.Module) -> int:
    """Undo :func:`use_few_row_gemm`: every :class:`FewRowLinear` of ``model`` back to ``nn.Linear``, in place;
    returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is FewRowLinear:
            module.__class__ = nn.Linear
            for name in ("max_rows", "one_row_gemm"):
                module.__dict__.pop(name, None)
            restored += 1
    return restored
