"""Early-exit inference: stop at the first exit that is confident (classify / generate) or stable (embed).

The model is run block by block; after each exit the samples that satisfy the criterion are answered and removed
from the batch, so the remaining depth is only computed for the undecided ones. The last exit always answers.
Every function returns which exit answered each sample (or token) and the average depth.

``simulate_early_exit`` replays the same decision rule offline from all exits' outputs (one full pass, many
thresholds: the decisions are identical because they depend only on the exits' outputs); ``plot_accuracy_vs_depth``
draws the resulting accuracy-vs-average-depth curves to a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import _hf_layers, _model_inputs, apply_head, ffn_head_layers, get_exits, hook_ffn_input, pool

__all__ = [
    "EarlyExitResult",
    "confidence",
    "early_exit_classify",
    "early_exit_embed",
    "early_exit_generate",
    "simulate_early_exit",
    "plot_accuracy_vs_depth",
]

CRITERIA = ("max_prob", "margin", "neg_entropy")


@dataclass
class EarlyExitResult:
    """``output``: logits ``[B, C]`` / embeddings ``[B, D]`` / generated ids; ``exit_layer``: ``[B]`` (or per
    generated token) layer of the exit that answered; ``average_depth``: mean of ``exit_layer``;
    ``num_layers``: the model depth (``average_depth / num_layers`` is the fraction of blocks run)."""

    output: torch.Tensor
    exit_layer: torch.Tensor
    average_depth: float
    num_layers: int


def confidence(logits: torch.Tensor, criterion: str = "max_prob") -> torch.Tensor:
    """Per-row confidence from logits: top softmax probability, top-2 margin, or negative entropy."""
    p = logits.float().softmax(-1)
    if criterion == "max_prob":
        return p.max(-1).values
    if criterion == "margin":
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        return top[..., 0] - (top[..., 1] if top.shape[-1] > 1 else 0)
    if criterion == "neg_entropy":
        return (p * p.clamp_min(1e-12).log()).sum(-1)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


# ----------------------------------------------------------------------------------------------------- steppers
class _Stop(Exception):
    pass


def _slice(obj, idx: torch.Tensor, batch: int):
    if torch.is_tensor(obj):
        return obj[idx.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice(o, idx, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice(o, idx, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice(v, idx, batch) for k, v in obj.items()}
    return obj


class _HFStepper:
    """Runs an HF model's blocks one at a time: the model's own forward prepares the embeddings and the per-layer
    arguments (masks, rotary embeddings, relative position bias), captured at the first layer and reused."""

    def __init__(self, model: nn.Module, inputs: dict):
        self.model, self.layers = model, _hf_layers(model)
        captured = {}

        def pre(mod, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        h = self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
        fwd = _model_inputs(inputs)
        if get_exits(model).family == "causal_lm":
            fwd["use_cache"] = False
        try:
            model(**fwd)
        except _Stop:
            pass
        finally:
            h.remove()
        if "args" not in captured:
            raise RuntimeError("the model's forward never reached its first layer")
        args = captured["args"]
        self.hidden0 = args[0] if args else captured["kwargs"].pop("hidden_states")
        self.args, self.kwargs = tuple(args[1:]), dict(captured["kwargs"])
        self.batch = self.hidden0.shape[0]
        self.ffn_layers = ffn_head_layers(model) if get_exits(model).family == "encoder" else set()
        self.ffn_inputs: dict[int, torch.Tensor] = {}

    def start(self) -> torch.Tensor:
        return self.hidden0

    def step(self, i: int, h: torch.Tensor) -> torch.Tensor:
        handle = hook_ffn_input(self.layers[i], self.ffn_inputs, i + 1) if i + 1 in self.ffn_layers else None
        try:
            out = self.layers[i](h, *self.args, **self.kwargs)
        finally:
            if handle is not None:
                handle.remove()
        return out[0] if isinstance(out, (tuple, list)) else out

    def head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return apply_head(self.model, k, h, ffn_input=self.ffn_inputs.pop(k, None))

    def select(self, idx: torch.Tensor) -> None:
        self.args = _slice(self.args, idx, self.batch)
        self.kwargs = _slice(self.kwargs, idx, self.batch)
        self.batch = int(idx.numel())


class _TimmStepper:
    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x, self.family = model, x, get_exits(model).family

    def start(self) -> torch.Tensor:
        m, x = self.model, self.x
        if self.family == "timm_vit":
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)
        x = m.act1(m.bn1(m.conv1(x)))
        return m.maxpool(x)

    def head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return apply_head(self.model, k, h)

    def step(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.family == "timm_vit":
            return self.model.blocks[i](h)
        return getattr(self.model, f"layer{i + 1}")(h)

    def select(self, idx: torch.Tensor) -> None:
        pass


def _stepper(model, inputs):
    ex = get_exits(model)
    if ex.family.startswith("timm"):
        if not torch.is_tensor(inputs):
            raise ValueError("timm models: pass the image batch tensor")
        return _TimmStepper(model, inputs)
    if not isinstance(inputs, Mapping):
        raise ValueError("HF models: pass the tokenizer output / a dict with input_ids and attention_mask")
    return _HFStepper(model, dict(inputs))


def _check_threshold(threshold: float, criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion in ("max_prob", "margin") and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold for {criterion!r} must lie in [0, 1], got {threshold}")


# --------------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def _run(model, inputs, decide, finish):
    ex = get_exits(model)
    was = model.training
    model.eval()
    try:
        st = _stepper(model, inputs)
        h = st.start()
        B = h.shape[0]
        active = torch.arange(B, device=h.device)
        am = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        results: dict[int, torch.Tensor] = {}
        exit_layer = torch.zeros(B, dtype=torch.long)
        state = {}
        for i in range(ex.deepest):
            h = st.step(i, h)
            k = i + 1
            if k not in ex.layers:
                continue
            out, done = decide(k, st.head(k, h), am, state, last=k == ex.deepest)
            for j in torch.nonzero(done).flatten().tolist():
                results[int(active[j])] = out[j]
                exit_layer[int(active[j])] = k
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            if keep.numel() < done.numel():
                active, h = active[keep], h[keep]
                st.select(keep)
                am = am[keep.to(am.device)] if am is not None else None
                state = {n: v[keep] for n, v in state.items()}
        output = finish(torch.stack([results[b] for b in range(B)]))
        return EarlyExitResult(output, exit_layer, float(exit_layer.float().mean()), ex.num_layers)
    finally:
        model.train(was)


def early_exit_classify(
    model: nn.Module, inputs, threshold: float = 0.9, criterion: str = "max_prob"
) -> EarlyExitResult:
    """Classify with early exit: each sample stops at the first exit whose confidence reaches ``threshold``.

    ``inputs``: the HF tokenizer output (dict with ``input_ids``/``attention_mask``) or a timm image batch.
    Works for sequence classifiers and timm classifiers. ``output`` holds the answering exit's logits.
    """
    ex = get_exits(model)
    if ex.kind != "logits" or ex.family == "causal_lm":
        raise ValueError(
            f"early_exit_classify needs a classifier; this is a {ex.family} model "
            "(use early_exit_embed / early_exit_generate)"
        )
    _check_threshold(threshold, criterion)

    def decide(k, logits, am, state, last):
        done = (
            torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            if last
            else confidence(logits, criterion) >= threshold
        )
        return logits, done

    return _run(model, inputs, decide, lambda x: x)


def early_exit_embed(model: nn.Module, inputs, threshold: float = 0.99, normalize: bool = True) -> EarlyExitResult:
    """Sentence embeddings with early exit on stability: a sample stops at the first exit whose pooled embedding
    has cosine similarity >= ``threshold`` with the previous exit's (so the earliest possible answer is the
    second exit); ``output`` is that exit's embedding (L2-normalised when ``normalize``)."""
    ex = get_exits(model)
    if ex.family != "encoder":
        raise ValueError(f"early_exit_embed needs a bare encoder; this is a {ex.family} model")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")

    def decide(k, tokens, am, state, last):
        e = pool(tokens, am, ex.pooling).float()
        if "prev" in state:
            done = F.cosine_similarity(e, state["prev"], dim=-1) >= threshold
        else:
            done = torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
        if last:
            done[:] = True
        state["prev"] = e
        return e, done

    return _run(model, inputs, decide, lambda x: F.normalize(x, dim=-1) if normalize else x)


@torch.no_grad()
def early_exit_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    threshold: float = 0.9,
    criterion: str = "max_prob",
    eos_token_id: int | None = None,
) -> EarlyExitResult:
    """Greedy generation where every new token comes from the first confident exit.

    One sequence at a time (``input_ids`` ``[1, T]`` or ``[T]``). Each step re-runs the prefix without a KV
    cache (deeper layers of earlier tokens may never have been computed) and stops at the first exit whose
    next-token confidence reaches ``threshold``. ``output``: the generated ids ``[n]`` (without the prompt);
    ``exit_layer``: the answering exit per generated token.
    """
    ex = get_exits(model)
    if ex.family != "causal_lm":
        raise ValueError(f"early_exit_generate needs a causal LM; this is a {ex.family} model")
    _check_threshold(threshold, criterion)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"early_exit_generate handles one sequence at a time, got batch {ids.shape[0]}")
    was = model.training
    model.eval()
    new, exits = [], []
    try:
        for _ in range(max_new_tokens):
            st = _HFStepper(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            h = st.start()
            for i in range(ex.deepest):
                h = st.step(i, h)
                k = i + 1
                if k not in ex.layers:
                    continue
                logits = apply_head(model, k, h[:, -1:])[0, -1]
                if k == ex.deepest or float(confidence(logits, criterion)) >= threshold:
                    break
            tok = int(logits.argmax())
            new.append(tok)
            exits.append(k)
            ids = torch.cat([ids, torch.tensor([[tok]], device=ids.device)], dim=1)
            if eos_token_id is not None and tok == eos_token_id:
                break
    finally:
        model.train(was)
    el = torch.tensor(exits)
    return EarlyExitResult(torch.tensor(new), el, float(el.float().mean()), ex.num_layers)


# ------------------------------------------------------------------------------------------ curves and plotting
def simulate_early_exit(
    exit_logits: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    thresholds: Sequence[float],
    criterion: str = "max_prob",
) -> list[dict]:
    """Accuracy and average depth of confidence-based early exit for each threshold, from all exits' logits.

    ``exit_logits``: ``layer -> [N, C]`` (e.g. from :func:`~kd_plugins.multiexit.exit_outputs` over a test set).
    Returns one dict per threshold: ``threshold``, ``accuracy``, ``average_depth`` and ``exit_share`` (fraction
    answered by each exit). Same rule as :func:`early_exit_classify`.
    """
    layers = sorted(exit_logits)
    labels = labels.cpu()
    conf = {k: confidence(exit_logits[k].cpu(), criterion) for k in layers}
    pred = {k: exit_logits[k].cpu().argmax(-1) for k in layers}
    out = []
    for t in thresholds:
        undecided = torch.ones(labels.shape[0], dtype=torch.bool)
        final_pred = torch.zeros_like(labels)
        depth = torch.zeros(labels.shape[0])
        share = {}
        for k in layers:
            take = undecided & ((conf[k] >= t) if k != layers[-1] else torch.ones_like(undecided))
            final_pred[take], depth[take] = pred[k][take], float(k)
            share[k] = float(take.float().mean())
            undecided &= ~take
        out.append(
            {
                "threshold": float(t),
                "accuracy": float((final_pred == labels).float().mean()),
                "average_depth": float(depth.mean()),
                "exit_share": share,
            }
        )
    return out


def plot_accuracy_vs_depth(
    curves: Mapping[str, Sequence[dict]],
    path,
    *,
    num_layers: int | None = None,
    per_exit: Mapping[str, Mapping[int, float]] | None = None,
    title: str = "Early exit: accuracy vs average depth",
) -> str:
    """Draw accuracy-vs-average-depth curves (from :func:`simulate_early_exit`) to a PNG at ``path``.

    ``curves``: ``name -> points``; ``per_exit``: optional ``name -> {layer: accuracy}`` drawn as markers (each
    exit used alone); ``num_layers``: draws depth as a fraction of the model when given. Needs matplotlib.
    Draws on its own ``Figure`` with the Agg canvas: matplotlib's global backend and pyplot state (inline plots in a
    notebook) are left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot_accuracy_vs_depth needs matplotlib: pip install matplotlib") from None
    scale = 1.0 / num_layers if num_layers else 1.0
    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for n, (name, pts) in enumerate(curves.items()):
        color = f"C{n}"
        pts = sorted(pts, key=lambda p: p["average_depth"])
        ax.plot(
            [p["average_depth"] * scale for p in pts],
            [p["accuracy"] for p in pts],
            "-",
            color=color,
            label=f"{name}: early exit",
        )
        if per_exit and name in per_exit:
            ks = sorted(per_exit[name])
            ax.plot(
                [k * scale for k in ks],
                [per_exit[name][k] for k in ks],
                "o",
                color=color,
                markersize=6,
                label=f"{name}: single exit",
            )
    ax.set_xlabel("average depth (fraction of blocks)" if num_layers else "average depth (blocks)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)
