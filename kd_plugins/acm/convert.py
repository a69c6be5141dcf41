"""``acmize``: replace dense MLP blocks (and optionally attention projections) of a model by ACMs.

Supported layouts (found by structure, not by class name):

- HF BERT-style encoders (BERT, MiniLM, RoBERTa, MPNet, ...): a layer with ``intermediate.dense`` (+ activation) and
  ``output.dense``. The ACM replaces ``layer.intermediate`` and ``layer.output.dense`` becomes ``nn.Identity``, so
  ``BertOutput`` keeps its dropout, residual and LayerNorm: ``LN(dropout(ACM(z)) + z)``.
- Llama-family MLPs: ``mlp.gate_proj/up_proj/down_proj`` (SwiGLU learners slice gate/up rows and down columns).
- timm ``Mlp``: ``fc1 -> act -> fc2`` (the ACM replaces the whole ``Mlp``; its output dropout is kept).
- attention projections (``targets="attention"``): q/k/v/o ``nn.Linear`` layers become low-rank learners
  ``d_in -> r -> d_out`` with identity activation, ``min_choice=1`` (a projection always runs >= 1 learner).

Learner init:

- ``init="random"`` — the paper: fresh learners of width ``round(D_ff / N)``, trained by stage 1.
- ``init="slice"`` — learner ``n`` holds hidden units ``[n*w, (n+1)*w)`` of the dense block (W1 rows, b1, W2 columns)
  and learner 1 also carries the output bias, so ``h(z, N)`` equals the dense block exactly. With
  ``order="importance"`` the hidden units are first sorted by importance ``mean|a_j| * ||W2[:, j]||`` (activations
  ``a_j`` measured on ``calibration`` batches; without calibration data ``||W1[j]|| * ||W2[:, j]||``), so learner 1
  holds the most important units and small ``k`` already approximates the block well — a better warm start than
  contiguous chunks of an arbitrary order. Projections are sliced by SVD (components sorted by singular value;
  exact only when ``N * r >= rank``).
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .._config import resolve_config
from .config import ACMConfig
from .modules import ACMBlock, ACMContext, acm_blocks, run_batch

__all__ = ["acmize", "find_candidates", "Candidate"]

_PROJ_RE = re.compile(
    r"(^|\.)(attention|attn|self_attn)(\.[A-Za-z_]+)?\.(query|key|value|q|k|v|o|q_proj|k_proj|"
    r"v_proj|o_proj|qkv|proj|dense)$"
)


@dataclass
class Candidate:
    """A dense block that can become an ACM."""

    name: str  # module replaced by the ACM
    family: str  # "bert", "llama", "timm", "proj"
    source_in: str  # module whose input is the block input z (in the original model)
    source_out: str  # module whose output is the block output o (in the original model)
    d_in: int
    d_out: int
    hidden: int  # D_ff (or min(d_in, d_out) for projections)
    extra: dict = field(default_factory=dict)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(_get(model, parent), attr, module)


def find_candidates(model: nn.Module) -> dict[str, Candidate]:
    """All MLP blocks and attention projections of ``model`` that :func:`acmize` can convert."""
    out: dict[str, Candidate] = {}
    for name, m in model.named_modules():
        if isinstance(m, ACMBlock):
            continue
        pre = f"{name}." if name else ""
        inter, outp = getattr(m, "intermediate", None), getattr(m, "output", None)
        if (
            isinstance(getattr(inter, "dense", None), nn.Linear)
            and isinstance(getattr(outp, "dense", None), nn.Linear)
            and hasattr(inter, "intermediate_act_fn")
        ):
            d1, d2 = inter.dense, outp.dense
            out[pre + "intermediate"] = Candidate(
                pre + "intermediate",
                "bert",
                pre + "intermediate",
                pre + "output.dense",
                d1.in_features,
                d2.out_features,
                d1.out_features,
            )
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            out[name] = Candidate(
                name, "llama", name, name, m.gate_proj.in_features, m.down_proj.out_features, m.gate_proj.out_features
            )
        elif (
            isinstance(getattr(m, "fc1", None), nn.Linear)
            and isinstance(getattr(m, "fc2", None), nn.Linear)
            and hasattr(m, "act")
            and type(m).__name__ == "Mlp"
        ):
            out[name] = Candidate(name, "timm", name, name, m.fc1.in_features, m.fc2.out_features, m.fc1.out_features)
    for name, m in model.named_modules():
        if (
            isinstance(m, nn.Linear)
            and _PROJ_RE.search(name)
            and name not in out
            and not any(name == c.source_out or name.startswith(c.name + ".") for c in list(out.values()))
        ):
            out[name] = Candidate(
                name, "proj", name, name, m.in_features, m.out_features, min(m.in_features, m.out_features)
            )
    return out


def _select(cands: dict[str, Candidate], targets: str | Iterable[str]) -> list[Candidate]:
    pats = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not pats:
        raise ValueError("targets is empty: pass 'mlp', 'attention', 'all' or module-name patterns")
    chosen: dict[str, Candidate] = {}
    for p in pats:
        if p == "mlp":
            hit = [c for c in cands.values() if c.family != "proj"]
        elif p in ("attention", "attn"):
            hit = [c for c in cands.values() if c.family == "proj"]
        elif p == "all":
            hit = list(cands.values())
        else:
            hit = [c for c in cands.values() if fnmatch.fnmatchcase(c.name, p) or c.name == p]
        if not hit:
            names = sorted(cands)
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(
                f"ACM target pattern {p!r} matched no module. "
                + (
                    f"Convertible modules: {shown}. Use 'mlp', 'attention', 'all' or a glob over these names."
                    if names
                    else "This model has no MLP block or attention projection that acmize recognises "
                    "(HF BERT/MPNet-style encoders, Llama-family MLPs, timm Mlp, q/k/v/o Linear)."
                )
            )
        for c in hit:
            chosen[c.name] = c
    return sorted(chosen.values(), key=lambda c: list(cands).index(c.name))


def _dense_weights(model: nn.Module, c: Candidate) -> dict[str, Any]:
    m = _get(model, c.name)
    if c.family == "bert":
        d1, d2 = m.dense, _get(model, c.source_out)
        return dict(W1=d1.weight, b1=d1.bias, W2=d2.weight, b2=d2.bias, act=m.intermediate_act_fn, second=d2)
    if c.family == "llama":
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        return dict(W1=g.weight, b1=g.bias, W3=u.weight, b3=u.bias, W2=d.weight, b2=d.bias, act=m.act_fn, second=d)
    if c.family == "timm":
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            raise ValueError(
                f"{c.name}: timm Mlp with a hidden norm layer ({type(m.norm).__name__}) cannot be split "
                "into learners; exclude it from targets"
            )
        drop = getattr(m, "drop2", None)
        return dict(
            W1=m.fc1.weight,
            b1=m.fc1.bias,
            W2=m.fc2.weight,
            b2=m.fc2.bias,
            act=m.act,
            second=m.fc2,
            dropout=float(getattr(drop, "p", 0.0) or 0.0),
        )
    return dict(W=m.weight, b=m.bias)


@torch.no_grad()
def _calibrate(model: nn.Module, cands: list[Candidate], calibration: Iterable) -> dict[str, torch.Tensor]:
    """Mean |hidden activation| per hidden unit of each MLP candidate (input of its second linear)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for c in cands:
        if c.family == "proj":
            continue
        second = _dense_weights(model, c)["second"]

        def hook(mod, args, name=c.name):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs()
            sums[name] = sums.get(name, 0) + a.sum(0)
            counts[name] = counts.get(name, 0) + a.shape[0]

        handles.append(second.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for batch in calibration:
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def _divisors(n: int, limit: int = 16) -> list[int]:
    return [d for d in range(2, min(n, 64) + 1) if n % d == 0][:limit]


def _build_block(
    model: nn.Module,
    c: Candidate,
    N: int,
    init: str,
    order: str,
    gate_hidden: int,
    attention_rank: int,
    act_scale: torch.Tensor | None,
    spec: dict | None = None,
) -> ACMBlock:
    w = _dense_weights(model, c)
    ref = w.get("W1", w.get("W"))
    if c.family == "proj":
        rank = spec["width"] if spec else (attention_rank or max(1, round(c.d_in * c.d_out / (N * (c.d_in + c.d_out)))))
        block = ACMBlock(
            c.d_in,
            c.d_out,
            N,
            rank,
            nn.Identity(),
            hidden_bias=False,
            output_bias=w["b"] is not None if spec is None else spec["output_bias"],
            min_choice=1,
            gate_hidden=gate_hidden,
            kind="proj",
        )
        if init == "slice" and spec is None:
            W = w["W"].detach().float()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            r = min(N * rank, S.numel())
            sq = S[:r].sqrt()
            with torch.no_grad():
                block.w1.zero_()
                block.w2.zero_()
                block.w1[:r] = (sq[:, None] * Vh[:r]).to(block.w1.dtype)
                block.w2[:r] = (U[:, :r] * sq[None]).T.to(block.w2.dtype)
                if block.b2 is not None:
                    block.b2.copy_(w["b"])
        elif spec is None and block.b2 is not None:
            with torch.no_grad():
                block.b2.copy_(w["b"])
    else:
        D = c.hidden
        if spec is not None:
            width = spec["width"]
        elif init == "slice":
            if D % N:
                raise ValueError(
                    f"init='slice' needs the hidden width of {c.name} ({D}) to be divisible by num_learners={N}. "
                    f"num_learners in {_divisors(D)} would slice it exactly; or use init='random' (the paper), "
                    f"which would give learners of width round({D}/{N}) = {round(D / N)}."
                )
            width = D // N
        else:
            width = max(1, round(D / N))
        glu = c.family == "llama"
        act = copy.deepcopy(w["act"])
        block = ACMBlock(
            c.d_in,
            c.d_out,
            N,
            width,
            act,
            glu=glu,
            hidden_bias=(w["b1"] is not None) if spec is None else spec["hidden_bias"],
            output_bias=((w["b2"] is not None) if init == "slice" else False) if spec is None else spec["output_bias"],
            min_choice=0,
            gate_hidden=gate_hidden,
            kind="mlp",
            dropout=w.get("dropout", 0.0),
        )
        if init == "slice" and spec is None:
            W1, W2 = w["W1"].detach(), w["W2"].detach()
            if order == "importance":
                col = W2.float().norm(dim=0)
                if act_scale is not None:
                    imp = act_scale.to(col.device) * col
                else:
                    imp = W1.float().norm(dim=1) * col * (w["W3"].detach().float().norm(dim=1) if glu else 1.0)
                perm = torch.argsort(imp, descending=True)
            else:
                perm = torch.arange(D)
            with torch.no_grad():
                block.w1.copy_(W1[perm])
                block.w2.copy_(W2[:, perm].T)
                if block.b1 is not None:
                    block.b1.copy_(w["b1"][perm])
                if glu:
                    block.w3.copy_(w["W3"].detach()[perm])
                    if block.b3 is not None:
                        block.b3.copy_(w["b3"][perm])
                if block.b2 is not None:
                    block.b2.copy_(w["b2"])
    block.to(device=ref.device, dtype=ref.dtype)
    return block


def _install_mask_hook(model: nn.Module, ctx: ACMContext) -> None:
    if getattr(model, "_acm_hooks", None):
        return

    def pre(mod, args, kwargs):
        am = kwargs.get("attention_mask")
        if am is None and len(args) > 1 and torch.is_tensor(args[1]):
            am = args[1]
        ctx.token_mask = am.bool() if torch.is_tensor(am) and am.dim() == 2 else None

    def post(mod, args, kwargs, output):
        ctx.token_mask = None

    model._acm_hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]


def _replace(model: nn.Module, c: Candidate, block: ACMBlock) -> None:
    block.acm_source_in, block.acm_source_out, block.acm_family = c.source_in, c.source_out, c.family
    block.train(_get(model, c.name).training)
    _set(model, c.name, block)
    if c.family == "bert":
        _set(model, c.source_out, nn.Identity())


def acmize(
    model: nn.Module,
    targets: str | Iterable[str] | None = None,
    num_learners: int | None = None,
    *,
    init: str | None = None,
    order: str | None = None,
    calibration: Iterable | None = None,
    gate_hidden: int | None = None,
    attention_rank: int | None = None,
    config: ACMConfig | None = None,
    skip_padding: bool = True,
    execution: str | None = None,
) -> nn.Module:
    """Replace dense blocks of ``model`` (in place) by :class:`~kd_plugins.acm.ACMBlock` and return it.

    Args:
        model: an HF BERT/MPNet-style encoder, a Llama-family model or a timm ViT (anything whose blocks
            :func:`find_candidates` recognises).
        targets: ``"mlp"`` (default), ``"attention"`` (q/k/v/o projections as low-rank learners), ``"all"``, or
            glob patterns over the candidate names (comma-separated string or list).
        num_learners: ``N`` (default 4).
        init: ``"slice"`` (default; exact at ``k = N``) or ``"random"`` (the paper).
        order: ``"importance"`` (default) or ``"original"`` hidden-unit order before slicing.
        calibration: optional iterable of model inputs (dicts of tensors for HF models, image tensors for timm)
            used to measure hidden-unit activation magnitudes for ``order="importance"``.
        gate_hidden, attention_rank: see :class:`~kd_plugins.acm.ACMConfig`.
        config: an :class:`~kd_plugins.acm.ACMConfig`; explicit arguments override its fields (the precedence
            rule of every kd_plugins verb, ``kd_plugins._config.resolve_config``).
        skip_padding: at inference, padding tokens (``attention_mask == 0``) run no learner.
        execution: how learners run for per-token ``k`` (``ACMConfig.execution``; default ``"auto"``); change it
            later with :func:`~kd_plugins.acm.set_acm_execution`. Not saved: it is a property of the machine.

    The gates start untrained (stage 2 trains them); until then use ``set_acm_mode(model, "full")``.
    The frozen original model needed by the stages is *not* kept: ``copy.deepcopy`` it first.
    """
    overrides = {
        "num_learners": num_learners,
        "init": init,
        "order": order,
        "gate_hidden": gate_hidden,
        "attention_rank": attention_rank,
        "execution": execution,
    }
    cfg = resolve_config(ACMConfig, config, {k: v for k, v in overrides.items() if v is not None})  # validates
    targets = cfg.targets if targets is None else targets
    N, init, order = int(cfg.num_learners), cfg.init, cfg.order
    gate_hidden, attention_rank = cfg.gate_hidden, cfg.attention_rank
    if acm_blocks(model):
        raise ValueError(
            "model already has ACM blocks (acmize was called on it); load weights into it with "
            "kd_plugins.acm.load_acm or start from the original model"
        )
    cands = find_candidates(model)
    chosen = _select(cands, targets)
    if init == "slice":
        for c in chosen:  # fail before touching the model
            if c.family != "proj" and c.hidden % N:
                _build_block(model, c, N, init, order, gate_hidden, attention_rank, None)
    scales = (
        _calibrate(model, chosen, calibration)
        if (calibration is not None and init == "slice" and order == "importance")
        else {}
    )
    blocks = {
        c.name: _build_block(model, c, N, init, order, gate_hidden, attention_rank, scales.get(c.name)) for c in chosen
    }
    for b in blocks.values():
        b.execution = cfg.execution
    _finish(
        model,
        chosen,
        blocks,
        dict(
            targets=targets if isinstance(targets, str) else list(targets),
            num_learners=N,
            init=init,
            order=order,
            gate_hidden=gate_hidden,
            attention_rank=attention_rank,
            skip_padding=skip_padding,
        ),
    )
    return model


def _finish(model: nn.Module, chosen: list[Candidate], blocks: dict[str, ACMBlock], meta: dict) -> None:
    ctx = ACMContext()
    for c in chosen:
        b = blocks[c.name]
        b._ctx[0] = ctx
        b.skip_padding = meta.get("skip_padding", True)
        _replace(model, c, b)
    _install_mask_hook(model, ctx)
    layout = {}
    for c in chosen:
        b = blocks[c.name]
        layout[c.name] = dict(
            family=c.family,
            source_in=c.source_in,
            source_out=c.source_out,
            d_in=b.d_in,
            d_out=b.d_out,
            num_learners=b.num_learners,
            width=b.width,
            glu=b.glu,
            hidden_bias=b.b1 is not None,
            output_bias=b.b2 is not None,
            min_choice=b.min_choice,
            gate_hidden=b.gate.l1.out_features,
            dense_hidden=c.hidden,
            act=type(b.act).__name__,
        )
    model.kd_acm = dict(meta, blocks=layout)


def rebuild_layout(model: nn.Module, info: dict) -> nn.Module:
    """Re-create the ACM layout recorded in ``info`` (``model.kd_acm`` of the saved model) on the original model."""
    if acm_blocks(model):
        raise ValueError("model already has ACM blocks; pass the original (dense) model to load_acm")
    cands = find_candidates(model)
    chosen, blocks = [], {}
    for name, spec in info["blocks"].items():
        c = cands.get(name)
        if c is None or c.family != spec["family"]:
            raise ValueError(
                f"the ACM checkpoint has a {spec['family']} block at {name!r} but this model has "
                + ("no convertible module there" if c is None else f"a {c.family} block")
                + ": load it into the architecture it was saved from"
            )
        if (c.d_in, c.d_out) != (spec["d_in"], spec["d_out"]) or c.hidden != spec.get("dense_hidden", c.hidden):
            raise ValueError(
                f"ACM checkpoint block {name!r} is {spec['d_in']}->{spec.get('dense_hidden')}->"
                f"{spec['d_out']} but the model's is {c.d_in}->{c.hidden}->{c.d_out}: load it into the "
                "architecture it was saved from"
            )
        b = _build_block(model, c, spec["num_learners"], "random", "original", spec["gate_hidden"], 0, None, spec)
        chosen.append(c)
        blocks[name] = b
    _finish(model, chosen, blocks, {k: v for k, v in info.items() if k != "blocks"})
    return model
