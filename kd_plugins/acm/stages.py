"""The three ACMization stages and their losses.

1. :func:`stage1_distill` — module-wise representation distillation: every ACM learns, from the frozen original
   model's block inputs ``z`` and outputs ``o`` (hooked, teacher forcing), to match ``o`` with every prefix of its
   learners: ``L = mean_{blocks, tokens, k=1..N} ||h(z, k) - o||^2`` (no end-to-end backprop; all ACMs in parallel).
2. :func:`stage2_gates` — gate pre-training as classification: labels from the learners' error ratios
   (:func:`gate_labels`), cross-entropy on the gate logits, learners frozen.
3. End-to-end fine-tuning (:class:`~kd_plugins.acm.ACMCallback`, :class:`~kd_plugins.integrations.timm.ACMTask`) with
   :func:`acm_regularizers`: budget ``L_b``, entropy ``L_e`` and diversity ``L_d`` on top of the task / distillation
   loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distill.teacher import Teacher
from ..losses.feature import embedding_cosine, embedding_mse, hidden_mse, mean_pool
from ..losses.logit import kl_divergence
from .modules import ACMBlock, acm_blocks
from .modules import run_batch as _run

__all__ = [
    "collect_block_io",
    "stage1_distill",
    "stage2_gates",
    "gate_labels",
    "block_errors",
    "sample_fractions",
    "budget_loss",
    "entropy_loss",
    "diversity_loss",
    "acm_regularizers",
    "ACMRegularizers",
    "distill_term",
    "set_recording",
    "calibrate_gate_budget",
]


def _require_blocks(model: nn.Module) -> dict[str, ACMBlock]:
    blocks = acm_blocks(model)
    if not blocks:
        raise ValueError("model has no ACM blocks: call kd_plugins.acm.acmize(model, ...) first")
    return blocks


@torch.no_grad()
def _record_tokens(
    model: nn.Module, batches: Iterable, register, count, max_tokens: int | None, dtype: torch.dtype
) -> None:
    """Run ``model`` in eval mode over ``batches`` with the hooks ``register(keep)`` installs; ``keep`` flattens a
    hooked tensor to ``[tokens, d]`` on CPU without padding tokens. Stops once ``count() >= max_tokens``."""
    state = {"mask": None}

    def keep(t: torch.Tensor) -> torch.Tensor:
        m = state["mask"]
        if m is not None and t.dim() == 3 and tuple(m.shape) == tuple(t.shape[:2]):
            t = t[m]
        return t.reshape(-1, t.shape[-1]).to("cpu", dtype)

    handles = register(keep)
    was = model.training
    model.eval()
    try:
        for batch in batches:
            am = batch.get("attention_mask") if isinstance(batch, dict) else None
            state["mask"] = am.bool() if am is not None and am.dim() == 2 else None
            _run(model, batch)
            if max_tokens is not None and count() >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def collect_block_io(
    teacher: nn.Module,
    acm_model: nn.Module,
    batches: Iterable,
    *,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the frozen original ``teacher`` on ``batches`` and return ``{acm name: (Z [T, d_in], O [T, d_out])}``:
    the input and output of every dense block that ``acm_model``'s ACMs replaced (padding tokens dropped when a
    batch dict carries ``attention_mask``), on CPU. ``max_tokens`` caps the tokens kept per block."""
    blocks = _require_blocks(acm_model)
    zs: dict[str, list] = {n: [] for n in blocks}
    os_: dict[str, list] = {n: [] for n in blocks}
    names = dict(teacher.named_modules())
    for n, b in blocks.items():
        for src in (b.acm_source_in, b.acm_source_out):
            if src not in names:
                raise ValueError(
                    f"the teacher has no module {src!r} (input/output of ACM {n!r}); pass the original "
                    "dense model (copy.deepcopy it before acmize)"
                )
            if isinstance(names[src], ACMBlock):
                raise ValueError("the teacher is ACMized: pass the original dense model as teacher")

    def register(keep):
        handles = []
        for n, b in blocks.items():
            handles.append(
                names[b.acm_source_in].register_forward_pre_hook(lambda mod, args, n=n: zs[n].append(keep(args[0])))
            )
            handles.append(
                names[b.acm_source_out].register_forward_hook(
                    lambda mod, args, out, n=n: os_[n].append(keep(out[0] if isinstance(out, tuple) else out))
                )
            )
        return handles

    first = next(iter(zs))
    # The frozen original runs through the core's Teacher (frozen, eval, no_grad), like every teacher forward.
    Teacher(teacher).run(
        lambda m: _record_tokens(m, batches, register, lambda: sum(z.shape[0] for z in zs[first]), max_tokens, dtype)
    )
    return {n: (torch.cat(zs[n])[:max_tokens], torch.cat(os_[n])[:max_tokens]) for n in blocks}


@torch.no_grad()
def collect_acm_inputs(
    acm_model: nn.Module, batches: Iterable, *, max_tokens: int | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Run the ACMized model itself (eval mode) on ``batches`` and return ``{acm name: Z [T, d_in]}``, the inputs its
    ACM blocks actually receive (padding tokens dropped), on CPU.

    After end-to-end training (stage 3) the blocks' inputs are no longer the original model's, so a gate budget
    calibrated on :func:`collect_block_io` data would miss beta on real inputs; calibrate on these instead
    (``calibrate_gate_budget(model, collect_acm_inputs(model, batches), beta)``).
    """
    blocks = _require_blocks(acm_model)
    zs: dict[str, list] = {n: [] for n in blocks}

    def register(keep):
        return [
            b.register_forward_pre_hook(lambda mod, args, n=n: zs[n].append(keep(args[0]))) for n, b in blocks.items()
        ]

    first = next(iter(zs))
    _record_tokens(acm_model, batches, register, lambda: sum(z.shape[0] for z in zs[first]), max_tokens, dtype)
    return {n: torch.cat(v)[:max_tokens] for n, v in zs.items()}


def _cosine_lr(opt, step: int, steps: int, lr: float, min_lr: float) -> None:
    cur = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / max(steps, 1)))
    for g in opt.param_groups:
        g["lr"] = cur


def stage1_distill(
    acm_model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = 500,
    lr: float = 1e-3,
    batch_tokens: int = 1024,
    detach_mode: str = "none",
    min_lr: float = 1e-6,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    seed: int = 0,
    log_every: int = 0,
    normalize: bool = False,
) -> list[float]:
    """Stage 1: train all learners of all ACMs in parallel on cached block I/O (:func:`collect_block_io`).

    Loss per block: ``mean_{tokens, k=1..N, dims} (h(z, k) - o)^2`` (the paper's MSE over every prefix length; the
    constant ``k = 0`` term is left out), averaged over blocks (``normalize=True`` divides each block's loss by the
    mean square of its targets so blocks of different scale weigh alike). Adam, cosine schedule to ``min_lr``,
    grad-clip ``clip`` (the released code's recipe). Gates are not touched. Returns the loss per step.
    """
    blocks = _require_blocks(acm_model)
    missing = [n for n in blocks if n not in data]
    if missing:
        raise ValueError(f"no cached inputs/outputs for ACM blocks {missing}; build data with collect_block_io")
    params = [p for b in blocks.values() for p in b.learner_parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    scale = {n: (data[n][1].pow(2).mean().item() if normalize else 1.0) for n in blocks}
    hist = []
    was = {n: b.training for n, b in blocks.items()}
    for b in blocks.values():
        b.train()
    try:
        for step in range(steps):
            _cosine_lr(opt, step, steps, lr, min_lr)
            loss = 0.0
            for n, b in blocks.items():
                Z, O = data[n]
                idx = torch.randint(0, Z.shape[0], (min(batch_tokens, Z.shape[0]),), generator=g)
                dev = b.w1.device
                z, o = Z[idx].to(dev, b.w1.dtype), O[idx].to(dev, b.w1.dtype)
                allo = b.all_outputs(z, detach_mode=detach_mode)[:, 1:]
                loss = loss + (allo - o[:, None]).pow(2).mean() / max(scale[n], 1e-12)
            loss = loss / len(blocks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            hist.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"[acm stage1] step {step}/{steps} loss {hist[-1]:.5f}", flush=True)
    finally:
        for n, b in blocks.items():
            b.train(was[n])
    return hist


def gate_labels(errors: torch.Tensor, tau: float = 1 / 1.2, min_k: int = 2) -> torch.Tensor:
    """The paper's gate label rule. ``errors[..., n] = ||h(z, n) - o||`` for ``n = 0..N``.

    ``label = min{n in [min_k, N] : errors[n] / errors[n-1] >= tau}`` (the first learner that no longer improves
    the error by the factor ``1/tau``), ``N`` when none qualifies. The released code's rule
    (``e_k / e_{k+1} < 1.2`` -> ``k+1``) is the same with ``tau = 1/1.2`` and ``min_k = 1`` except that its
    ``k = 0`` case maps to ``N``; the paper's set starts at ``n = 2``.
    Fixture: ``errors = [10, 4, 2, 1.9, 1.85]`` -> 3.
    """
    N = errors.shape[-1] - 1
    ratio = errors[..., 1:] / errors[..., :-1].clamp_min(1e-30)  # ratio[..., n-1] = e_n / e_{n-1}
    n = torch.arange(1, N + 1, device=errors.device)
    ok = (ratio >= tau) & (n >= max(min_k, 1))
    first = torch.where(ok, n, torch.full_like(n, N + 1)).min(-1).values
    return torch.where(first > N, torch.full_like(first, N), first)


@torch.no_grad()
def block_errors(block: ACMBlock, Z: torch.Tensor, O: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``||h(z, n) - o||_2`` for ``n = 0..N``: ``[T, N+1]``."""
    out = []
    dev, dt = block.w1.device, block.w1.dtype
    for s in range(0, Z.shape[0], chunk):
        z, o = Z[s : s + chunk].to(dev, dt), O[s : s + chunk].to(dev, dt)
        out.append((block.all_outputs(z) - o[:, None]).norm(dim=-1).float().cpu())
    return torch.cat(out)


def stage2_gates(
    acm_model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = 300,
    lr: float = 0.01,
    batch_tokens: int = 1024,
    tau: float = 1 / 1.2,
    min_k: int = 2,
    clip: float = 1.0,
    seed: int = 0,
    log_every: int = 0,
) -> dict:
    """Stage 2: train every gate to predict :func:`gate_labels` of its block (learners frozen), cross-entropy on
    the gate logits (the released code takes NLL of the straight-through one-hot; plain CE is used here).

    Returns ``{"loss": [...], "label_hist": {name: fraction per k}, "accuracy": {name: train accuracy}}``.
    """
    blocks = _require_blocks(acm_model)
    labels = {}
    for n, b in blocks.items():
        Z, O = data[n]
        lab = gate_labels(block_errors(b, Z, O), tau, min_k)
        labels[n] = (lab - b.min_choice).clamp_min(0)
    params = [p for b in blocks.values() for p in b.gate.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    hist = []
    for step in range(steps):
        _cosine_lr(opt, step, steps, lr, lr * 1e-2)
        loss = 0.0
        for n, b in blocks.items():
            Z = data[n][0]
            idx = torch.randint(0, Z.shape[0], (min(batch_tokens, Z.shape[0]),), generator=g)
            logits = b.gate(Z[idx].to(b.w1.device, b.w1.dtype)).float()
            loss = loss + F.cross_entropy(logits, labels[n][idx].to(logits.device))
        loss = loss / len(blocks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        hist.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[acm stage2] step {step}/{steps} loss {hist[-1]:.4f}", flush=True)
    acc, lh = {}, {}
    with torch.no_grad():
        for n, b in blocks.items():
            Z = data[n][0][:8192]
            pred = b.gate(Z.to(b.w1.device, b.w1.dtype)).argmax(-1).cpu()
            acc[n] = (pred == labels[n][:8192]).float().mean().item()
            lh[n] = (
                torch.bincount(labels[n] + b.min_choice, minlength=b.num_learners + 1).float() / labels[n].numel()
            ).tolist()
    return {"loss": hist, "label_hist": lh, "accuracy": acc}


# ------------------------------------------------------------------------------------------ stage-3 losses
def sample_fractions(
    ks: list[torch.Tensor], costs: list[float], num_learners: list[int], masks: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """Per-sample executed fraction ``b_i = sum_{l,j} k_ij^l p^l / sum_{l,j} N^l p^l`` over valid tokens.

    ``ks[l]``: ``[B, S]`` (float, may carry straight-through gradient) chosen ``k`` per token of ACM ``l``;
    ``costs[l]``: learner cost ``p^l``; ``masks[l]``: ``[B, S]`` valid tokens or ``None``.
    """
    num = den = 0.0
    for i, (k, p, N) in enumerate(zip(ks, costs, num_learners)):
        k = k.float()
        if k.dim() == 1:
            k = k[None]
        m = masks[i] if masks is not None else None
        m = torch.ones_like(k) if m is None else m.to(k.dtype).reshape(k.shape)
        num = num + (k * m).sum(-1) * p
        den = den + m.sum(-1) * N * p
    return num / torch.as_tensor(den).clamp_min(1e-12)


def budget_loss(fractions: torch.Tensor, beta: float) -> torch.Tensor:
    """``L_b = | mean_i b_i - beta |`` (the paper's budget loss, L1)."""
    return (fractions.mean() - beta).abs()


def entropy_loss(onehots: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``L_e``: minus the normalised entropy of each sample's distribution of choices, averaged over samples and
    ACMs (``a_{i,l,c}`` = fraction of sample ``i``'s tokens choosing ``c`` in ACM ``l``). Uniform -> -1; all tokens
    choosing the same k -> 0."""
    vals = []
    for i, y in enumerate(onehots):
        y = y.float()
        if y.dim() == 2:
            y = y[None]
        m = masks[i] if masks is not None else None
        m = torch.ones(y.shape[:-1], device=y.device) if m is None else m.float().reshape(y.shape[:-1])
        a = (y * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        C = y.shape[-1]
        ent = -(a * a.clamp_min(1e-12).log()).sum(-1) / math.log(C) if C > 1 else torch.zeros(a.shape[0])
        vals.append(ent)
    return -torch.cat(vals).mean()


def diversity_loss(fractions: torch.Tensor) -> torch.Tensor:
    """``L_d = -(1/|B|^2) sum_{i,m} |b_i - b_m|`` (the paper's across-sample diversity, negated so it is minimised;
    the released code uses twice this)."""
    return -(fractions[:, None] - fractions[None, :]).abs().mean()


@dataclass
class ACMRegularizers:
    """Stage-3 regularisers of one forward pass (tensors carry gradient to the gates)."""

    budget: torch.Tensor
    entropy: torch.Tensor
    diversity: torch.Tensor
    fraction: torch.Tensor  # mean executed learner fraction of the batch (detached)

    def total(self, alpha_budget: float, alpha_entropy: float, alpha_diversity: float) -> torch.Tensor:
        return alpha_budget * self.budget + alpha_entropy * self.entropy + alpha_diversity * self.diversity


def acm_regularizers(model: nn.Module, beta: float) -> ACMRegularizers:
    """``L_b``, ``L_e``, ``L_d`` from the gate decisions recorded by every ACM during the last forward pass
    (recording is on while ``model``'s ACM context has ``record=True``, which the callback / task set)."""
    blocks = _require_blocks(model)
    ks, costs, Ns, masks, ys = [], [], [], [], []
    for n, b in blocks.items():
        r = b.last_record
        if r is None:
            raise RuntimeError(
                f"ACM {n!r} recorded no gate decision: run a forward pass with recording on "
                "(set_acm_mode(model, 'gated') and block.ctx.record = True)"
            )
        y = r["onehot"]
        choices = b.choices.to(y.device, y.dtype)
        k = (y * choices).sum(-1)  # straight-through: value = chosen k, gradient -> gate
        ks.append(k if k.dim() > 1 else k[None])
        ys.append(y if y.dim() > 2 else y[None])
        costs.append(b.learner_macs())
        Ns.append(b.num_learners)
        m = r["mask"]
        masks.append(None if m is None else m.reshape(ks[-1].shape))
    frac = sample_fractions(ks, costs, Ns, masks)
    return ACMRegularizers(
        budget=budget_loss(frac, beta),
        entropy=entropy_loss(ys, masks),
        diversity=diversity_loss(frac),
        fraction=frac.mean().detach(),
    )


def distill_term(
    student_out,
    teacher_out,
    attention_mask: torch.Tensor | None = None,
    kind: str = "auto",
    hidden_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Distillation from the original model with the registered losses: ``kl`` on logits (``T^2 KL(p_T || q_S)``
    over valid positions) or, for bare encoders, ``cosine`` (``embedding_cosine``) / ``mse`` (``embedding_mse``) of
    mask-mean-pooled ``last_hidden_state`` embeddings, plus ``hidden_weight`` x ``hidden_mse`` of the last hidden
    states. ``student_out`` / ``teacher_out``: model outputs or logit tensors."""

    def get(o, key):
        if torch.is_tensor(o):
            return o if key == "logits" else None
        return o.get(key) if isinstance(o, dict) else getattr(o, key, None)

    s_logits, t_logits = get(student_out, "logits"), get(teacher_out, "logits")
    if kind == "auto":
        kind = "kl" if s_logits is not None and t_logits is not None else "cosine"
    if kind == "kl":
        if s_logits is None or t_logits is None:
            raise ValueError("distill_loss='kl' needs logits from both models; use 'cosine' or 'mse' for encoders")
        mask = attention_mask if attention_mask is not None and attention_mask.shape == s_logits.shape[:-1] else None
        return kl_divergence(s_logits.float(), t_logits.float(), mask=mask, temperature=temperature)
    sh, th = get(student_out, "last_hidden_state"), get(teacher_out, "last_hidden_state")
    if sh is None or th is None:
        raise ValueError(f"distill_loss={kind!r} needs last_hidden_state from both models")
    se, te = mean_pool(sh.float(), attention_mask), mean_pool(th.float(), attention_mask)
    loss = embedding_cosine(se, te) if kind == "cosine" else embedding_mse(se, te)
    if hidden_weight:
        loss = loss + hidden_weight * hidden_mse(sh.float(), th.float(), mask=attention_mask)
    return loss


def set_recording(model: nn.Module, on: bool = True) -> None:
    """Turn on/off recording of gate decisions (needed by :func:`acm_regularizers`)."""
    for b in _require_blocks(model).values():
        b.ctx.record = on
        if not on:
            b.last_record = None


@torch.no_grad()
def calibrate_gate_budget(
    acm_model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
    beta: float,
    *,
    max_tokens: int = 8192,
    iters: int = 40,
) -> float:
    """Shift every gate so the hard decisions on cached block inputs execute a learner fraction ``beta``.

    ``data`` maps each ACM name to its block inputs ``Z`` or to a ``(Z, O)`` pair (:func:`collect_block_io`: the
    original model's inputs, right before stage 3; :func:`collect_acm_inputs`: the ACM model's own, after it).

    A single Lagrange-style price ``delta`` per unit of learner cost is found by bisection and folded into the
    gates' last bias: ``logit_c -= delta * k_c * p^l / max_l p^l``. This keeps the gates' ranking of tokens and only
    moves the operating point, so a model trained at one budget (or after stage 2) can start stage 3 at ``beta``
    (or be served at another budget without retraining). Returns ``delta``.
    """
    blocks = _require_blocks(acm_model)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    pmax = max(b.learner_macs() for b in blocks.values())
    logits, ks, ps, Ns = [], [], [], []
    for n, b in blocks.items():
        if n not in data:
            raise ValueError(f"no cached inputs for ACM {n!r}; data has {sorted(data)[:4]}...")
        Z = data[n] if isinstance(data[n], torch.Tensor) else data[n][0]
        Z = Z[:max_tokens].to(b.w1.device, b.w1.dtype)
        logits.append(b.gate(Z).float())
        ks.append(b.choices.to(Z.device).float())
        ps.append(b.learner_macs())
        Ns.append(b.num_learners)

    def frac(delta: float) -> float:
        num = den = 0.0
        for lg, k, p, N in zip(logits, ks, ps, Ns):
            choice = (lg - delta * k * p / pmax).argmax(-1)
            num += k[choice].mean().item() * p
            den += N * p
        return num / den

    lo, hi = -50.0, 50.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if frac(mid) > beta:
            lo = mid
        else:
            hi = mid
    delta = 0.5 * (lo + hi)
    for b in blocks.values():
        b.gate.l3.bias.sub_(delta * b.choices.to(b.gate.l3.bias) * b.learner_macs() / pmax)
    return delta
