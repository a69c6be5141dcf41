"""``MoEMLP``: a dense MLP upcycled into ``num_experts`` copies behind a linear top-k router (dropless).

For a token ``x`` the router gives ``p = softmax(W_r x)`` over the experts (in float32 or wider); the token runs its
``top_k`` experts ``K``, weighted by the renormalised probabilities ``w_e = p_e / sum_{j in K} p_j``:

    y = sum_{e in K} w_e * expert_e(x)

Because the weights of the chosen experts sum to 1 and every expert starts as an exact copy of the dense MLP, the
upcycled layer computes what the dense one did (up to float rounding) whatever the router says. There is no capacity
limit: no token is dropped or sent to a fallback path.

Tokens are grouped per expert (one sort of the ``N * top_k`` assignments), each expert runs once on its tokens, and
the weighted outputs are scattered back with ``index_add_``. Every forward records the router probabilities, the
chosen experts and the padding mask of that forward (see :class:`MoEContext`) for the balance loss and the load
statistics (:func:`balance_term`, :func:`load_fractions`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["MoEMLP", "MoEContext", "RouterRecord", "balance_term", "load_fractions"]


class MoEContext:
    """State shared by the MoE layers of one model (never saved): the padding mask of the forward in progress (set
    by a pre-hook from ``attention_mask``) and whether layers keep every forward's record (``accumulate``) or only the
    last one."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None
        self.accumulate: bool = False


@dataclass
class RouterRecord:
    """One forward of one MoE layer: router probabilities ``[N, E]`` (float32, with gradients in training), chosen
    experts ``[N, top_k]`` (best first) and the mask of real (non-padding) tokens ``[N]`` or ``None`` (all real)."""

    probs: torch.Tensor
    experts: torch.Tensor
    token_mask: torch.Tensor | None

    def real(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, experts)`` of the real tokens only."""
        if self.token_mask is None:
            return self.probs, self.experts
        return self.probs[self.token_mask], self.experts[self.token_mask]


class _Records(list):
    """The records of one layer. Tensors with autograd history cannot be deep-copied, and a copy of the model should
    not carry the last batch's statistics anyway: copies start empty."""

    def __deepcopy__(self, memo):
        return _Records()

    def __reduce__(self):
        return (_Records, ())


class MoEMLP(nn.Module):
    """``num_experts`` copies of a dense MLP behind a linear router; each token runs its renormalised top-k experts.

    Args:
        dense: the dense MLP (any token-wise module ``[..., H] -> [..., H]``); it is deep-copied into every expert.
        hidden_size: ``H``, the router's input width.
        num_experts, top_k: experts per layer and experts per token.
        router_init: ``"normal"`` (``N(0, router_std^2)``) or ``"zeros"``.
        router_jitter: training-only multiplicative noise ``U(1 - eps, 1 + eps)`` on the router input (0: off).
        context: the model's :class:`MoEContext` (padding mask and recording mode); ``None``: a private one.
    """

    def __init__(
        self,
        dense: nn.Module,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        router_init: str = "normal",
        router_std: float = 0.02,
        router_jitter: float = 0.0,
        context: MoEContext | None = None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        ref = next(iter(dense.parameters()), None)
        self.num_experts, self.top_k, self.router_jitter = num_experts, top_k, float(router_jitter)
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(num_experts))
        self.router = nn.Linear(
            hidden_size,
            num_experts,
            bias=False,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        with torch.no_grad():
            if router_init == "zeros":
                self.router.weight.zero_()
            else:
                self.router.weight.normal_(0.0, router_std)
        self.train(dense.training)
        self._ctx = [context or MoEContext()]  # a list, so the shared context is not registered as a sub-module
        self.records: list[RouterRecord] = _Records()

    @property
    def context(self) -> MoEContext:
        return self._ctx[0]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(probs [N, E], weights [N, k] renormalised, experts [N, k])`` for tokens ``x [N, H]``; probabilities in
        float32 (float64 for a float64 model)."""
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        logits = self.router(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # fp32, fp64 kept
        top_p, experts = probs.topk(self.top_k, dim=-1)
        return probs, top_p / top_p.sum(dim=-1, keepdim=True), experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        out = self._dispatch(x, weights, experts)
        self._record(probs, experts, shape[:-1])
        return out.reshape(*shape[:-1], out.shape[-1])

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Group the ``N * k`` (token, expert) assignments by expert, run each expert once on its tokens, and add the
        weighted outputs back per token."""
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k
        weight_of = weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out, start = None, 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start : start + n]
            y = self.experts[e](x[idx])
            if out is None:
                # accumulate in float32 (at least): with equal experts the k weighted copies then add up to the dense
                # output before the one rounding to the experts' dtype (bf16 / autocast) at the end
                out_dtype = y.dtype
                out = x.new_zeros(x.shape[0], y.shape[-1], dtype=torch.promote_types(y.dtype, torch.float32))
            out.index_add_(0, idx, y.to(out.dtype) * weight_of[start : start + n, None].to(out.dtype))
            start += n
        return out.to(out_dtype) if out is not None else torch.zeros_like(x)

    def _record(self, probs: torch.Tensor, experts: torch.Tensor, lead_shape: torch.Size) -> None:
        mask = self.context.token_mask
        token_mask = mask.reshape(-1).to(probs.device) if mask is not None and mask.shape == lead_shape else None
        record = RouterRecord(probs, experts, token_mask)
        if not self.context.accumulate:
            self.records.clear()
        self.records.append(record)


def load_fractions(experts: torch.Tensor, num_experts: int, first_only: bool = False) -> torch.Tensor:
    """``f [E]``: the fraction of the ``N * k`` (token, expert) assignments that went to each expert (sums to 1);
    ``first_only``: of the first choices only. Zeros for ``N = 0``."""
    chosen = experts[:, :1] if first_only else experts
    if chosen.numel() == 0:
        return torch.zeros(num_experts, device=experts.device)
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
    return counts / chosen.numel()


def balance_term(record: RouterRecord, num_experts: int, form: str = "switch") -> torch.Tensor:
    """Switch-style load-balancing loss of one layer's forward: ``E * sum_e f_e * P_e``.

    ``P_e`` is the mean router probability of expert ``e`` over the real tokens (it carries the gradient) and ``f_e``
    the fraction of the real tokens' assignments that went to ``e`` (:func:`load_fractions`; ``form="top1"`` counts
    first choices only, the GShard / DeepSpeed top-2 form). Both forms are 1 under a perfectly uniform router and
    reach ``E`` when one expert takes every token with probability 1. (transformers' Mixtral
    ``load_balancing_loss_func`` counts each of the k choices as a full token, so its value is ``top_k`` times the
    ``"switch"`` form.)
    """
    if form not in ("switch", "top1"):
        raise ValueError(f"balance form must be 'switch' or 'top1', got {form!r}")
    probs, experts = record.real()
    if probs.shape[0] == 0:
        return record.probs.sum() * 0.0
    f = load_fractions(experts, num_experts, first_only=form == "top1").to(probs.device)
    return num_experts * (f * probs.mean(dim=0)).sum()
