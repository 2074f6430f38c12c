"""``run --extend``: a finished run trained for longer into a new folder ends exactly as a run trained for that
budget at once (tested against one), keeps its source as it was, records where it came from; and every case where
that would not hold, or the command is malformed, is refused in one line, with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fewshot_sla.api import extend as extend_run
from fewshot_sla.cli import main
from fewshot_sla.errors import UserError
from tests.integration.reliability.test_resume import FLAGS, assert_same_run, run

SHORT = 4  # episodes of the source run: one validation (every 4) and its end


def _budget(episodes: int) -> list[str]:
    flags = list(FLAGS)
    flags[flags.index("--train-episodes") + 1] = str(episodes)
    return flags


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source") / "run"
    assert main(["--data-root", str(data_root), "run", *_budget(SHORT), "--out", str(out)]) == 0
    return out


def extend(data_root: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["--data-root", str(data_root), "run", "--extend", str(source), "--out", str(out), *extra])


def test_an_extended_run_equals_one_trained_that_long_at_once(data_root: Path, source: Path, tmp_path: Path) -> None:
    before = _files(source)
    whole = tmp_path / "whole"
    assert run(data_root, whole) == 0  # FLAGS: 8 episodes
    longer = tmp_path / "longer"
    assert extend(data_root, source, longer, "--train-episodes", "8", "--quiet") == 0
    assert_same_run(whole, longer)
    results = json.loads((longer / "results.json").read_text())
    assert results["config"] == json.loads((whole / "results.json").read_text())["config"]
    assert results["extended_from"] == {
        "run_dir": str(source.resolve()),
        "episodes": SHORT,
        "sha256": hashlib.sha256((source / "checkpoints" / "last.pt").read_bytes()).hexdigest(),
    }
    assert json.loads((whole / "results.json").read_text())["extended_from"] is None
    assert _files(source) == before  # the source is read, never written


def test_an_interrupted_extension_resumes_to_the_same_end(data_root: Path, source: Path, tmp_path: Path) -> None:
    whole, longer = tmp_path / "whole", tmp_path / "longer"
    assert run(data_root, whole) == 0
    assert extend(data_root, source, longer, "--train-episodes", "8", "--quiet", "--max-steps", "3") == 0
    assert main(["--data-root", str(data_root), "run", "--resume", "--out", str(longer), "--quiet"]) == 0
    assert_same_run(whole, longer)
    assert json.loads((longer / "results.json").read_text())["extended_from"]["episodes"] == SHORT


def test_an_extended_run_reports_its_sources_backbone_origin(data_root: Path, source: Path, tmp_path: Path) -> None:
    """A source that started from another run's backbone (``--init-from``): the longer run reports that origin, as
    its source does, without reading the other run again."""
    other, started = tmp_path / "other", tmp_path / "started"
    shutil.copytree(source, other)
    argv = ["--data-root", str(data_root), "run", *_budget(SHORT), "--init-from", str(other), "--out", str(started)]
    assert main(argv) == 0
    shutil.rmtree(other)  # gone: the extension must not need it
    longer = tmp_path / "longer"
    assert extend(data_root, started, longer, "--train-episodes", "8", "--quiet") == 0
    origin = json.loads((started / "results.json").read_text())["init_from"]
    assert origin is not None and json.loads((longer / "results.json").read_text())["init_from"] == origin


def test_the_library_extends_a_run_as_the_command_does(data_root: Path, source: Path, tmp_path: Path) -> None:
    longer = extend_run(source, train_episodes=8, out=tmp_path / "longer", data_root=data_root)
    assert longer.results.train.episodes == 8 and longer.results.extended_from is not None
    assert longer.results.extended_from.episodes == SHORT
    with pytest.raises(UserError, match="train_episodes above"):
        extend_run(source, train_episodes=SHORT, out=tmp_path / "same", data_root=data_root)


def _refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_what_would_not_equal_a_run_trained_at_once_is_refused_and_writes_nothing(
    data_root: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = ["--data-root", str(data_root), "run"]
    unfinished = tmp_path / "unfinished"
    assert main([*root, *_budget(8), "--out", str(unfinished), "--max-steps", "2"]) == 0
    odd = tmp_path / "odd"  # 6 episodes with validation every 4: it ends between two validations of a longer run
    assert main([*root, *_budget(6), "--out", str(odd)]) == 0
    scaled = tmp_path / "scaled"  # milestones that are fractions of its own budget (the recipe sets no schedule span)
    milestones = ["--method", "matchingnet", "--set", "lr_milestones=[0.5]", "--set", "lr_factors=[0.1]"]
    assert main([*root, *_budget(SHORT), *milestones, "--out", str(scaled)]) == 0
    capsys.readouterr()
    new = tmp_path / "new"
    cases = [
        (["--extend", str(unfinished), "--train-episodes", "16"], "is not one"),
        (["--extend", str(source), "--train-episodes", str(SHORT)], f"above the {SHORT} episodes"),
        (["--extend", str(source)], f"above the {SHORT} episodes"),
        (["--extend", str(source), "--train-episodes", "8", "--lr", "0.5"], "differs in lr"),
        (["--extend", str(odd), "--train-episodes", "8"], "between two validations"),
        (["--extend", str(scaled), "--train-episodes", "8"], "fractions of its own"),
        (["--extend", str(tmp_path / "nothing"), "--train-episodes", "8"], "is not one"),
    ]
    for flags, expected in cases:
        assert expected in _refused(capsys, [*root, *flags, "--out", str(new)]), flags
        assert not new.exists(), flags
    assert "give it --out" in _refused(capsys, [*root, "--extend", str(source), "--train-episodes", "8"])
    same = [*root, "--extend", str(source), "--train-episodes", "8", "--out", str(source)]
    assert "choose another --out" in _refused(capsys, same)
    both = [*root, "--extend", str(source), "--train-episodes", "8", "--out", str(new), "--resume"]
    assert "without --resume" in _refused(capsys, both)
    assert not new.exists()
