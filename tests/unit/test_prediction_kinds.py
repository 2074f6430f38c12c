"""The prediction-kind table: labels, reading order and the headline choice. That every registered objective
predicts exactly the kinds it declares, each known to the table, is ``fewshot_sla.testing.check_objective``
(tests/unit/test_testing.py)."""

from __future__ import annotations

import pytest

from fewshot_sla.objectives import Objective
from fewshot_sla.prediction_kinds import PredictionKind, display_order, headline_kind, kind_label, kind_table
from fewshot_sla.registry import OBJECTIVES


def test_headline_prefers_ag_then_sd_then_si_then_plain() -> None:
    assert headline_kind(["plain", "si", "ag", "sd"]) == "ag"
    assert headline_kind(["si", "sd"]) == "sd"
    assert headline_kind(["plain", "si"]) == "si"
    assert headline_kind(["plain"]) == "plain"
    assert headline_kind(["zeta", "plain"]) == "plain"  # unknown kinds come last
    assert headline_kind(["zeta", "alpha"]) == "alpha"
    with pytest.raises(ValueError):
        headline_kind([])


def test_labels_and_reading_order() -> None:
    assert [kind_label(k) for k in ("plain", "si", "ag", "sd")] == ["plain", "SLA+SI", "SLA+AG", "SLA+SD"]
    assert kind_label("unknown-kind") == "unknown-kind"
    assert display_order(["sd", "zeta", "ag", "plain", "si"]) == ["plain", "si", "ag", "sd", "zeta"]


def test_a_plugin_objective_adds_its_kind_to_the_table() -> None:
    ensemble = PredictionKind("ens", "SLA+ENS", 5)

    class Ensemble(Objective):
        kinds = (ensemble,)

    OBJECTIVES.add("test-ensemble-objective", Ensemble)
    try:
        assert kind_label("ens") == "SLA+ENS"
        assert headline_kind(["si", "ens", "sd"]) == "ens"  # preference 5 lies between ag (0) and sd (10)
        assert list(kind_table())[-1] == "ens"
    finally:
        OBJECTIVES._entries.pop("test-ensemble-objective")
