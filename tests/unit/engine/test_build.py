"""engine.build helpers that every run depends on, and the validation episodes' own ways and shots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fewshot_sla.engine.build import derived_seed
from tests.integration.cli.test_run_cli import TINY

# Seeds every run's random streams start from: a change here changes every run's numbers, so it must be deliberate
# (numpy's SeedSequence hashing is stable across numpy versions; these held on numpy 1.26 and 2.x).
GOLDEN_SEEDS = {
    (0, "model"): 8884792698443643425,
    (7, "sampler"): 8420376216121737537,
    (2**40 + 3, "augment"): 7944668566422667409,
}


def test_derived_seeds_are_the_golden_values() -> None:
    for (seed, purpose), expected in GOLDEN_SEEDS.items():
        assert derived_seed(seed, purpose) == expected


def test_derived_seeds_differ_across_purposes_and_seeds() -> None:
    seeds = {derived_seed(s, p) for s in range(3) for p in ("model", "sampler", "augment")}
    assert len(seeds) == 9


def test_building_a_model_leaves_the_callers_random_state_alone_and_repeats() -> None:
    import torch

    from fewshot_sla.config import RunConfig
    from fewshot_sla.config.recipes import apply_recipe
    from fewshot_sla.engine.build import build_model

    cfg = apply_recipe(RunConfig(method="protonet", backbone_options={"hidden": 4}))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, _ = build_model(cfg, 16, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another caller state: the model depends only on the run's seed
    second, _ = build_model(cfg, 16, torch.device("cpu"))
    third, _ = build_model(cfg.updated({"seed": 1}), 16, torch.device("cpu"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.state_dict().values(), third.state_dict().values()))


def test_a_bug_inside_a_constructor_is_not_reported_as_a_bad_option() -> None:
    import pytest
    import torch

    from fewshot_sla.config import RunConfig
    from fewshot_sla.config.recipes import apply_recipe
    from fewshot_sla.engine.build import build_model
    from fewshot_sla.errors import UserError
    from fewshot_sla.registry import BACKBONES

    def broken(width: int = 4) -> torch.nn.Module:
        return torch.nn.Linear("not", "a size")  # a TypeError of the plug-in's own making

    BACKBONES.add("test-broken-backbone", broken)
    try:
        cfg = apply_recipe(RunConfig(backbone="test-broken-backbone"))
        with pytest.raises(TypeError):
            build_model(cfg, 16, torch.device("cpu"))
        with pytest.raises(UserError, match=r"does not take the options \{'depth': 2\}.*it takes width"):
            build_model(cfg.updated({"backbone_options": {"depth": 2}}), 16, torch.device("cpu"))
    finally:
        BACKBONES._entries.pop("test-broken-backbone")


# ----- validation episodes of their own ways and shots (--val-ways, --val-shots) -----


def test_validation_on_a_split_with_too_few_classes_for_the_ways_fails_in_one_line(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The synthetic store has 20 test but 16 validation classes: a 20-way run must say how to validate."""
    from fewshot_sla.cli import main

    out = tmp_path / "run"
    assert main(["--data-root", str(data_root), "run", *TINY, "--ways", "20", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "validation episodes: 20-way episodes need 20 classes but split 'val' has 16" in err
    assert "use --val-ways 16 or fewer" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def validated_5_way(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, list[tuple]]:
    """A 20-way baseline run (default transformation: rotation) on the synthetic store, validated 5-way 2-shot,
    and the (split, ways, shots, queries) of every validation episode set it built."""
    from fewshot_sla.cli import main
    from fewshot_sla.engine import train

    built: list[tuple] = []
    make = train.validation_episode_set

    def recording(dataset: str, split: Any, spec: Any, count: int) -> Any:
        episode_set = make(dataset, split, spec, count)
        built.append((split.name, episode_set.spec.ways, episode_set.spec.shots, episode_set.spec.queries))
        return episode_set

    out = tmp_path_factory.mktemp("val-ways") / "run"
    flags = ["--ways", "20", "--val-ways", "5", "--val-shots", "2", "--objective", "baseline"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "validation_episode_set", recording)
        assert main(["--data-root", str(data_root), "run", *TINY, *flags, "--out", str(out)]) == 0
    return out, built


def test_val_ways_and_shots_set_the_validation_episodes_and_the_test_keeps_its_own(
    validated_5_way: tuple[Path, list[tuple]],
) -> None:
    out, built = validated_5_way
    assert built == [("val", 5, 2, 5)]  # 5-way 2-shot, with the test's 5 queries
    results = json.loads((out / "results.json").read_text())
    assert (results["ways"], results["shots"]) == (20, 1)
    assert results["evaluation"]["episode_set"]["ways"] == 20
    train = results["train"]
    assert (train["ways"], train["val_ways"], train["val_shots"], train["val_queries"]) == (20, 5, 2, 5)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["val_ways"], config["val_shots"]) == (5, 2)


def test_validation_records_carry_their_95_percent_intervals(validated_5_way: tuple[Path, list[tuple]]) -> None:
    from fewshot_sla.engine.curves import learning_curve_figure

    out, _ = validated_5_way
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) == 2
    for r in val:
        assert set(r["ci95"]) == set(r["accuracy"]) == {"plain"} and 0 < r["ci95"]["plain"] < 50
    _, _, ax = learning_curve_figure(out / "metrics.jsonl").axes
    assert ax.get_title() == "validation accuracy (5-way)"


def test_a_baseline_records_no_transformation(validated_5_way: tuple[Path, list[tuple]]) -> None:
    """The run was configured with the default transformation (rotation), which a baseline never uses."""
    out, _ = validated_5_way
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["transform"] == "rotation"
    assert (results["objective"], results["transform"]) == ("baseline", "none")
