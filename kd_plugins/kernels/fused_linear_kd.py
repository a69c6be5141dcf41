"""Memory-efficient fused ``lm_head`` + distillation loss: the public functions and module.

The naive way to distil a causal LM computes ``student_logits = h_s @ W_s.T`` and ``teacher_logits = h_t @ W_t.T``
for every token (``[N, V]`` each, 0.8-8.6 GB per matrix in float32 at ``N=16384``, ``V=49k-131k``), then their
log-softmaxes, the divergence, and the gradient of the logits: several ``[N, V]`` matrices alive at once.
:func:`fused_linear_kd_loss` never materialises them. It walks the (valid) rows in chunks of ``chunk_size``; for each
chunk it computes the student (and teacher) logits, the per-row divergence, the hard-label cross-entropy, and the
*analytic* gradient of the loss with respect to the chunk's student logits, and immediately folds that gradient
into ``grad_hidden = g @ W`` and ``grad_W += g.T @ h`` (Liger-Kernel style: the gradients are produced in the forward
pass, so backward only scales them by the incoming gradient). Peak memory is ``O(chunk_size * V)`` on top of the
parameter-sized gradient buffers, independent of ``N``.

The objective is *exactly* the reference loss of :mod:`kd_plugins.losses` evaluated on ``h @ W.T (+ b)``:

* ``divergence="kl"``: :func:`~kd_plugins.losses.kl_divergence` (``T^2 * KL(p_T || q_S)``)
* ``"reverse_kl"``: :func:`~kd_plugins.losses.reverse_kl_divergence` (``T^2 * KL(q_S || p_T)``)
* ``"jsd"``: :func:`~kd_plugins.losses.generalized_jsd` with ``beta`` (``beta=0``/``1`` are forward/reverse KL,
  TRL's convention, as in the reference)
* ``"tvd"``: :func:`~kd_plugins.losses.total_variation_distance` (not ``T^2``-scaled)

with the same row masking (``labels == ignore_index`` rows are dropped; an optional boolean ``mask``), the same
``num_items_in_batch`` normalisation (sum over valid rows divided by it, else by the number of valid rows) and the same
sparse top-k teacher handling (``teacher_topk=(indices, log_probs)``, tail bucket or renormalised). The total loss is
``kd_weight * kd + hard_label_weight * ce`` where ``ce`` is the standard hard-label cross-entropy on the raw
(temperature 1) student logits over the same rows with the same normaliser. The teacher is treated as a constant:
no gradient flows to ``teacher_hidden``/``teacher_head_weight``/``teacher_logits``.

Limitations: no double backward (the gradient is computed analytically); the loss is always the ``"mean"`` reduction
(sum / normaliser).

Layout (reference and fused backends side by side, Liger-Kernel style): this module is the public front (argument
handling, backend choice, the ``nn.Module`` form and the head-module entry point); :mod:`._spec` validates the
arguments into a :class:`~._spec.FusedKDSpec`; :mod:`.torch_fused_kd` (chunked PyTorch) and :mod:`.triton_fused_kd`
(Triton kernels, imported only when used) compute ``(loss, kd, ce)`` from it; :mod:`._topk` holds the sparse-teacher
math both share; :mod:`.heads` decides whether a model's head can be fused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from kd_plugins.losses._common import IGNORE_INDEX

from ._spec import (
    DIVERGENCE_ALIASES,
    FusedKDSpec,
    check_backend,
    check_chunk_size,
    check_divergence,
    prepare_spec,
)
from ._triton import interpreter_enabled, triton_available
from .heads import UnfusableHeadError, check_fusable_head
from .torch_fused_kd import torch_fused_linear_kd

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "fused_kd_loss_from_heads",
    "check_fusable_head",
    "UnfusableHeadError",
    "DIVERGENCE_ALIASES",
]

# ----------------------------------------------------------------------------------------------------------------------
# backend choice
# ----------------------------------------------------------------------------------------------------------------------


def _require_triton_runtime(tensor: torch.Tensor) -> None:
    """Raise a clear error when the Triton backend cannot run on ``tensor``'s device."""
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the optional `triton` package (pip install 'kd-plugins[gpu]'); "
            "use backend='torch' (chunked PyTorch, same loss) instead."
        )
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and interpreter_enabled():
        return
    raise RuntimeError(
        f"backend='triton' runs on CUDA tensors, got tensors on {tensor.device}"
        f"{'' if torch.cuda.is_available() else ' and no CUDA device is available'}. Use backend='torch' "
        "(chunked PyTorch, same loss), or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU "
        "in Triton's (slow) interpreter for debugging."
    )


def _resolve_backend(backend: str, student_hidden: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when triton is installed, else ``"torch"``."""
    if backend == "auto":
        return "triton" if student_hidden.is_cuda and triton_available() else "torch"
    return backend


def _run_backend(spec: FusedKDSpec, backend: str):
    """``(loss, kd, ce, agree)`` from the chosen backend (``agree`` None where the backend does not count it)."""
    if backend == "triton":
        if spec.exact_head is not None:
            raise ValueError("teacher_exact_head is computed by backend='torch' only; use backend='torch' or 'auto'")
        _require_triton_runtime(spec.student.x)
        from .triton_fused_kd import triton_fused_linear_kd  # imports triton: only when asked for

        return (*triton_fused_linear_kd(spec), None)
    return torch_fused_linear_kd(spec)


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_exact_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_label_weight: float = 0.0,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
    topk_tail: str = "bucket",
    t2_scale: bool | None = None,
    backend: str = "torch",
    return_parts: bool = False,
    agreement: bool = False,
):
    """Distillation loss of ``student_hidden @ student_head_weight.T (+ bias)`` without materialising the logits.

    Args:
        student_hidden: ``[N, H]`` rows feeding the student's ``lm_head`` (flattened and shifted by the caller:
            row ``i`` predicts ``labels[i]``).
        student_head_weight / student_head_bias: the student ``lm_head`` parameters ``[V, H]`` / ``[V]``.
        teacher_hidden, teacher_head_weight (teacher_head_bias): dense teacher given by its last hidden states
            ``[N, Ht]`` and ``lm_head`` ``[V, Ht]`` (its logits are computed chunk by chunk too). Alternatively
            ``teacher_logits`` ``[N, V]`` or ``teacher_topk = (indices [N, K], log_probs [N, K])``.
        teacher_exact_head: ``(indices [N, h], log_probs [N, h])`` with a dense teacher: its probabilities on those
            tokens (log-probs at ``temperature``) are these, and its other tokens share the remaining mass in
            proportion to its own softmax over them (a low-rank teacher cache's rows, rebuilt chunk by chunk; torch
            backend).
        labels: ``[N]`` targets; rows equal to ``ignore_index`` are excluded from every term.
        mask: optional ``[N]`` boolean row mask (AND-ed with the labels' mask).
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or ``"tvd"`` (registry aliases accepted).
        temperature: softens both distributions; KL-family divergences are multiplied by ``T^2`` (``t2_scale``).
        hard_label_weight / kd_weight: ``loss = kd_weight * kd + hard_label_weight * ce``.
        chunk_size: rows per chunk; peak extra memory is about ``5 * chunk_size * V * 4`` bytes.
        num_items_in_batch: divide the summed loss by this count instead of the number of valid rows.
        backend: ``"torch"`` (chunked PyTorch, any device), ``"triton"`` (CUDA, or CPU under
            ``TRITON_INTERPRET=1``), ``"auto"`` (Triton on CUDA tensors when triton imports, else torch).
        return_parts: also return ``{"kd": ..., "ce": ...}`` (detached, unweighted, normalised like the loss); a
            term that is not computed (``kd_weight == 0`` / ``hard_label_weight == 0``) is absent.
        agreement: with ``return_parts``, the torch backend adds ``parts["agreement"]``: the share of valid rows whose
            student and teacher top-1 tokens agree (for a top-k teacher, its highest-probability index), counted from
            the logits the chunks form anyway (one argmax per chunk and side; off by default).

    Returns:
        The scalar float32 loss, or ``(loss, parts)`` with ``return_parts=True``.
    """
    check_backend(backend)
    spec = prepare_spec(
        student_hidden,
        student_head_weight,
        teacher_hidden,
        teacher_head_weight,
        teacher_logits=teacher_logits,
        teacher_topk=teacher_topk,
        labels=labels,
        mask=mask,
        student_head_bias=student_head_bias,
        teacher_head_bias=teacher_head_bias,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        hard_label_weight=hard_label_weight,
        kd_weight=kd_weight,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        num_items_in_batch=num_items_in_batch,
        topk_tail=topk_tail,
        t2_scale=t2_scale,
        count_agreement=agreement and return_parts,
        teacher_exact_head=teacher_exact_head,
    )
    resolved = "torch" if backend == "auto" and teacher_exact_head is not None else backend
    loss, kd, ce, agree = _run_backend(spec, _resolve_backend(resolved, student_hidden))
    if not return_parts:
        return loss
    parts = {}
    if spec.mode != "none":
        parts["kd"] = kd
        if spec.count_agreement and agree is not None:
            parts["agreement"] = agree.float() / max(spec.rows.numel(), 1)
    if spec.need_ce:
        parts["ce"] = ce
    return loss, parts


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`: hyper-parameters in ``__init__``, tensors in ``forward``.

    >>> crit = FusedLinearKDLoss(divergence="jsd", beta=0.5, temperature=2.0, hard_label_weight=0.5)
    >>> loss = crit(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels=labels)
    """

    def __init__(
        self,
        divergence: str = "kl",
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        hard_label_weight: float = 0.0,
        kd_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        chunk_size: int = 1024,
        topk_tail: str = "bucket",
        t2_scale: bool | None = None,
        backend: str = "torch",
    ):
        super().__init__()
        # Validate eagerly so that a bad config fails at construction time.
        check_divergence(divergence)
        check_chunk_size(chunk_size)
        check_backend(backend)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.hard_label_weight, self.kd_weight, self.ignore_index = hard_label_weight, kd_weight, ignore_index
        self.chunk_size, self.topk_tail, self.t2_scale, self.backend = chunk_size, topk_tail, t2_scale, backend

    def forward(
        self,
        student_hidden,
        student_head_weight,
        teacher_hidden=None,
        teacher_head_weight=None,
        *,
        teacher_logits=None,
        teacher_topk=None,
        teacher_exact_head=None,
        labels=None,
        mask=None,
        student_head_bias=None,
        teacher_head_bias=None,
        num_items_in_batch=None,
        return_parts: bool = False,
    ):
        return fused_linear_kd_loss(
            student_hidden,
            student_head_weight,
            teacher_hidden,
            teacher_head_weight,
            teacher_logits=teacher_logits,
            teacher_topk=teacher_topk,
            teacher_exact_head=teacher_exact_head,
            labels=labels,
            mask=mask,
            student_head_bias=student_head_bias,
            teacher_head_bias=teacher_head_bias,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            hard_label_weight=self.hard_label_weight,
            kd_weight=self.kd_weight,
            ignore_index=self.ignore_index,
            chunk_size=self.chunk_size,
            num_items_in_batch=num_items_in_batch,
            topk_tail=self.topk_tail,
            t2_scale=self.t2_scale,
            backend=self.backend,
            return_parts=return_parts,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
            f"hard_label_weight={self.hard_label_weight}, kd_weight={self.kd_weight}, "
            f"chunk_size={self.chunk_size}, backend={self.backend!r}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Integration entry point (used by the trainer callback's ``fused_loss=True`` path)
# ----------------------------------------------------------------------------------------------------------------------


def _cfg_get(config, *names, default=None):
    for n in names:
        if isinstance(config, dict):
            if n in config and config[n] is not None:
                return config[n]
        elif getattr(config, n, None) is not None:
            return getattr(config, n)
    return default


def fused_kd_loss_from_heads(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    labels: torch.Tensor | None,
    config: Any = None,
    *,
    num_items_in_batch=None,
    return_parts: bool = False,
):
    """Fused loss from the two ``lm_head`` modules (integration entry point for the trainer callback).

    ``student_hidden [N, H]`` / ``teacher_hidden [N, Ht]`` are the final hidden states that feed the heads
    (``outputs.hidden_states[-1]`` for Llama-style models), flattened and shifted like ``labels [N]``. Both heads are
    checked with :func:`check_fusable_head` (pass the model itself to check its config as well). ``config`` is an
    object or dict read for (first name found wins; defaults in brackets): ``divergence`` / ``loss`` ["kl"],
    ``temperature`` [1.0], ``beta`` / ``jsd_beta`` [0.5], ``hard_label_weight`` [0.0], ``kd_weight`` [1.0],
    ``fused_chunk_size`` / ``chunk_size`` [1024], ``ignore_index`` [-100], ``topk_tail`` ["bucket"],
    ``fused_backend`` ["torch"].
    """
    s_head = check_fusable_head(student_head)
    t_head = check_fusable_head(teacher_head)
    cfg = config if config is not None else {}
    return fused_linear_kd_loss(
        student_hidden,
        s_head.weight,
        teacher_hidden.detach(),
        t_head.weight.detach(),
        student_head_bias=s_head.bias,
        teacher_head_bias=t_head.bias.detach() if t_head.bias is not None else None,
        labels=labels,
        divergence=_cfg_get(cfg, "divergence", "loss", default="kl"),
        temperature=float(_cfg_get(cfg, "temperature", default=1.0)),
        beta=float(_cfg_get(cfg, "beta", "jsd_beta", default=0.5)),
        hard_label_weight=float(_cfg_get(cfg, "hard_label_weight", default=0.0)),
        kd_weight=float(_cfg_get(cfg, "kd_weight", default=1.0)),
        chunk_size=int(_cfg_get(cfg, "fused_chunk_size", "chunk_size", default=1024)),
        ignore_index=int(_cfg_get(cfg, "ignore_index", default=IGNORE_INDEX)),
        topk_tail=_cfg_get(cfg, "topk_tail", default="bucket"),
        backend=_cfg_get(cfg, "fused_backend", default="torch"),
        num_items_in_batch=num_items_in_batch,
        return_parts=return_parts,
    )
