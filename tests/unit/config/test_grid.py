"""Grid files: expansion into cells (count, order, layered settings, names) and one-line validation errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.config.grid import cell_identity, load_grid
from fewshot_sla.errors import UserError
from tests.helpers.paths import REPO

SHIPPED_GRIDS = sorted((REPO / "benchmarks" / "grids").glob("*.yaml"))

GRID = """\
name: tiny
datasets:
  synthetic: {image_size: 16}
methods:
  - method: protonet
    settings: {train_episodes: 30}
  - maml
backbones: conv4
variants:
  - {transform: none, objective: baseline}
  - {transform: rotation, objective: sla}
shots: [1, 5]
settings: {train_episodes: 100, eval_episodes: 20}
"""


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expansion_gives_the_hand_written_cells_in_order(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, GRID))
    axes = [(c.values["method"], c.values["transform"], c.values["objective"], c.values["shots"]) for c in grid.cells]
    assert axes == [
        ("protonet", "none", "baseline", 1),
        ("protonet", "none", "baseline", 5),
        ("protonet", "rotation", "sla", 1),
        ("protonet", "rotation", "sla", 5),
        ("maml", "none", "baseline", 1),
        ("maml", "none", "baseline", 5),
        ("maml", "rotation", "sla", 1),
        ("maml", "rotation", "sla", 5),
    ]
    for cell in grid.cells:
        v = cell.values
        assert (v["dataset"], v["backbone"], v["ways"], v["seed"], v["image_size"], v["eval_episodes"]) == (
            "synthetic",
            "conv4",
            5,
            0,
            16,
            20,
        )
        # The method's settings win over the shared ones.
        assert v["train_episodes"] == (30 if v["method"] == "protonet" else 100)
    first = grid.cells[0]
    assert first.name.startswith("synthetic-protonet-conv4-5w1s-none-baseline-s0-")
    assert len({c.name for c in grid.cells}) == 8
    assert grid.name == "tiny" and grid.data_root is None


def test_names_are_deterministic_and_follow_every_setting_but_the_device(tmp_path: Path) -> None:
    names = [c.name for c in load_grid(write(tmp_path, GRID)).cells]
    assert names == [c.name for c in load_grid(write(tmp_path, GRID, "again.yaml")).cells]
    changed = [
        c.name
        for c in load_grid(
            write(tmp_path, GRID.replace("eval_episodes: 20", "eval_episodes: 30"), "changed.yaml")
        ).cells
    ]
    assert not set(names) & set(changed)
    device = [
        c.name
        for c in load_grid(
            write(tmp_path, GRID.replace("eval_episodes: 20", "eval_episodes: 20, device: cpu"), "device.yaml")
        ).cells
    ]
    assert device == names
    cadence = GRID.replace("eval_episodes: 20", "eval_episodes: 20, checkpoint_every: 1")
    assert [c.name for c in load_grid(write(tmp_path, cadence, "cadence.yaml")).cells] == names
    validation = GRID.replace("eval_episodes: 20", "eval_episodes: 20, val_ways: 3")
    assert not set(names) & {c.name for c in load_grid(write(tmp_path, validation, "val.yaml")).cells}


def test_a_recipe_change_renames_exactly_the_cells_it_affects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_sla.config.recipes import recipe_book

    before = {
        (c.values["method"], c.values["objective"], c.values["shots"]): c.name
        for c in load_grid(write(tmp_path, GRID)).cells
    }
    protonet = recipe_book().recipes["protonet"]
    monkeypatch.setitem(protonet.values, "lr", 0.002)  # ProtoNet's recipe changes; MAML's does not
    after = {
        (c.values["method"], c.values["objective"], c.values["shots"]): c
        for c in load_grid(write(tmp_path, GRID)).cells
    }
    for key, cell in after.items():
        assert (cell.name == before[key]) == (key[0] == "maml"), key
        assert cell.config.lr == (0.002 if key[0] == "protonet" else 0.001)
    # The cell's configuration file is the resolved configuration: a run from it takes nothing from the recipe.
    assert (
        load_config(write(tmp_path, after[("protonet", "sla", 1)].to_yaml(tmp_path), "cell.yaml"))
        == after[("protonet", "sla", 1)].config
    )


def test_product_of_seeds_ways_and_datasets(tmp_path: Path) -> None:
    text = GRID.replace("shots: [1, 5]", "shots: 1\nways: [5, 10]\nseeds: [0, 1, 2]")
    text = text.replace("  synthetic: {image_size: 16}", "  synthetic: {image_size: 16}\n  miniimagenet:")
    grid = load_grid(write(tmp_path, text))
    assert len(grid.cells) == 2 * 2 * 2 * 2 * 3  # datasets x methods x variants x ways x seeds
    assert {(c.values["dataset"], c.values.get("image_size")) for c in grid.cells} == {
        ("synthetic", 16),
        ("miniimagenet", None),
    }
    assert sorted({c.values["seed"] for c in grid.cells}) == [0, 1, 2]


def test_recipe_files_and_rules_layer_in_the_documented_order(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    write(
        tmp_path / "configs",
        "method: protonet\nbackbone: conv4\ndataset: miniimagenet\nshots: 5\n"
        "lr: 0.01\ntrain_episodes: 7\nval_episodes: 50\n",
        "proto.yaml",
    )
    write(tmp_path / "configs", "method: protonet\nlr: 0.5\n", "other.yaml")
    text = """\
datasets: [synthetic]
methods:
  - {method: protonet, config: configs/proto.yaml, settings: {val_episodes: 60}}
variants:
  - {transform: none, objective: baseline}
  - {transform: rotation, objective: sla}
shots: [1, 5]
settings: {train_episodes: 100}
rules:
  - when: {shots: 5, objective: sla}
    config: configs/other.yaml
  - when: {objective: sla}
    settings: {val_episodes: 70}
"""
    cells = {(c.values["objective"], c.values["shots"]): c.values for c in load_grid(write(tmp_path, text)).cells}
    base = cells[("baseline", 1)]
    # The recipe file is the lowest layer: the grid's settings win, and its dataset/shots are the cell's axes.
    assert (base["lr"], base["train_episodes"], base["val_episodes"], base["dataset"], base["shots"]) == (
        0.01,
        100,
        60,
        "synthetic",
        1,
    )
    assert base["backbone"] == "conv4"
    assert cells[("sla", 1)]["val_episodes"] == 70 and cells[("sla", 1)]["lr"] == 0.01
    # A rule's config replaces the entry's file (no layering of the two files).
    assert cells[("sla", 5)]["lr"] == 0.5 and "backbone" in cells[("sla", 5)]


def test_shipped_paper_grid_covers_the_comparison() -> None:
    grid = load_grid(REPO / "benchmarks" / "grids" / "paper.yaml")
    combos = {(c.values["method"], c.values["backbone"]) for c in grid.cells}
    assert combos == {
        ("protonet", "conv4"),
        ("protonet", "resnet12"),
        ("metaoptnet-svm", "resnet12"),
        ("metaoptnet-ridge", "resnet12"),
        ("maml", "conv4"),
    }
    assert {c.values["dataset"] for c in grid.cells} == {"miniimagenet", "cub", "fc100", "cifarfs"}
    assert {(c.values["transform"], c.values["objective"]) for c in grid.cells} == {
        ("none", "baseline"),
        ("rotation", "sla"),
    }
    assert len(grid.cells) == 4 * 5 * 2 * 2
    for method in ("metaoptnet-svm", "metaoptnet-ridge", "protonet"):
        shots = {
            c.config.dataset: c.config.train_shots
            for c in grid.cells
            if c.config.method == method and c.config.backbone == "resnet12" and c.config.shots == 1
        }
        assert shots == {"miniimagenet": 15, "cub": 15, "fc100": 15, "cifarfs": 5}, method


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=[p.stem for p in SHIPPED_GRIDS])
def test_every_shipped_grid_is_valid(path: Path) -> None:
    assert load_grid(path).cells


def test_an_entry_can_restrict_the_shots(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, GRID.replace("  - maml", "  - {method: maml, shots: 1}")))
    axes = [(c.values["method"], c.values["shots"]) for c in grid.cells]
    assert axes == [("protonet", 1), ("protonet", 5), ("protonet", 1), ("protonet", 5), ("maml", 1), ("maml", 1)]


BAD = [
    ("unknown top-level key", GRID + "sedes: [1]\n", "line 14: unknown key 'sedes'"),
    ("unknown method", GRID.replace("  - maml", "  - mamal"), "line 7: unknown learner 'mamal'"),
    ("unknown dataset", GRID.replace("synthetic: {image_size: 16}", "synthetc: {}"), "unknown dataset 'synthetc'"),
    ("unknown backbone", GRID.replace("backbones: conv4", "backbones: [conv5]"), "line 8: unknown backbone 'conv5'"),
    ("unknown objective", GRID.replace("objective: sla}", "objective: slaa}"), "line 11: unknown objective 'slaa'"),
    ("unknown setting", GRID.replace("eval_episodes: 20", "eval_episode: 20"), "unknown key 'eval_episode'"),
    (
        "ill-typed setting",
        GRID.replace("eval_episodes: 20", "eval_episodes: many"),
        "'eval_episodes' must be an integer",
    ),
    (
        "out-of-range setting",
        GRID.replace("eval_episodes: 20", "eval_episodes: 0"),
        "line 13: 'eval_episodes' must be at least 1, got 0",
    ),
    ("zero shots", GRID.replace("shots: [1, 5]", "shots: [1, 0]"), "line 12: 'shots' entries must be integers >= 1"),
    ("text shots", GRID.replace("shots: [1, 5]", "shots: five"), "line 12: 'shots' must be an integer, got 'five'"),
    ("repeated shots", GRID.replace("shots: [1, 5]", "shots: [1, 1]"), "listed twice"),
    ("zero entry shots", GRID.replace("  - maml", "  - {method: maml, shots: 0}"), "line 7: 'shots' entries must be"),
    ("axis in settings", GRID.replace("eval_episodes: 20", "shots: 3"), "'shots' is a grid axis"),
    ("missing shots", GRID.replace("shots: [1, 5]\n", ""), "'shots' is required"),
    (
        "variant without objective",
        GRID.replace("{transform: none, objective: baseline}", "{transform: none}"),
        "line 10: 'objective' is required",
    ),
    ("bad YAML", GRID.replace("shots: [1, 5]", "shots: [1, 5"), "line 13"),
    ("missing recipe file", GRID.replace("  - maml", "  - {method: maml, config: nowhere.yaml}"), "recipe file"),
    (
        "rule matching nothing",
        GRID + "rules:\n  - when: {dataset: cub}\n    settings: {lr: 0.1}\n",
        "rule 1 matches no cell",
    ),
    ("not a mapping", "- a\n- b\n", "must hold a mapping"),
    (
        "init_from by a non-axis",
        GRID.replace("  - maml", "  - {method: maml, init_from: {lr: 0.1}}"),
        "line 7: init_from names the source cell by the grid axes that differ",
    ),
    (
        "init_from a missing cell",
        GRID.replace("  - maml", "  - {method: maml, init_from: {method: pretrain}}"),
        "starts from the cell with dataset synthetic, method pretrain, backbone conv4, transform none, objective "
        "baseline, ways 5, shots 1, seed 0, which the grid does not have",
    ),
    (
        "init_from itself",
        GRID.replace("  - maml", "  - {method: maml, init_from: {method: maml}}"),
        "would start from itself",
    ),
    (
        "init_from in a loop",
        GRID.replace("  - maml", "  - {method: maml, init_from: {method: protonet}}").replace(
            "    settings: {train_episodes: 30}", "    settings: {train_episodes: 30}\n    init_from: {method: maml}"
        ),
        "would start from itself",
    ),
    (
        "init_from another backbone",
        GRID.replace("  - maml", "  - {method: maml, init_from: {method: protonet}}").replace(
            "    settings: {train_episodes: 30}", "    settings: {train_episodes: 30, backbone_options: {hidden: 8}}"
        ),
        "give both entries the same backbones",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_grids_fail_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        load_grid(write(tmp_path, text))
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "grid.yaml" in message or "nowhere.yaml" in message


def test_cli_rejects_a_bad_grid_before_running_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = write(tmp_path, GRID.replace("  - maml", "  - mamal"))
    runs = tmp_path / "runs"
    assert main(["leaderboard", "run", str(grid), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown learner 'mamal'" in err
    assert not runs.exists()


def test_cli_dry_run_lists_cells_without_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(["leaderboard", "run", str(write(tmp_path, GRID)), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("   start  synthetic-") == 8 and "8 cells: 0 finished, 8 to run" in out
    assert not runs.exists()


# cell_identity as it was before the Knobs (config/run_config.py) defined which fields enter it, with its key lists
# frozen.
OLD_HASH_FREE_KEYS = ("device", "eval_batch", "feature_cache", "checkpointing", "log", "checkpoint_every")
OLD_UNSET_FREE_KEYS = ("val_ways", "val_shots")
# Fields added since, which enter the identity only when set: a cell that does not set them keeps its old name.
ADDED_UNSET_FREE_KEYS = ("init_from", "init_checkpoint", "train_split", "augment_rotations")
# A valid value other than the default for every field.
OTHER_VALUES = {
    "method": "maml",
    "dataset": "omniglot",
    "backbone": "resnet12",
    "transform": "none",
    "objective": "baseline",
    "backbone_options": {"hidden": 8},
    "learner_options": {"steps": 2},
    "image_size": 28,
    "ways": 20,
    "shots": 5,
    "queries": 10,
    "eval_episodes": 600,
    "episodes_file": "set.npz",
    "train_ways": 30,
    "train_shots": 15,
    "train_queries": 6,
    "train_episodes": 1000,
    "train_split": "train+val",
    "meta_batch": 4,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "lr_milestones": [0.5],
    "lr_factors": [0.1],
    "lr_schedule_episodes": 2000,
    "augment": True,
    "augment_rotations": True,
    "init_from": "runs/pretrained",
    "init_checkpoint": "last",
    "val_episodes": 100,
    "val_ways": 5,
    "val_shots": 1,
    "val_every": 50,
    "checkpoint_every": 1.5,
    "seed": 3,
    "device": "cpu",
    "amp": True,
    "eval_batch": 7,
    "feature_cache": False,
    "micro_batch": 2,
    "checkpointing": True,
    "sync_batchnorm": True,
    "log": ["tensorboard"],
}


def old_cell_identity(config: RunConfig) -> str:
    identity = {
        k: v
        for k, v in config.to_dict().items()
        if k not in OLD_HASH_FREE_KEYS and not (k in OLD_UNSET_FREE_KEYS + ADDED_UNSET_FREE_KEYS and v is None)
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def test_cell_identities_are_those_of_the_key_lists_the_field_definitions_replaced() -> None:
    assert set(OTHER_VALUES) == set(RunConfig.field_names())  # a new field needs a value here
    base = RunConfig()
    configs = [base, RunConfig(**OTHER_VALUES)]
    configs += [
        base.updated({key: value}) for key, value in OTHER_VALUES.items() if key not in ("lr_milestones", "lr_factors")
    ]
    configs += [base.updated({"lr_milestones": [0.5], "lr_factors": [0.1]})]
    configs += [cell.config for path in SHIPPED_GRIDS for cell in load_grid(path).cells]
    for config in configs:
        assert cell_identity(config) == old_cell_identity(config), config
    assert cell_identity(base.updated({"seed": 1})) != cell_identity(base)  # sensitive to what it covers
