"""The prediction-kind table: every objective's declared kinds, their labels, and the headline choice."""

from __future__ import annotations

import pytest
import torch

from fewshot_sla.objectives import Objective
from fewshot_sla.prediction_kinds import PredictionKind, display_order, headline_kind, kind_label, kind_table
from fewshot_sla.registry import OBJECTIVES


def test_every_registered_objective_predicts_exactly_the_kinds_it_declares() -> None:
    from fewshot_sla.backbones.conv4 import Conv4
    from fewshot_sla.learners.protonet import ProtoNet

    torch.manual_seed(0)
    learner = ProtoNet(Conv4(hidden=4)).eval()
    episode = type("E", (), {})()
    episode.support = torch.randn(1, 6, 3, 16, 16)
    episode.support_labels = torch.arange(3).repeat_interleave(2).unsqueeze(0)
    episode.query = torch.randn(1, 3, 3, 16, 16)
    episode.query_labels = torch.arange(3).unsqueeze(0)
    episode.ways = 3
    table = kind_table()
    for name, cls in OBJECTIVES.items():
        objective = OBJECTIVES.create(name, transform="rotation", feature_dim=learner.backbone.feature_dim(16))
        with torch.no_grad():
            predicted = objective.predict(learner, episode)
        assert set(predicted) == {k.name for k in cls.kinds}, name
        assert all(table[k.name] == k for k in cls.kinds)


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
