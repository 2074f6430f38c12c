"""Every command a message suggests works: each test below causes one message that names a ``fewshot-sla ...``
command, runs that command exactly as printed on the same inputs, and requires it to succeed (and, where it is a
repair, to repair). ``test_every_suggesting_module_is_covered`` keeps the list complete: a module that starts to
suggest commands fails it until a test here covers it."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from fewshot_sla.cli import main
from tests.helpers.paths import REPO

PACKAGE = REPO / "fewshot_sla"
TINY = ["--device", "cpu", "--quiet", "--train-episodes", "4", "--meta-batch", "2", "--val-episodes", "4"]
TINY += ["--eval-episodes", "8", "--queries", "2", "--train-queries", "2", "--backbone-option", "hidden=8"]
TINY += ["--image-size", "16"]
SUGGESTED = re.compile(r"'(fewshot-sla [^']+)'")

# Modules whose messages name a runnable command, and the tests below that run each of their suggestions. (The
# execute module's resume after a preemption is run in tests/integration/reliability/test_preemption.py.)
COVERED = {
    "cli/leaderboard.py": ["test_a_finished_grid_suggests_building_its_leaderboard"],
    "cli/run.py": ["test_a_stopped_run_suggests_resuming_it"],
    "engine/compare.py": ["test_runs_on_different_episode_sets_or_datasets_suggest_an_evaluation_that_pairs_them"],
    "engine/execute.py": ["test_preemption.py::test_a_signal_during_a_step_saves_that_step_and_the_resumed_run"],
    "engine/extension.py": ["test_extending_an_unfinished_run_suggests_finishing_it_first"],
    "engine/plan.py": ["test_a_finished_run_suggests_evaluating_it"],
    "results.py": [
        "test_an_unfinished_or_damaged_run_suggests_resuming_it",
        "test_missing_per_episode_results_suggest_the_evaluation_that_rebuilds_them",
    ],
    "episodes/sets.py": ["test_a_damaged_episode_set_suggests_the_command_that_regenerates_it"],
    "data/store.py": ["test_a_damaged_store_suggests_the_command_that_rebuilds_it"],
    "data/catalog.py": ["test_a_damaged_store_suggests_the_command_that_rebuilds_it"],
    "cli/data.py": ["test_a_damaged_store_suggests_the_command_that_rebuilds_it"],
    # The same store's rebuild command, suggested when a split cannot be read out of core.
    "data/disk_images.py": ["test_a_damaged_store_suggests_the_command_that_rebuilds_it"],
}


def suggestion(err: str) -> list[str]:
    """The one command a message suggests, as arguments for ``main``."""
    commands = SUGGESTED.findall(err)
    assert len(commands) == 1, err
    words = shlex.split(commands[0])
    assert words[0] == "fewshot-sla" and "..." not in words and not any("<" in w for w in words), commands[0]
    return words[1:]


def follow(capsys: pytest.CaptureFixture, root: Path, code: int, expected: int = 2) -> str:
    """Run the command the last message suggested; return what it printed."""
    err = capsys.readouterr().err
    assert code == expected, err
    command = suggestion(err)
    assert main(["--data-root", str(root), *command]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def train(root: Path, out: Path, *flags: str) -> Path:
    assert main(["--data-root", str(root), "run", *TINY, *flags, "--out", str(out)]) == 0
    return out


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_every_suggesting_module_is_covered() -> None:
    """Every module that suggests a runnable command is in COVERED: outside ``cli/``, a call of the
    ``errors.command`` marker with values (``command("eval", run_dir)``); in ``cli/``, a quoted command (``'fewshot-sla
    ...'`` holding a value); anywhere, a quoted variable holding a whole command such as a store's ``rebuild``.
    Templates with placeholders (``<PATH>``, ``GRID``, ``...``) and bare actions (``command("eval")``) are advice,
    not commands to run."""
    quoted = re.compile(r"'(fewshot-sla [a-z][^'\n]*)'|'\{[a-z_.]*(resume|again|command|rebuild)[a-z_.]*(\(path\))?\}'")
    template = re.compile(r"<|\.\.\.|\b[A-Z]{2,}\b")
    suggesting = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for match in quoted.finditer(text):
            command = match.group(1)
            if command is None or ("{" in command and not template.search(command)):
                suggesting.add(str(path.relative_to(PACKAGE)))
        if any(_runnable(call, text) for call in _marker_calls(text)):
            suggesting.add(str(path.relative_to(PACKAGE)))
    assert suggesting - set(COVERED) == set(), "add a test that runs these modules' suggested commands"
    assert set(COVERED) - suggesting == set(), "these modules no longer suggest commands"


def _marker_calls(text: str) -> list[ast.Call]:
    """The calls of ``fewshot_sla.errors.command`` (under any name it is imported as) in a module's source."""
    tree = ast.parse(text)
    names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "fewshot_sla.errors"
        for alias in node.names
        if alias.name == "command"
    }
    return [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names
    ]


def _runnable(call: ast.Call, text: str) -> bool:
    """Whether a ``command(...)`` marker names a whole command with values: not a bare action, no placeholder in
    its constants, not followed by `` ...`` in its message."""
    values = call.args[1:] + [k.value for k in call.keywords]
    constants = [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    line = text.splitlines()[(call.end_lineno or call.lineno) - 1]
    followed = line[call.end_col_offset or 0 :]
    template = re.compile(r"<|\.\.\.|\b[A-Z]{2,}\b")
    return bool(values) and not any(template.search(c) for c in constants) and not followed.startswith("} ...")


def test_a_finished_run_suggests_evaluating_it(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = train(data_root, tmp_path / "run")
    capsys.readouterr()
    follow(capsys, data_root, main(["--data-root", str(data_root), "run", *TINY, "--out", str(run)]))
    follow(capsys, data_root, main(["--data-root", str(data_root), "run", "--resume", "--out", str(run)]))


def test_a_stopped_run_suggests_resuming_it(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["--data-root", str(data_root), "run", *TINY, "--max-steps", "1", "--out", str(out)])
    follow(capsys, data_root, code, expected=0)
    assert results(out)["status"] == "finished"


def test_extending_an_unfinished_run_suggests_finishing_it_first(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, longer = tmp_path / "run", tmp_path / "longer"
    assert main(["--data-root", str(data_root), "run", *TINY, "--max-steps", "1", "--out", str(source)]) == 0
    capsys.readouterr()
    extend = ["--data-root", str(data_root), "run", "--extend", str(source), "--train-episodes", "8", "--quiet"]
    follow(capsys, data_root, main([*extend, "--out", str(longer)]))
    assert results(source)["status"] == "finished" and not longer.exists()
    assert main([*extend, "--out", str(longer)]) == 0
    assert results(longer)["train"]["episodes"] == 8


def test_an_unfinished_or_damaged_run_suggests_resuming_it(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(["--data-root", str(data_root), "run", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    follow(capsys, data_root, main(["--data-root", str(data_root), "eval", str(out), "--quiet"]))
    (out / "results.json").write_text('{"cut short')
    follow(capsys, data_root, main(["--data-root", str(data_root), "eval", str(out), "--quiet"]))
    finished = results(out)
    finished["status"] = "failed"
    (out / "results.json").write_text(json.dumps(finished))
    follow(capsys, data_root, main(["--data-root", str(data_root), "compare", str(out), str(out)]))
    assert results(out)["status"] == "finished"


def test_missing_per_episode_results_suggest_the_evaluation_that_rebuilds_them(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = train(data_root, tmp_path / "a")
    b = train(data_root, tmp_path / "b", "--objective", "baseline", "--transform", "none")
    (b / results(b)["evaluation"]["per_episode_file"]).unlink()
    capsys.readouterr()
    follow(capsys, data_root, main(["--data-root", str(data_root), "compare", str(a), str(b)]))
    assert main(["--data-root", str(data_root), "compare", str(a), str(b)]) == 0


def test_runs_on_different_episode_sets_or_datasets_suggest_an_evaluation_that_pairs_them(
    data_root: Path, two_datasets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a = train(two_datasets, tmp_path / "a")
    fewer = train(two_datasets, tmp_path / "fewer", "--eval-episodes", "6")  # another episode set of one dataset
    other = train(two_datasets, tmp_path / "other", "--dataset", "tinyimagenet", "--train-ways", "5")  # another dataset
    for b in (fewer, other):
        capsys.readouterr()
        follow(capsys, two_datasets, main(["--data-root", str(two_datasets), "compare", str(a), str(b)]))
        assert main(["--data-root", str(two_datasets), "compare", str(a), str(b)]) == 0


def test_a_damaged_episode_set_suggests_the_command_that_regenerates_it(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "set.npz"
    made = ["episodes", "make", "--dataset", "synthetic", "--count", "20", "--out", str(path)]
    assert main(["--data-root", str(data_root), *made]) == 0
    import numpy as np

    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["positions"] = arrays["positions"][::-1].copy()  # altered: the stored hash no longer matches
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    capsys.readouterr()
    verify = ["--data-root", str(data_root), "episodes", "verify", str(path), "--dataset", "synthetic"]
    follow(capsys, data_root, main(verify))
    assert main(verify) == 0


def test_a_damaged_store_suggests_the_command_that_rebuilds_it(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, small_synthetic: int
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    store = root / "synthetic.h5"
    shutil.copy(data_root / "synthetic.h5", store)
    with open(store, "r+b") as fh:  # damage the header
        fh.write(b"\0" * 64)
    follow(capsys, root, main(["--data-root", str(root), "data", "info", "synthetic"]))
    assert main(["--data-root", str(root), "data", "info", "synthetic", "--verify"]) == 0


def test_a_finished_grid_suggests_building_its_leaderboard(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = tmp_path / "grid.yaml"
    settings = "{train_episodes: 2, meta_batch: 2, val_episodes: 2, eval_episodes: 4, queries: 2, train_queries: 2}"
    grid.write_text(
        "name: tiny\ndatasets: [synthetic]\nmethods: [protonet]\n"
        "variants:\n  - {transform: none, objective: baseline}\nshots: [1]\n"
        f"backbones: conv4\nsettings: {settings}\n"
    )
    runs = tmp_path / "runs"
    code = main(["--data-root", str(data_root), "leaderboard", "run", str(grid), "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert code == 0, out
    command = SUGGESTED.findall(out)
    assert len(command) == 1, out
    assert main(["--data-root", str(data_root), *shlex.split(command[0])[1:]]) == 0
    assert (runs / "leaderboard").is_dir()
