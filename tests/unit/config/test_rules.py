"""The rule matcher recipes and grids share: single values listed, unknown keys refused, runs matched key by key."""

from __future__ import annotations

import pytest

from fewshot_sla.config.rules import checked, listed, matches


def test_a_single_value_stands_for_a_list_of_one() -> None:
    assert listed({"dataset": "cub", "shots": [1, 5]}) == {"dataset": ["cub"], "shots": [1, 5]}
    assert listed("not a mapping") == "not a mapping"  # left for the schema to refuse


def test_a_run_matches_when_every_key_lists_its_value() -> None:
    when = {"dataset": ["cub", "miniimagenet"], "shots": [1]}
    assert matches(when, {"dataset": "cub", "shots": 1, "ways": 5})
    assert not matches(when, {"dataset": "cub", "shots": 5})
    assert not matches(when, {"shots": 1})  # a key the run lacks matches nothing
    assert matches({}, {"dataset": "cub"})  # no condition: every run


def test_keys_outside_the_allowed_ones_are_named() -> None:
    assert checked({"shots": [1]}, ("dataset", "shots")) == {"shots": [1]}
    with pytest.raises(ValueError, match="cannot match on 'queries'; rules match on: dataset, shots"):
        checked({"queries": [1]}, ("dataset", "shots"))
