"""The Python API (``fewshot_sla.api``): the same runs as the command line, typed results back, resume after a
callback stopped a run, evaluation on another episode set, and one-line errors for the two kinds of prepare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fewshot_sla import api
from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.errors import UserError
from tests.integration.reliability.test_resume import FLAGS, assert_same_run
from tests.unit.engine.test_callbacks import SETTINGS, StopAfter


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out)]) == 0
    return out


def test_train_gives_the_command_lines_run_and_its_typed_results(
    data_root: Path, reference: Path, tmp_path: Path
) -> None:
    run = api.train(RunConfig(**SETTINGS), out=tmp_path / "run", data_root=data_root)
    assert_same_run(reference, tmp_path / "run")
    assert run.path == tmp_path / "run" and run.config.method == "protonet"
    per_episode = run.per_episode(run.evaluation.episode_set.hash)
    assert run.evaluation.accuracy["ag"].mean == pytest.approx(100 * per_episode["ag"].mean())
    evaluated = api.evaluate(run.path, eval_episodes=6, data_root=data_root)
    assert [block.episode_set.count for block in evaluated.evaluations] == [16, 6]
    assert evaluated.evaluation == run.evaluation  # the run's own test evaluation stays the main one


def test_a_run_a_callback_stopped_says_so_and_resumes_to_the_same_numbers(
    data_root: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"stopped at step 3 \(interrupted\); continue it with fewshot_sla.api.resume"):
        api.train(RunConfig(**SETTINGS), out=out, data_root=data_root, callbacks=[StopAfter(3)])
    run = api.resume(out, data_root=data_root)
    assert run.path == out
    assert_same_run(reference, out)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda root: api.prepare_dataset("my-birds", source=root),
            "not a registered dataset; use prepare_image_folder",
        ),
        (lambda root: api.prepare_image_folder("cub", source=root), "'cub' is a registered dataset"),
    ],
)
def test_each_prepare_refuses_the_other_kind_of_dataset(tmp_path: Path, call: Any, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        call(tmp_path)


def test_prepare_image_folder_builds_a_store_that_trains(tmp_path: Path, ravi_source) -> None:
    wnids = [f"n{i:08d}" for i in range(1, 16)]
    source, _ = ravi_source(classes={"train": wnids[:5], "val": wnids[5:10], "test": wnids[10:]}, per_class=6)
    folder = tmp_path / "folder"
    for image in (source / "images").iterdir():  # the same images as class folders: <wnid>/<file>
        (folder / image.name[:9]).mkdir(parents=True, exist_ok=True)
        (folder / image.name[:9] / image.name).write_bytes(image.read_bytes())
    result = api.prepare_image_folder(
        "mine", source=folder, data_root=tmp_path / "data", image_size=16, split_fractions=(1 / 3, 1 / 3, 1 / 3)
    )
    assert result.path == tmp_path / "data" / "mine.h5"
    settings = {**SETTINGS, "dataset": "mine", "train_ways": 5, "eval_episodes": 4, "val_episodes": 2, "queries": 2}
    run = api.train(RunConfig(**settings), out=tmp_path / "run", data_root=tmp_path / "data")
    assert run.evaluation.episode_set.dataset == "mine"
