"""The episode spec: N-way K-shot Q-query (``EpisodeSpec``), and the whole-number check of episode counts."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from fewshot_sla.errors import UserError


def whole_number(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= minimum, else a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}; pass a value >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class EpisodeSpec:
    """An N-way K-shot Q-query episode: ``ways`` classes, ``shots`` support and ``queries`` query images each."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        for field in ("ways", "shots", "queries"):
            object.__setattr__(self, field, whole_number(field, getattr(self, field), 1))

    @property
    def per_class(self) -> int:
        """Images drawn from each chosen class (support + query)."""
        return self.shots + self.queries

    @property
    def tag(self) -> str:
        """Short name used in file names, e.g. ``5w1s15q``."""
        return f"{self.ways}w{self.shots}s{self.queries}q"
