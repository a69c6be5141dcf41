"""Errors raised by :mod:`kd_plugins.skillpack`. All derive from :class:`SkillPackError` (a ``ValueError``)."""

from __future__ import annotations


class SkillPackError(ValueError):
    """Base class of every SkillPack error."""


class ArchitectureMismatchError(SkillPackError):
    """Base and fine-tuned models (or a pack and a model) have different parameter names or shapes."""


class FingerprintMismatchError(SkillPackError):
    """A pack is applied to a model that is not the base it was extracted from."""


class IntegrityError(SkillPackError):
    """A saved pack is corrupt, truncated or incomplete (checksum, size or manifest mismatch)."""


class BudgetTooSmallError(SkillPackError):
    """The storage budget cannot hold the exact small deltas plus even one rank-1 component. ``smallest_budget`` is
    the fewest bytes that can (``None`` when unknown or when no budget can)."""

    def __init__(self, message: str, smallest_budget: int | None = None):
        super().__init__(message)
        self.smallest_budget = smallest_budget
