"""``SparseFTConfig``: which entries a sparse fine-tuning trains, as one ``HfArgumentParser`` dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

Selection = Literal["magnitude_of_change", "random"]
Allocation = Literal["global", "per_tensor"]
SELECTIONS = get_args(Selection)
ALLOCATIONS = get_args(Allocation)
#: The density used when none is given: a few percent of the weights, the regime of LT-SFT (Ansell et al. 2022) and
#: BiStil. Measured on the tiny adaptation task of tests/test_sparseft.py (a 0.1M-parameter Llama, 60 steps per phase):
#: phase B at 5% recovers 0.87 of the full fine-tune's held-out loss decrease (5% random entries: 0.59-0.62).
DEFAULT_DENSITY = 0.05


def check_pattern(value: str, name: str) -> None:
    """Raise a ``ValueError`` naming the field when a ``"re:..."`` entry of a target list does not compile."""
    if value.strip().startswith("re:"):
        try:
            re.compile(value.strip()[3:])
        except re.error as e:
            raise ValueError(f"{name}={value!r}: invalid regular expression ({e}); fix it or use a glob") from None


@dataclass
class SparseFTConfig:
    """Which parameter entries a sparse fine-tuning trains (:mod:`kd_plugins.sparseft`).

    ``density`` of the *participating* entries train. A tensor participates when ``targets`` names it, ``exclude``
    does not, and the ``include_*`` switches let its kind in (every floating-point parameter participates by default,
    as in LT-SFT, whose reference code makes every parameter maskable unless told to freeze embeddings or norms).
    ``dense_targets`` name tensors trained in full (a randomly initialised task head): they are stored whole in the
    :class:`~kd_plugins.sparseft.SparseDiff` and not counted in the density.

    Target syntax (``targets``, ``exclude``, ``dense_targets``): ``"all"`` (targets only); ``"re:<regex>"`` searched
    in the parameter name; or a comma list of entries, each a glob on the full name when it holds ``*?[``
    (``"*.attention.*"``), else a run of dotted components (``"layer.0"`` matches ``encoder.layer.0.output.dense``).
    """

    density: float = field(
        default=DEFAULT_DENSITY,
        metadata={"help": "Fraction of the participating entries that train, in (0, 1] (LT-SFT's K / N)."},
    )
    selection: Selection = field(
        default="magnitude_of_change",
        metadata={
            "help": "magnitude_of_change: keep the entries that moved most (|tuned - base|) in a full fine-tune "
            "(LT-SFT); random: a uniformly random subset (baseline, needs no full fine-tune)."
        },
    )
    allocation: Allocation = field(
        default="global",
        metadata={
            "help": "global: one top-K over all participating entries (LT-SFT; layers that move more get more "
            "entries); per_tensor: density of every tensor (round(density * numel), at least 1)."
        },
    )
    targets: str = field(
        default="all",
        metadata={
            "help": "Participating parameters: 'all', 're:<regex>', or a comma list of dotted names / globs "
            "(e.g. 'encoder.layer,pooler')."
        },
    )
    exclude: str = field(
        default="", metadata={"help": "Parameters removed from targets (same syntax; '' removes none)."}
    )
    dense_targets: str = field(
        default="",
        metadata={
            "help": "Parameters trained in full and stored whole (e.g. a new task head: 'classifier'); not "
            "counted in the density. Same syntax; '' for none."
        },
    )
    include_bias: bool = field(default=True, metadata={"help": "Let bias vectors (names ending in 'bias') take part."})
    include_norm: bool = field(
        default=True,
        metadata={"help": "Let normalisation weights (a name component with 'norm', or 'ln_*') take part."},
    )
    include_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Let embedding matrices (a component with 'embed', or wte / wpe / shared / lm_head) take part."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of selection='random'."})
    reset_after_selection: bool = field(
        default=True,
        metadata={
            "help": "SparseFTCallback without a mask (phase A): after selecting, write the base weights back so "
            "phase B starts from the pretrained model (LT-SFT)."
        },
    )

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ValueError(f"density must be a number in (0, 1], got {self.density!r}; e.g. density=0.05")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}; e.g. density=0.05 trains 5% of entries")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ValueError(f"targets must be 'all', 're:<regex>' or a comma list of names, got {self.targets!r}")
        for name in ("targets", "exclude", "dense_targets"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string ('re:<regex>' or a comma list), got {value!r}")
            check_pattern(value, name)
        if self.exclude.strip() == "all" or self.dense_targets.strip() == "all":
            raise ValueError(
                "'all' is only valid for targets: exclude='all' leaves nothing to train and dense_targets='all' is a "
                "full fine-tune (use density=1.0 for that)"
            )
