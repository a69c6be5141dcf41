"""``SkillPackConfig``: how :meth:`SkillPack.extract` compresses a delta, as one ``HfArgumentParser`` dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, get_args

from . import quant as Q
from .budget import parse_budget
from .errors import SkillPackError

Policy = Literal["module-aware", "uniform"]
EmbeddingPolicy = Literal["lowrank", "exact", "sparse", "skip"]
POLICIES = get_args(Policy)
EMBEDDING_POLICIES = get_args(EmbeddingPolicy)
DEFAULT_BITS = (8, 4, 2)
#: The budget of an extraction that sets neither ``budget`` nor ``energy``: 5% of the dense bf16 delta. Measured on
#: a full SmolLM2-135M fine-tune (benchmarks/skillpack/RESULTS_skillpack.md), 5% keeps 98.5% of the fine-tune's
#: held-out perplexity gain (1%: 94.5%, 10%: 99.2%), so it is the size/quality knee: a pack ~20x smaller than the
#: dense delta that behaves like the fine-tune. On tiny models the exact small deltas (norms, biases, stored in fp32)
#: alone can exceed 5%; the default then becomes the smallest budget that holds them plus one low-rank component
#: (with a warning). An explicit ``budget`` is never raised: a too-small one fails with the smallest that works.
DEFAULT_BUDGET = "5%"
_VALIDATION_DENSE_BYTES = 2**62  # any size will do: only the budget's syntax is checked before the delta is known


def parse_bits(value) -> tuple[int, ...]:
    """Widths from ``8``, ``(8, 4, 2)``, ``"8,4,2"`` or ``None`` (the default 8, 4, 2)."""
    if value is None:
        return DEFAULT_BITS
    try:
        if isinstance(value, str):
            widths = tuple(int(b) for b in value.split(",") if b.strip())
        elif isinstance(value, int):
            widths = (value,)
        else:
            widths = tuple(int(b) for b in value)
    except (TypeError, ValueError):
        raise SkillPackError(f"bits must be widths from {Q.SUPPORTED_BITS} such as '8,4,2', got {value!r}") from None
    if not widths or any(b not in Q.SUPPORTED_BITS for b in widths):
        raise SkillPackError(f"bits must be widths from {Q.SUPPORTED_BITS}, got {value!r}")
    return widths


def _bit_split_pairs(value) -> list:
    if isinstance(value, dict):
        return list(value.items())
    if not isinstance(value, str):
        return list(value)
    text = value.strip()
    if text.startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise SkillPackError(f"bit_split: invalid JSON {text!r}: {e}") from None
        return _bit_split_pairs(parsed)
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if ":" not in part:
            raise SkillPackError(f"bit_split: entry {part!r} must look like 'bits:fraction', e.g. '8:0.02'")
        pairs.append(tuple(x.strip() for x in part.split(":", 1)))
    return pairs


def parse_bit_split(value) -> tuple[tuple[int, float], ...] | None:
    """``((bits, fraction), ...)`` leading first, from ``"8:0.02,4:0.18,2:0.8"``, JSON, a dict or pairs."""
    if value is None or value == "":
        return None
    try:
        split = tuple((int(w), float(f)) for w, f in _bit_split_pairs(value))
    except (TypeError, ValueError):
        split = None
    if not split or any(w not in Q.SUPPORTED_BITS or f < 0 for w, f in split):
        raise SkillPackError(f"bad bit_split {value!r}: (bits, fraction) pairs with bits in {Q.SUPPORTED_BITS}")
    return split


@dataclass
class SkillPackConfig:
    """How :meth:`SkillPack.extract` compresses ``finetuned - base`` (see :mod:`kd_plugins.skillpack`).

    At most one of ``budget`` (total bytes) and ``energy`` (per-module threshold) may be set; with neither, extraction
    uses :data:`DEFAULT_BUDGET` (``"5%"`` of the dense bf16 delta; see there for why, and for tiny models). Every
    field is a plain type so ``HfArgumentParser(SkillPackConfig)`` parses it from the command line; ``bits`` and
    ``bit_split`` also accept their Python forms (an int or a tuple of widths; a dict or a sequence of
    ``(bits, fraction)`` pairs) and are stored parsed, as tuples.
    """

    # Help texts are argparse format strings: "%%" shows as "%".
    budget: float | str | None = field(
        default=None,
        metadata={
            "help": "Total stored bytes: int bytes, a fraction of the dense bf16 delta in (0, 1] "
            "('0.05'), or text such as '5%%', '20MB', '512KiB'. Exclusive with energy; with neither set, "
            f"{DEFAULT_BUDGET.replace('%', '%%')}."
        },
    )
    energy: float | None = field(
        default=None,
        metadata={
            "help": "Per-module energy threshold beta in (0, 1]: rank = smallest k keeping beta "
            "of sum sigma^2. Exclusive with budget."
        },
    )
    policy: Policy = field(
        default="module-aware",
        metadata={
            "help": "Budget mode. module-aware: one global rate-distortion "
            "allocation of ranks and bit widths over all modules; uniform: "
            "each matrix gets the budget share of its size."
        },
    )
    embeddings: EmbeddingPolicy = field(
        default="lowrank",
        metadata={
            "help": "Embedding deltas: lowrank (like any matrix), exact (fp32), sparse "
            "(the largest sparse_density fraction of entries), skip (not stored)."
        },
    )
    bits: tuple | str | None = field(
        default="8,4,2",
        metadata={
            "help": f"Allowed factor column widths in budget mode, from {Q.SUPPORTED_BITS} "
            "(16/32 = fp16/fp32 floats), e.g. '8,4,2'; one width forces it."
        },
    )
    bit_split: tuple | str | None = field(
        default=None,
        metadata={
            "help": "Energy mode: 'bits:fraction,...' of the kept columns, leading first "
            "(default GraftLLM's '8:0.02,4:0.18,2:0.8' over bits, >= 1 leading column)."
        },
    )
    group_size: int = field(
        default=64,
        metadata={
            "help": "Quantization group length along a column (one fp16 scale per group); a positive multiple of 4."
        },
    )
    exact_max_dim: int = field(
        default=16, metadata={"help": "Matrices whose smaller side is at most this are stored exactly (fp32)."}
    )
    sparse_density: float = field(
        default=0.01, metadata={"help": "embeddings='sparse': fraction of entries kept, in (0, 1]."}
    )
    name: str | None = field(default=None, metadata={"help": "Name stored in the pack."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self):
        if self.budget is not None:
            if isinstance(self.budget, str) and not self.budget.strip():
                raise SkillPackError("budget is an empty string; pass e.g. '5%', 0.05 or '20MB'")
            parse_budget(self.budget, _VALIDATION_DENSE_BYTES)  # raises a clear error on a malformed budget
        if self.budget is not None and self.energy is not None:
            raise SkillPackError(
                f"pass only one of budget={self.budget!r} and energy={self.energy!r} (set the other to None)"
            )
        if self.energy is not None and not 0 < self.energy <= 1:
            raise SkillPackError(f"energy threshold must be in (0, 1], got {self.energy}")
        if self.policy not in POLICIES:
            raise SkillPackError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.embeddings not in EMBEDDING_POLICIES:
            raise SkillPackError(f"embeddings must be one of {EMBEDDING_POLICIES}, got {self.embeddings!r}")
        self.bits = parse_bits(self.bits)
        self.bit_split = parse_bit_split(self.bit_split)
        if self.group_size < 4 or self.group_size % 4:
            raise SkillPackError(f"group_size must be a positive multiple of 4, got {self.group_size}")
        if self.exact_max_dim < 0:
            raise SkillPackError(f"exact_max_dim must be >= 0, got {self.exact_max_dim}")
        if not 0 < self.sparse_density <= 1:
            raise SkillPackError(f"sparse_density must be in (0, 1], got {self.sparse_density}")

    @property
    def extraction_budget(self) -> float | str | None:
        """The budget an extraction uses: ``budget``, :data:`DEFAULT_BUDGET` when neither ``budget`` nor ``energy`` is
        set, ``None`` in energy mode."""
        if self.budget is None and self.energy is None:
            return DEFAULT_BUDGET
        return self.budget

    def check_mode(self) -> None:
        """Raise if both ``budget`` and ``energy`` are set (fields changed after construction)."""
        if self.budget is not None and self.energy is not None:
            raise SkillPackError(
                f"pass only one of budget={self.budget!r} and energy={self.energy!r} (set the other to None)"
            )
