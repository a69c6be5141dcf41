"""Fusing SkillPacks: task arithmetic, TIES merging, and a router that keeps packs separate and picks one per input.

* ``task_arithmetic``: ``delta = scale * sum_i w_i delta_i``. When every pack stores a tensor as low-rank factors the
  merged tensor is their concatenation (``[U_1 U_2] diag(w_1 S_1, w_2 S_2) [V_1 V_2]^T``), so the merge is lossless
  and stays compressed; other tensors are summed densely.
* ``ties`` (Yadav et al. 2023, "TIES-Merging"): per tensor, trim every task vector to its top ``density`` fraction by
  magnitude, elect a sign per entry (sign of the sum of the trimmed values), average the trimmed values that agree
  with the elected sign (zeros excluded), times ``scale``. The result is dense (``exact`` entries) unless
  ``budget`` / ``energy`` re-compresses it.
* ``router``: returns a :class:`RoutedSkillPacks`: the packs stay separate; a :class:`SkillRouter` (a small
  logistic-regression classifier trained on a few example inputs of each skill, or a manual map) picks one pack per
  input (top-1) and only that pack is applied while the input runs. Adding a pack never changes what the others do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .budget import DENSE_BYTES_PER_ELEMENT
from .entry import Entry
from .errors import SkillPackError
from .pack import SkillPack, compress_deltas

METHODS = ("task_arithmetic", "ties", "router")


def _check_same_base(packs: Sequence[SkillPack]) -> None:
    if not packs:
        raise SkillPackError("fuse() needs at least one SkillPack")
    if not all(isinstance(p, SkillPack) for p in packs):
        raise SkillPackError("fuse() takes a list of SkillPack objects")
    fps = {p.base_fingerprint for p in packs}
    if len(fps) > 1:
        raise SkillPackError(
            f"the packs were extracted from {len(fps)} different base models (fingerprints differ); "
            "only packs of the same base can be fused"
        )
    shapes = {}
    for p in packs:
        for n, e in p.entries.items():
            if shapes.setdefault(n, e.shape) != e.shape:
                raise SkillPackError(f"tensor {n} has shape {e.shape} in one pack and {shapes[n]} in another")


def ties_merge_tensors(
    deltas: Sequence[torch.Tensor], density: float = 0.2, scale: float = 1.0, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """TIES merge of same-shaped task vectors: trim (top ``density`` by |.| per vector, ties at the threshold kept),
    elect sign (sign of the sum of the trimmed, weighted vectors), disjoint mean over the agreeing non-zero values."""
    if not 0 < density <= 1:
        raise SkillPackError(f"density must be in (0, 1], got {density}")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    trimmed = []
    for d, w in zip(deltas, weights):
        d = d.float() * w
        k = max(1, int(round(density * d.numel())))
        if k < d.numel():
            thresh = d.abs().reshape(-1).kthvalue(d.numel() - k + 1).values
            d = torch.where(d.abs() >= thresh, d, torch.zeros_like(d))
        trimmed.append(d)
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    count = agree.sum(0).clamp_min(1)
    return scale * (t * agree).sum(0) / count


def _dense_items(packs, names):
    items = []
    for n in names:
        e = next(p.entries[n] for p in packs if n in p.entries)
        items.append(
            {
                "name": n,
                "shape": e.shape,
                "dtype": e.dtype,
                "module_type": e.module_type,
                "module_class": e.module_class,
            }
        )
    return items


def _concat_lowrank(name: str, parts: list[tuple[Entry, float]], scale: float) -> Entry:
    """``[U_1 U_2 ..] diag(w_1 s S_1, w_2 s S_2, ..) [V_1 V_2 ..]^T``: the weighted sum of low-rank entries, exactly,
    still compressed (the bit groups of every part are kept as they are)."""
    ref = parts[0][0]
    tensors, groups, s = {}, [], []
    for e, w in parts:
        for g, grp in enumerate(e.groups):
            gi = len(groups)
            for role, t in e.tensors.items():
                if role[0] in "UV" and role[1:].split(".")[0] == str(g):
                    tensors[f"{role[0]}{gi}.{role.split('.', 1)[1]}"] = t
            groups.append(tuple(grp))
        s.append(e.tensors["S"].float() * (w * scale))
    tensors["S"] = torch.cat(s)
    return Entry(
        name, "lowrank", ref.shape, ref.dtype, ref.module_type, ref.module_class, tensors, groups, ref.group_size
    )


def _task_arithmetic_entries(
    packs: list[SkillPack], weights: list[float], scale: float, names: list[str]
) -> list[Entry]:
    """Per tensor: lossless concatenation when every pack stores it low-rank (same group size), else a dense sum."""
    entries = []
    for n in names:
        parts = [(p.entries[n], w) for p, w in zip(packs, weights) if n in p.entries]
        ref = parts[0][0]
        if all(e.kind == "lowrank" and e.group_size == ref.group_size for e, _ in parts):
            entries.append(_concat_lowrank(n, parts, scale))
        else:
            d = sum(w * scale * e.delta() for e, w in parts)
            entries.append(
                Entry(n, "exact", ref.shape, ref.dtype, ref.module_type, ref.module_class, {"D": d.contiguous()})
            )
    return entries


def _merged_items(
    packs: list[SkillPack], method: str, weights: list[float], scale: float, density: float, names: list[str]
) -> list[dict]:
    """Dense merged deltas (TIES or weighted sum) of every tensor that does not cancel out."""
    items = _dense_items(packs, names)
    for it in items:
        n = it["name"]
        ds = [p.entries[n].delta() if n in p.entries else torch.zeros(it["shape"]) for p in packs]
        if method == "ties":
            it["delta"] = ties_merge_tensors(ds, density=density, scale=scale, weights=weights)
        else:
            it["delta"] = scale * sum(w * d for w, d in zip(weights, ds))
    return [it for it in items if torch.any(it["delta"] != 0)]


def fuse(
    packs: Sequence[SkillPack],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    density: float = 0.2,
    budget=None,
    energy: float | None = None,
    router=None,
    names: Sequence[str] | None = None,
    name: str | None = None,
    **compress_kwargs,
):
    """Fuse SkillPacks of one base model.

    ``task_arithmetic`` / ``ties`` return a new :class:`SkillPack` (apply it like any pack). ``weights`` scale each
    pack (default 1), ``scale`` the result; ``density`` is TIES's trim fraction. ``budget`` or ``energy`` re-compress
    the merged deltas with :meth:`SkillPack.extract`'s rules (extra keyword arguments go there). ``router`` returns a
    :class:`RoutedSkillPacks`; pass ``router=`` a :class:`SkillRouter` (or fit one later) and ``names`` for the packs.
    """
    if method not in METHODS:
        raise SkillPackError(f"method must be one of {METHODS}, got {method!r}")
    packs = list(packs)
    _check_same_base(packs)
    if method == "router":
        return RoutedSkillPacks(packs, router=router, names=names)
    weights = [1.0] * len(packs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(packs):
        raise SkillPackError(f"{len(weights)} weights for {len(packs)} packs")
    all_names = sorted({n for p in packs for n in p.entries})
    info = {
        "fused": method,
        "sources": [p.name or p.id for p in packs],
        "weights": weights,
        "scale": scale,
        "density": density if method == "ties" else None,
        "dense_bytes": sum(next(p.entries[n] for p in packs if n in p.entries).numel for n in all_names)
        * DENSE_BYTES_PER_ELEMENT,
    }
    fp = packs[0].base_fingerprint
    if method == "task_arithmetic" and budget is None and energy is None:
        entries = _task_arithmetic_entries(packs, weights, scale, all_names)
        return SkillPack(entries, fp, name=name or "task_arithmetic", info=info)
    items = _merged_items(packs, method, weights, scale, density, all_names)
    if budget is not None or energy is not None:
        pack = compress_deltas(items, fp, budget=budget, energy=energy, name=name or method, **compress_kwargs)
        pack.info.update({k: v for k, v in info.items() if k != "dense_bytes"})
        return pack
    entries = [
        Entry(
            it["name"],
            "exact",
            it["shape"],
            it["dtype"],
            it["module_type"],
            it["module_class"],
            {"D": it["delta"].contiguous()},
        )
        for it in items
    ]
    return SkillPack(entries, fp, name=name or method, info=info)


# -------------------------------------------------------------------------------------------------------- router
class SkillRouter:
    """Picks a pack index per input.

    * Learned (:meth:`fit`): multinomial logistic regression on feature vectors (e.g. mean-pooled base-model
      embeddings of the input), standardised, L2-regularised, trained with L-BFGS; a few examples per skill suffice.
    * Manual (:meth:`manual`): a map from a key (e.g. a task tag) to a pack index, with ``key_fn(input) -> key``.
    """

    def __init__(self):
        self.kind = None
        self.mean = self.std = self.weight = self.bias = None
        self.mapping = None
        self.key_fn = None

    @classmethod
    def manual(cls, mapping: dict, key_fn: Callable | None = None) -> SkillRouter:
        r = cls()
        r.kind, r.mapping, r.key_fn = "manual", dict(mapping), key_fn or (lambda x: x)
        return r

    def fit(self, features: torch.Tensor, labels, l2: float = 1e-3, max_iter: int = 200) -> SkillRouter:
        x = torch.as_tensor(features, dtype=torch.float32)
        y = torch.as_tensor(labels, dtype=torch.long)
        if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise SkillPackError(
                f"router.fit needs features [N, D] and labels [N]; got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        n_cls = int(y.max()) + 1
        if len(set(y.tolist())) < 2:
            raise SkillPackError("router.fit needs examples of at least two skills")
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones(x.shape[1])
        z = (x - self.mean) / self.std
        w = torch.zeros(x.shape[1], n_cls, requires_grad=True)
        b = torch.zeros(n_cls, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.kind, self.weight, self.bias = "learned", w.detach(), b.detach()
        return self

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind != "learned":
            raise SkillPackError("predict_proba needs a fitted router (SkillRouter().fit(...))")
        z = (torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std
        return torch.softmax(z @ self.weight + self.bias, -1)

    def predict(self, inputs) -> list[int]:
        """Pack index per input: ``inputs`` are feature rows (learned) or raw inputs for ``key_fn`` (manual)."""
        if self.kind == "manual":
            out = []
            for x in inputs:
                key = self.key_fn(x)
                if key not in self.mapping:
                    raise SkillPackError(f"manual router has no pack for key {key!r} (known: {list(self.mapping)})")
                out.append(int(self.mapping[key]))
            return out
        if self.kind == "learned":
            return self.predict_proba(inputs).argmax(-1).tolist()
        raise SkillPackError("the router is neither fitted nor manual")


class RoutedSkillPacks:
    """Separate SkillPacks plus a router. Only the chosen pack is on the model while an input runs (top-1)."""

    def __init__(
        self,
        packs: Sequence[SkillPack],
        router: SkillRouter | None = None,
        names: Sequence[str] | None = None,
        featurizer: Callable | None = None,
    ):
        _check_same_base(list(packs))
        self.packs = list(packs)
        self.names = list(names) if names is not None else [p.name or f"pack{i}" for i, p in enumerate(self.packs)]
        if len(self.names) != len(self.packs):
            raise SkillPackError(f"{len(self.names)} names for {len(self.packs)} packs")
        self.router = router
        self.featurizer = featurizer

    def add(self, pack: SkillPack, name: str | None = None) -> int:
        """Add a skill; the existing packs are untouched (refit the router with examples of the new skill)."""
        _check_same_base(self.packs + [pack])
        self.packs.append(pack)
        self.names.append(name or pack.name or f"pack{len(self.packs) - 1}")
        return len(self.packs) - 1

    def fit_router(self, examples: dict, featurizer: Callable, **fit_kwargs) -> SkillRouter:
        """Train the router from ``{pack name or index: [inputs...]}``; ``featurizer(list_of_inputs) -> [N, D]``."""
        feats, labels = [], []
        for key, xs in examples.items():
            idx = self.names.index(key) if not isinstance(key, int) else key
            xs = list(xs)
            feats.append(torch.as_tensor(featurizer(xs), dtype=torch.float32))
            labels += [idx] * len(xs)
        self.featurizer = featurizer
        self.router = SkillRouter().fit(torch.cat(feats), torch.tensor(labels), **fit_kwargs)
        return self.router

    def route(self, inputs: Sequence) -> list[int]:
        if self.router is None:
            raise SkillPackError("no router: pass router= or call fit_router(...)")
        if self.router.kind == "learned":
            if self.featurizer is None:
                raise SkillPackError("a learned router needs a featurizer (fit_router sets it)")
            return self.router.predict(self.featurizer(list(inputs)))
        return self.router.predict(inputs)

    @contextlib.contextmanager
    def use(self, model, index: int, scale: float = 1.0, strict: bool = True):
        """Context manager: pack ``index`` applied to ``model`` inside, removed (base restored exactly) on exit."""
        pack = self.packs[index]
        pack.apply(model, scale=scale, strict=strict)
        try:
            yield model
        finally:
            pack.remove(model)

    def run(self, model, inputs: Sequence, fn: Callable, routes: Sequence[int] | None = None):
        """Route every input, then call ``fn(model, sub_inputs)`` once per chosen pack with that pack applied.

        ``fn`` returns a tensor (first dim = len(sub_inputs)) or a list; the results come back in input order as a
        list, together with the routes."""
        inputs = list(inputs)
        routes = list(self.route(inputs) if routes is None else routes)
        if len(routes) != len(inputs):
            raise SkillPackError(f"{len(routes)} routes for {len(inputs)} inputs")
        out = [None] * len(inputs)
        for k in sorted(set(routes)):
            idx = [i for i, r in enumerate(routes) if r == k]
            with self.use(model, k):
                res = fn(model, [inputs[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = res[j]
        return out, routes
