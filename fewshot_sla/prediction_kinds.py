"""Prediction kinds: the N-way predictions an objective offers (``plain``, ``si``, ``ag``, ``sd``, plug-ins' own).

Each objective declares the kinds it predicts (``Objective.kinds``); this module is the one table of them:
their display labels and the preference that picks a run's headline and model-selection prediction (the most
preferred kind present). Results, leaderboards and the CLI read labels and preferences only from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_sla.registry import OBJECTIVES


@dataclass(frozen=True)
class PredictionKind:
    """One kind of N-way prediction: its key in results files, its label for readers, its preference.

    ``preference``: lower is preferred; the headline of a run is its most preferred kind.
    """

    name: str
    label: str
    preference: int


PLAIN = PredictionKind("plain", "plain", 30)
SLA_SI = PredictionKind("si", "SLA+SI", 20)
SLA_AG = PredictionKind("ag", "SLA+AG", 0)
SLA_SD = PredictionKind("sd", "SLA+SD", 10)
# Reading order (tables, comparisons): plain first, then the SLA kinds as the paper lists them.
BUILTIN_KINDS = (PLAIN, SLA_SI, SLA_AG, SLA_SD)


def kind_table() -> dict[str, PredictionKind]:
    """Every kind the registered objectives declare, by name, in reading order (built-ins, then plug-ins')."""
    table = {kind.name: kind for kind in BUILTIN_KINDS}
    for _, objective in OBJECTIVES.items():
        for kind in getattr(objective, "kinds", ()):
            table.setdefault(kind.name, kind)
    return table


def kind_label(name: str) -> str:
    """The display label of a kind (``ag`` -> ``SLA+AG``); an unknown kind shows its name."""
    kind = kind_table().get(name)
    return kind.label if kind is not None else name


def headline_kind(names: list[str] | tuple[str, ...]) -> str:
    """The most preferred kind among ``names`` (SLA+AG when present, else SLA+SD, SLA+SI, plain; unknown kinds
    last, by name)."""
    if not names:
        raise ValueError("no prediction kinds to choose from")
    table = kind_table()
    return min(names, key=lambda n: (table[n].preference if n in table else 1 << 30, n))


def display_rank(name: str) -> tuple[int, str]:
    """A sort key for reading order: the table's order, unknown kinds last, by name."""
    order = list(kind_table())
    return (order.index(name) if name in order else len(order), name)


def display_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` in reading order."""
    return sorted(names, key=display_rank)
