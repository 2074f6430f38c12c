"""``eval`` of a run the user cannot write to (a colleague's shared results on a read-only mount): ``--out DIR``
records the evaluation in a copy of the run's results that ``compare`` reads as the run; without ``--out`` the
evaluation is printed, nothing is written, and the note says so. Tested on a real read-only bind mount."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewshot_sla.cli import main
from tests.integration.cli.test_suggested_commands import TINY


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` seen through a read-only bind mount (skips the test where mounting is not allowed)."""
    view = folder.with_name(folder.name + "-ro")
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {remount.stderr.decode().strip()}")
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(data_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A finished SLA run in its own folder (``shared/run``) and a baseline beside it."""
    run = tmp_path / "shared" / "run"
    assert main(["--data-root", str(data_root), "run", *TINY, "--out", str(run)]) == 0
    base = tmp_path / "base"
    flags = ["--objective", "baseline", "--transform", "none"]
    assert main(["--data-root", str(data_root), "run", *TINY, *flags, "--out", str(base)]) == 0
    return run, base


def test_eval_out_records_an_evaluation_of_a_read_only_run_elsewhere(
    data_root: Path, tmp_path: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    run, base = trained
    before = snapshot(run.parent)
    out = tmp_path / "mine"
    with read_only(run.parent) as shared:
        view = shared / run.name
        capsys.readouterr()
        for count in ("6", "10"):
            assert (
                main(["--data-root", str(data_root), "eval", str(view), "--eval-episodes", count, "--out", str(out)])
                == 0
            )
        err = capsys.readouterr().err
        assert f"written to {out / 'results.json'}" in err and f"{view} is untouched" in err
    assert snapshot(run.parent) == before
    original = json.loads((run / "results.json").read_text())
    copied = json.loads((out / "results.json").read_text())
    assert copied["evaluation"] == original["evaluation"]  # the run's own test evaluation stays the main one
    assert [b["episode_set"]["count"] for b in copied["evaluations"]] == [8, 6, 10]  # both evaluations kept
    # compare reads the copy as the run: on the run's own set and on a set only the copy was evaluated on.
    assert main(["--data-root", str(data_root), "compare", str(out), str(base)]) == 0
    assert main(["--data-root", str(data_root), "eval", str(base), "--eval-episodes", "6"]) == 0
    six = copied["evaluations"][1]["episode_set"]["hash"][:12]
    assert main(["--data-root", str(data_root), "compare", str(out), str(base), "--episode-set", six]) == 0


def test_eval_of_a_read_only_run_without_out_prints_and_writes_nothing(
    data_root: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    run, _ = trained
    before = snapshot(run.parent)
    with read_only(run.parent) as shared:
        view = shared / run.name
        capsys.readouterr()
        assert main(["--data-root", str(data_root), "eval", str(view), "--eval-episodes", "6", "--quiet"]) == 0
        printed, err = capsys.readouterr()
    assert "tested on 6 episodes" in printed and "results:" not in printed
    assert f"{view} is read-only, so this evaluation was printed, not saved; pass --out DIR to save it" in err
    assert snapshot(run.parent) == before


def test_eval_out_refuses_a_folder_holding_another_runs_results(
    data_root: Path, trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    run, base = trained
    capsys.readouterr()
    assert main(["--data-root", str(data_root), "eval", str(run), "--eval-episodes", "6", "--out", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fewshot-sla: error: --out {base} holds the results of another run; choose another --out"]


def test_a_run_into_a_read_only_file_system_says_so(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    with read_only(shared) as view:
        capsys.readouterr()
        assert main(["--data-root", str(data_root), "run", *TINY, "--out", str(view / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fewshot-sla: error: cannot write to {view} (a read-only file system); choose a writable --out"]
