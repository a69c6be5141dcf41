"""Adaptive Computation Modules: ``ACMBlock`` (N learners + per-token gate) with grouped sparse inference.

An ACM replaces a dense block ``y = W2 act(W1 z + b1) (+ b2)`` (or a SwiGLU MLP, or a linear projection) by ``N``
learners ``s_n(z) = W2_n act(W1_n z + b1_n)`` whose outputs add up, ``h(z, k) = s_1(z) + ... + s_k(z)``, and a tiny
gate ``g(z)`` that picks ``k`` per token. The learners are stored as contiguous slices of one concatenated weight
(``w1[n*w:(n+1)*w]``, ``w2[n*w:(n+1)*w]``), so the first ``k`` learners *are* the dense block
``act(z @ w1[:k*w].T + b1[:k*w]) @ w2[:k*w]`` of width ``k*w``: inference runs each token through its first ``k``
learners with large dense GEMMs, which is what makes an ACM faster on real hardware. How the work is laid out is the
block's ``execution`` (:mod:`kd_plugins.acm.execution`: ``"prefix"`` — one GEMM pair per learner over the prefix of
the tokens sorted by ``k``, descending; ``"grouped"`` — one GEMM pair per ``k`` group; ``"dense_masked"``;
``"triton"``; ``"auto"`` picks by device, :func:`set_acm_execution` sets it).

Output bias: the paper drops it. Blocks converted with ``init="slice"`` keep the dense block's output bias as part of
learner 1 (added whenever ``k >= 1``), so ``h(z, N)`` equals the dense block exactly; ``h(z, 0) = 0`` always.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .execution import check_execution, prefix_forward, resolve_execution, triton_forward

__all__ = [
    "ACMGate",
    "ACMBlock",
    "acm_blocks",
    "set_acm_mode",
    "set_acm_execution",
    "reset_acm_stats",
    "acm_stats",
    "token_flops",
    "ACMContext",
]


class ACMContext:
    """State shared by the ACM blocks of one model (not a module, never saved): the current padding mask
    (set by a forward pre-hook on the model from its ``attention_mask``) and whether training forwards record
    gate outputs for the stage-3 losses."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None
        self.record: bool = False


class ACMGate(nn.Module):
    """The repo's ``DeepGumbelGatingNetwork``: ``Linear(d, h) -> Linear(h, h) -> Linear(h, C)`` with no
    non-linearity (a rank-``h`` linear gate). Its logits choose among ``C`` values of ``k``."""

    def __init__(self, d_in: int, num_choices: int, hidden: int = 16):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, num_choices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.l1(x)))

    def macs(self) -> int:
        """Multiply-accumulates per token."""
        return sum(m.in_features * m.out_features for m in (self.l1, self.l2, self.l3))


class ACMBlock(nn.Module):
    """``N`` learners of hidden width ``width`` plus a gate.

    Args:
        d_in, d_out: input / output width.
        num_learners: ``N``.
        width: hidden width of one learner (FFN: ``D_ff / N``; projection: the rank ``r``).
        act: the activation module (copied from the dense block; ``nn.Identity()`` for projection learners).
        glu: SwiGLU-style learners ``W2 (act(W1 z) * W3 z)`` (Llama MLPs).
        hidden_bias: learners have first-layer biases ``b1`` (and ``b3``).
        output_bias: a shared output bias, added when ``k >= 1`` (part of learner 1).
        min_choice: smallest ``k`` the gate can choose (0 for blocks under a residual; 1 for projections).
        gate_hidden: width of the gate.
        kind: ``"mlp"`` or ``"proj"`` (informational).

    Modes (:func:`set_acm_mode`): ``"gated"`` (default; training: hard Gumbel-softmax, or the noiseless argmax with
    ``gate_noise=False``, with straight-through weighting of all cumulative outputs; eval: argmax + sparse
    inference by ``execution``), ``"full"`` (``k = N`` everywhere) and ``"fixed"`` (``k = fixed_k`` everywhere).
    ``execution`` (:func:`set_acm_execution`): ``"auto"`` (default), ``"prefix"``, ``"grouped"``,
    ``"dense_masked"`` or ``"triton"`` (:mod:`kd_plugins.acm.execution`).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_learners: int,
        width: int,
        act: nn.Module | None = None,
        *,
        glu: bool = False,
        hidden_bias: bool = True,
        output_bias: bool = False,
        min_choice: int = 0,
        gate_hidden: int = 16,
        kind: str = "mlp",
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_learners < 1 or width < 1:
            raise ValueError(f"num_learners and width must be >= 1, got {num_learners} and {width}")
        if min_choice not in (0, 1):
            raise ValueError(f"min_choice must be 0 or 1, got {min_choice}")
        self.d_in, self.d_out, self.num_learners, self.width = d_in, d_out, num_learners, width
        self.glu, self.min_choice, self.kind = glu, min_choice, kind
        D = num_learners * width
        self.w1 = nn.Parameter(torch.empty(D, d_in))
        self.b1 = nn.Parameter(torch.zeros(D)) if hidden_bias else None
        self.w3 = nn.Parameter(torch.empty(D, d_in)) if glu else None
        self.b3 = nn.Parameter(torch.zeros(D)) if (glu and hidden_bias) else None
        self.w2 = nn.Parameter(torch.empty(D, d_out))  # row block n = learner n's output layer (transposed Linear)
        self.b2 = nn.Parameter(torch.zeros(d_out)) if output_bias else None
        self.act = act if act is not None else nn.GELU()
        self.gate = ACMGate(d_in, num_learners + 1 - min_choice, gate_hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mode = "gated"
        self.fixed_k = num_learners
        self.gumbel_tau = 0.8
        self.gate_noise = True
        self.straight_through = True
        self.skip_padding = True
        self.execution = "auto"  # how learners run for per-token k (kd_plugins.acm.execution)
        self._ctx: list[ACMContext] = [ACMContext()]  # list: not a sub-module
        self.track_stats = False
        self.reset_stats()
        self.last_record: dict | None = None
        self.last_k: torch.Tensor | None = None
        self.reset_parameters()

    # -------------------------------------------------------------------------------------------- setup
    def reset_parameters(self) -> None:
        """Random learner init (the paper): each learner like a fresh ``nn.Linear`` pair."""
        for w, fan_in in ((self.w1, self.d_in), (self.w3, self.d_in), (self.w2, self.width)):
            if w is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1, self.b3):
            if b is not None:
                nn.init.uniform_(b, -1.0 / math.sqrt(self.d_in), 1.0 / math.sqrt(self.d_in))
        if self.b2 is not None:
            nn.init.zeros_(self.b2)

    @property
    def ctx(self) -> ACMContext:
        return self._ctx[0]

    def learner_parameters(self) -> Iterator[nn.Parameter]:
        """The learners' parameters (everything but the gate)."""
        for p in (self.w1, self.b1, self.w3, self.b3, self.w2, self.b2):
            if p is not None:
                yield p

    def learner_macs(self) -> int:
        """MACs per token of one learner (``p`` in the paper's budget loss)."""
        return self.width * (self.d_in * (2 if self.glu else 1) + self.d_out)

    def dense_macs(self) -> int:
        """MACs per token of all ``N`` learners (= the replaced dense block for sliced FFNs)."""
        return self.num_learners * self.learner_macs()

    def gate_macs(self) -> int:
        return self.gate.macs()

    @property
    def choices(self) -> torch.Tensor:
        """The ``k`` value of each gate logit."""
        return torch.arange(self.min_choice, self.num_learners + 1)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, num_learners={self.num_learners}, width={self.width}, "
            f"glu={self.glu}, min_choice={self.min_choice}, kind={self.kind!r}, mode={self.mode!r}"
        )

    # ------------------------------------------------------------------------------------- computation
    def _hidden(self, x: torch.Tensor, k: int) -> torch.Tensor:
        m = k * self.width
        h = F.linear(x, self.w1[:m], None if self.b1 is None else self.b1[:m])
        h = self.act(h)
        if self.glu:
            h = h * F.linear(x, self.w3[:m], None if self.b3 is None else self.b3[:m])
        return h

    def output_k(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``h(x, k)`` for every row of ``x`` (one GEMM pair of width ``k * width``)."""
        if k <= 0:
            return x.new_zeros(*x.shape[:-1], self.d_out)
        h = self._hidden(x, k)
        out = h @ self.w2[: k * self.width]
        return out + self.b2 if self.b2 is not None else out

    def learner_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each learner's own output ``s_n(x)``: ``[..., N, d_out]`` (no output bias)."""
        h = self._hidden(x, self.num_learners)
        h = h.unflatten(-1, (self.num_learners, self.width))
        return torch.einsum("...nw,nwd->...nd", h, self.w2.view(self.num_learners, self.width, self.d_out))

    def all_outputs(self, x: torch.Tensor, detach_mode: str = "none") -> torch.Tensor:
        """Cumulative outputs ``h(x, k)`` for ``k = 0..N``: ``[..., N+1, d_out]``.

        ``detach_mode="detach"`` (the released code's default): the value is the cumulative sum but learner ``k``
        receives gradient only through its own term, so it fits the residual of the frozen earlier sum.
        """
        s = self.learner_outputs(x)
        cums = s.cumsum(dim=-2)
        if detach_mode == "detach":
            cums = (cums - s).detach() + s
        elif detach_mode != "none":
            raise ValueError(f"detach_mode must be 'none' or 'detach', got {detach_mode!r}")
        if self.b2 is not None:
            cums = cums + self.b2
        zero = cums.new_zeros(*cums.shape[:-2], 1, self.d_out)
        return torch.cat([zero, cums], dim=-2)

    def choose_k(self, x: torch.Tensor) -> torch.Tensor:
        """Hard gate decision ``k`` (argmax of the gate logits) per row."""
        return self.gate(x).argmax(-1) + self.min_choice

    def reference_forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """FLOP-exact masked loop over learners (the released code's inference): tokens with ``k > n`` run
        learner ``n``. Slow; the reference for :meth:`grouped_forward`."""
        out = x.new_zeros(*x.shape[:-1], self.d_out)
        s = self.learner_outputs(x)
        for n in range(self.num_learners):
            out = out + (k > n).unsqueeze(-1).to(x.dtype) * s[..., n, :]
        if self.b2 is not None:
            out = out + (k >= 1).unsqueeze(-1).to(x.dtype) * self.b2
        return out

    def grouped_forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Sparse inference: sort tokens by ``k`` and run each group through the first ``k`` learners as one dense
        GEMM pair (``k = 0`` tokens output 0). ``x``: ``[..., d_in]``, ``k``: ``[...]`` integer."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_in)
        k2 = k.reshape(-1)
        counts = torch.bincount(k2, minlength=self.num_learners + 1).tolist()
        if counts[self.num_learners] == x2.shape[0]:
            return self.output_k(x2, self.num_learners).view(*lead, self.d_out)
        order = torch.argsort(k2)
        xs = x2.index_select(0, order)
        parts = []
        start = 0
        for kk, c in enumerate(counts):
            if c:
                parts.append(self.output_k(xs[start : start + c], kk))
            start += c
        ys = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        out = torch.empty_like(ys)
        out.index_copy_(0, order, ys)
        return out.view(*lead, self.d_out)

    def prefix_forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Sparse inference, ``"prefix"`` layout: tokens sorted by ``k`` (descending) once; learner ``j`` runs one
        GEMM pair over the prefix of tokens with ``k > j`` (:func:`kd_plugins.acm.execution.prefix_forward`)."""
        return prefix_forward(self, x, k)

    def sparse_forward(self, x: torch.Tensor, k: torch.Tensor, execution: str | None = None) -> torch.Tensor:
        """``h(x, k)`` per token by the path ``execution`` (default: the block's ``execution``; ``"auto"`` is
        resolved for this device and mode)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad)
        name = resolve_execution(execution or self.execution, x.device, self.training, needs_grad)
        if self.track_stats:
            self.stats["executions"][name] = self.stats["executions"].get(name, 0) + 1
        if name == "prefix":
            return prefix_forward(self, x, k)
        if name == "grouped":
            return self.grouped_forward(x, k)
        if name == "triton":
            return triton_forward(self, x, k)
        return self.reference_forward(x, k)

    # ------------------------------------------------------------------------------------------ forward
    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.ctx.token_mask
        if m is None or x.dim() != 3 or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        return m.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.track_stats:
            return self._forward(x)
        # Wall-clock for acm_stats (the CUDA syncs make it the block's own time; tracking is a measurement mode).
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = self._forward(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.stats["wall_s"] += time.perf_counter() - t0
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._token_mask(x)
        if self.mode == "full":
            k = torch.full(x.shape[:-1], self.num_learners, dtype=torch.long, device=x.device)
            out = self.output_k(x, self.num_learners)
            self._after(k, None, mask)
            return self.dropout(out)
        if self.mode == "fixed":
            kk = int(self.fixed_k)
            if not self.min_choice <= kk <= self.num_learners:
                raise ValueError(f"fixed_k must be in [{self.min_choice}, {self.num_learners}], got {kk}")
            k = torch.full(x.shape[:-1], kk, dtype=torch.long, device=x.device)
            self._after(k, None, mask)
            return self.dropout(self.output_k(x, kk))
        if self.mode != "gated":
            raise ValueError(f"unknown ACM mode {self.mode!r} (use 'gated', 'full' or 'fixed')")
        logits = self.gate(x)
        if self.training:
            if self.gate_noise:
                y = F.gumbel_softmax(logits.float(), tau=self.gumbel_tau, hard=True).to(x.dtype)
            else:  # the eval-time choice (argmax), gradient through softmax(logits / tau) (straight-through)
                soft = (logits.float() / self.gumbel_tau).softmax(-1)
                hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
                y = (hard + soft - soft.detach()).to(x.dtype)
            k = y.detach().argmax(-1) + self.min_choice
            if self.straight_through:
                allo = self.all_outputs(x)[..., self.min_choice :, :]
                out = torch.einsum("...c,...cd->...d", y, allo)
            else:  # the released code: index learners with the argmax, the task loss never reaches the gate
                out = self.sparse_forward(x, k)  # "auto": the masked loop (reference_forward), as before
            self._after(k, y, mask)
            return self.dropout(out)
        k = logits.argmax(-1) + self.min_choice
        if mask is not None and self.skip_padding and self.min_choice == 0:
            k = k.masked_fill(~mask.bool(), 0)
        self._after(k, None, mask)
        return self.sparse_forward(x, k)

    def _after(self, k: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.last_k = k.detach()
        if self.ctx.record:
            if y is None:
                y = F.one_hot(k - self.min_choice, self.num_learners + 1 - self.min_choice).float()
            self.last_record = {"onehot": y, "k": k.detach(), "mask": mask}
        if self.track_stats:
            kk = k.detach()
            if mask is not None:
                kk = kk[mask.bool()]
            kk = kk.reshape(-1).cpu()
            self.stats["tokens"] += kk.numel()
            self.stats["hist"] += torch.bincount(kk, minlength=self.num_learners + 1)[: self.num_learners + 1]

    def reset_stats(self) -> None:
        self.stats = {
            "tokens": 0,
            "hist": torch.zeros(self.num_learners + 1, dtype=torch.long),
            "wall_s": 0.0,
            "executions": {},
        }


# ------------------------------------------------------------------------------------------- model-level helpers
def acm_blocks(model: nn.Module) -> dict[str, ACMBlock]:
    """``{qualified name: ACMBlock}`` of ``model`` (empty when not ACMized)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ACMBlock)}


def set_acm_mode(
    model: nn.Module,
    mode: str = "gated",
    k: int | None = None,
    *,
    gumbel_tau: float | None = None,
    straight_through: bool | None = None,
    gate_noise: bool | None = None,
) -> None:
    """Set every ACM's mode: ``"gated"``, ``"full"`` (all learners) or ``"fixed"`` (``k`` learners).

    ``gumbel_tau``, ``gate_noise`` and ``straight_through`` set how gated blocks choose ``k`` in training (``None``
    leaves them as they are): Gumbel noise on (the paper) or off (training then uses the argmax choice that inference
    uses, so the learners are fitted to the routing they will be run with).
    """
    if mode not in ("gated", "full", "fixed"):
        raise ValueError(f"mode must be 'gated', 'full' or 'fixed', got {mode!r}")
    if mode == "fixed" and k is None:
        raise ValueError("mode='fixed' needs k")
    blocks = acm_blocks(model)
    if not blocks:
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    for b in blocks.values():
        b.mode = mode
        if k is not None:
            b.fixed_k = max(b.min_choice, min(int(k), b.num_learners))
        if gumbel_tau is not None:
            b.gumbel_tau = gumbel_tau
        if straight_through is not None:
            b.straight_through = straight_through
        if gate_noise is not None:
            b.gate_noise = bool(gate_noise)


def set_acm_execution(model: nn.Module, execution: str = "auto") -> None:
    """Set how every ACM of ``model`` runs its learners for per-token ``k`` (inference, and training with
    ``straight_through=False``): ``"auto"`` (default: ``"prefix"`` at inference on CPU and CUDA, the masked loop
    in training), ``"prefix"``, ``"grouped"``, ``"dense_masked"`` or ``"triton"`` (CUDA kernels, inference only).
    Outputs agree to floating-point rounding whichever is chosen (:mod:`kd_plugins.acm.execution`)."""
    check_execution(execution)
    blocks = acm_blocks(model)
    if not blocks:
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    for b in blocks.values():
        b.execution = execution


def reset_acm_stats(model: nn.Module, track: bool = True) -> None:
    """Zero the per-block choice histograms and turn tracking on (``track=True``) or off."""
    for b in acm_blocks(model).values():
        b.reset_stats()
        b.track_stats = track


def acm_stats(model: nn.Module, dense_macs: dict[str, int] | None = None) -> dict:
    """Compute accounting and wall-clock from the forwards since :func:`reset_acm_stats` (padding excluded).

    Returns ``{"blocks": {name: {...}}, "learner_fraction", "compute_fraction", "avg_macs_per_token",
    "dense_macs_per_token", ...}``: ``learner_fraction`` = executed learner MACs / all-learner MACs (the paper's budget
    quantity); ``compute_fraction`` also counts the gates: ``(sum k*p + gate) / dense``. FLOPs = 2 x MACs.

    Wall-clock next to the FLOPs: ``wall_s`` (seconds spent in the ACM blocks' forwards, gate included; CUDA is
    synchronised around each block while tracking), ``us_per_token`` (per real, i.e. non-padding, token, summed over
    blocks like ``avg_flops_per_token``), ``gflops_per_s`` (executed FLOPs / wall-clock), ``threads``
    (``torch.get_num_threads()`` now) and ``executions`` (how often each path ran). Padding tokens run the gate but
    no learner, so a padded batch has the same FLOPs per real token and a slightly larger ``us_per_token``.
    """
    blocks = acm_blocks(model)
    out: dict = {"blocks": {}}
    executions: dict[str, int] = {}
    ex = full = gate = 0.0
    for name, b in blocks.items():
        t = b.stats["tokens"]
        if not t:
            continue
        hist = b.stats["hist"].double()
        avg_k = float((hist * torch.arange(b.num_learners + 1)).sum() / t)
        p, g = b.learner_macs(), b.gate_macs()
        dense = (dense_macs or {}).get(name, b.dense_macs())
        out["blocks"][name] = {
            "avg_k": avg_k,
            "learner_fraction": avg_k / b.num_learners,
            "compute_fraction": (avg_k * p + g) / dense,
            "tokens": t,
            "k_hist": (hist / t).tolist(),
            "wall_s": b.stats["wall_s"],
            "us_per_token": 1e6 * b.stats["wall_s"] / t,
        }
        for name_, n in b.stats["executions"].items():
            executions[name_] = executions.get(name_, 0) + n
        ex += avg_k * p
        gate += g
        full += dense
    if full:
        lf = sum(v["avg_k"] * blocks[n].learner_macs() for n, v in out["blocks"].items()) / sum(
            blocks[n].dense_macs() for n in out["blocks"]
        )
        out.update(
            learner_fraction=lf,
            compute_fraction=(ex + gate) / full,
            avg_macs_per_token=ex + gate,
            dense_macs_per_token=full,
            avg_flops_per_token=2 * (ex + gate),
            dense_flops_per_token=2 * full,
        )
        wall = sum(v["wall_s"] for v in out["blocks"].values())
        us = sum(v["us_per_token"] for v in out["blocks"].values())
        out.update(
            wall_s=wall,
            us_per_token=us,
            gflops_per_s=(2 * (ex + gate) / (us * 1e3)) if us > 0 else float("nan"),
            threads=torch.get_num_threads(),
            executions=executions,
        )
    return out


def token_flops(model: nn.Module) -> torch.Tensor:
    """Per-token ACM FLOPs (learners executed + gates, 2 x MACs, summed over blocks) of the last forward pass,
    shaped like the blocks' token grid (e.g. ``[B, S]``)."""
    total = None
    for b in acm_blocks(model).values():
        if b.last_k is None:
            raise ValueError("run a forward pass before token_flops(model)")
        f = 2 * (b.last_k.double() * b.learner_macs() + b.gate_macs())
        total = f if total is None else total + f
    if total is None:
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    return total


def run_batch(model: nn.Module, batch) -> None:
    """Call ``model`` on one batch: a dict of keyword arguments, a tuple/list of positional ones, or one tensor."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)
