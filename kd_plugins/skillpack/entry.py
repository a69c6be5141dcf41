"""``Entry``: one compressed parameter delta (low-rank quantized factors, exact fp32 values, or sparse top entries)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import quant as Q
from .errors import SkillPackError


@dataclass
class Entry:
    """One compressed parameter delta. ``tensors`` maps roles to stored tensors:
    lowrank: ``S`` plus ``U{g}.q``/``U{g}.s``/``V{g}.q``/``V{g}.s`` per bit group ``g``; exact: ``D``; sparse:
    ``idx``/``val``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str
    module_class: str
    tensors: dict[str, torch.Tensor]
    groups: list[tuple[int, int]] = field(default_factory=list)  # lowrank: (bits, n_columns), leading first
    group_size: int = 64
    rel_error: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rank(self) -> int:
        return sum(c for _, c in self.groups) if self.kind == "lowrank" else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], self.numel // self.shape[0]

    def _factor_group(self, role: str, group: int, bits: int, rows: int) -> torch.Tensor:
        prefix = f"{role}{group}."
        stored = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return Q.dequantize_tensor(stored, bits, rows, self.group_size)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """De-quantized ``(U [m, r], S [r], V [n, r])`` of a lowrank entry (float32)."""
        if self.kind != "lowrank":
            raise SkillPackError(f"{self.name} is a {self.kind} entry, not lowrank")
        m, n = self.matrix_shape()
        us = [self._factor_group("U", g, bits, m) for g, (bits, _) in enumerate(self.groups)]
        vs = [self._factor_group("V", g, bits, n) for g, (bits, _) in enumerate(self.groups)]
        return torch.cat(us, 1), self.tensors["S"].float(), torch.cat(vs, 1)

    def delta(self) -> torch.Tensor:
        """The dense float32 delta this entry encodes, in the parameter's shape."""
        if self.kind == "exact":
            return self.tensors["D"].float().reshape(self.shape)
        if self.kind == "sparse":
            flat = torch.zeros(self.numel, dtype=torch.float32)
            flat[self.tensors["idx"].long()] = self.tensors["val"].float()
            return flat.reshape(self.shape)
        if self.kind == "lowrank":
            u, s, v = self.factors()
            return ((u * s) @ v.T).reshape(self.shape)
        raise SkillPackError(f"unknown entry kind {self.kind!r}")

    def meta(self) -> dict:
        """The manifest record of this entry (everything but the tensor values)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "module_type": self.module_type,
            "module_class": self.module_class,
            "groups": [list(g) for g in self.groups],
            "group_size": self.group_size,
            "rel_error": self.rel_error,
            "tensors": sorted(self.tensors),
        }

    def bits_str(self) -> str:
        if self.kind == "lowrank":
            return ",".join(f"{c}@{b}b" for b, c in self.groups)
        if self.kind == "sparse":
            return f"{self.tensors['idx'].numel()} entries"
        return "fp32"


def lowrank_entry(
    item: dict, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bits: torch.Tensor, group_size: int
) -> Entry | None:
    """A lowrank entry from SVD factors and a per-component bit width (0 = dropped); ``None`` if all are dropped.

    Components of equal width form one group; groups are stored widest (leading singular values) first."""
    tensors: dict[str, torch.Tensor] = {}
    groups, order = [], []
    for b in sorted({int(x) for x in bits.tolist() if x > 0}, reverse=True):
        idx = torch.nonzero(bits == b).flatten()
        g = len(groups)
        for role, fac in (("U", u), ("V", v)):
            for k, t in Q.quantize_tensor(fac[:, idx], b, group_size).items():
                tensors[f"{role}{g}.{k}"] = t
        groups.append((b, int(idx.numel())))
        order.append(idx)
    if not groups:
        return None
    tensors["S"] = s[torch.cat(order)].float().contiguous()
    return Entry(
        item["name"],
        "lowrank",
        tuple(item["shape"]),
        item["dtype"],
        item["module_type"],
        item["module_class"],
        tensors,
        groups,
        group_size,
    )


def exact_entry(item: dict, delta: torch.Tensor) -> Entry:
    """An ``exact`` entry storing ``delta`` in fp32 (``item`` gives name, shape, dtype and module fields)."""
    return Entry(
        item["name"],
        "exact",
        tuple(item["shape"]),
        item["dtype"],
        item["module_type"],
        item["module_class"],
        {"D": delta.float().contiguous()},
    )
