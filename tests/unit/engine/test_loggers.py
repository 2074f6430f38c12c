"""Experiment logging (``engine/loggers.py``): TensorBoard event files hold the numbers of metrics.jsonl, a resumed
run shows each step once, a plug-in logger gets every record in order, and bad ``--log`` names or a missing
tensorboard package are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml

from fewshot_sla.cli import main
from fewshot_sla.cli.messages import CliVoice
from fewshot_sla.config import RunConfig
from fewshot_sla.config.grid import cell_identity
from fewshot_sla.engine.loggers import TENSORBOARD_MISSING, RunLogger
from fewshot_sla.errors import render
from fewshot_sla.registry import LOGGERS

# 2 steps of 2 episodes, a validation after each (the global step, episodes, differs from the step).
TINY = [
    "--device",
    "cpu",
    "--quiet",
    "--train-episodes",
    "4",
    "--meta-batch",
    "2",
    "--val-every",
    "2",
    "--val-episodes",
    "4",
    "--eval-episodes",
    "4",
    "--queries",
    "3",
    "--train-queries",
    "3",
    "--backbone-option",
    "hidden=8",
    "--image-size",
    "16",
    "--threads",
    "1",
]


def run(data_root: Path, out: Path, *extra: str, flags: list[str] = TINY) -> int:
    return main(["--data-root", str(data_root), "run", *flags, "--out", str(out), *extra])


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files, read back by TensorBoard's own reader: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(out / "tensorboard"))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def expected_scalars(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold for these metrics.jsonl records (TensorBoard keeps float32 values)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["kind"] == "train":
            values = {f"train/{k}": v for k, v in r.items() if k not in ("kind", "step", "episodes")}
        else:
            values = {f"val/accuracy/{kind}": v for kind, v in r["accuracy"].items()}
        for tag, value in values.items():
            expected.setdefault(tag, []).append((r["episodes"], float(np.float32(value))))
    return expected


def test_tensorboard_scalars_are_the_numbers_of_metrics_jsonl(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert run(data_root, out, "--log", "tensorboard") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["log"] == ["tensorboard"]
    records = metrics(out)
    found = scalars(out)
    assert found == expected_scalars(records)
    assert {"train/loss", "train/lr", "train/acc", "val/accuracy/si", "val/accuracy/ag"} <= set(found)
    assert [step for step, _ in found["train/loss"]] == [2, 4]  # episodes seen, not optimizer steps
    assert [step for step, _ in found["val/accuracy/ag"]] == [r["episodes"] for r in records if r["kind"] == "val"]


def test_a_resumed_run_shows_each_step_once_in_tensorboard(data_root: Path, tmp_path: Path) -> None:
    """Killed after a checkpoint: the steps after it are logged again on resume, and the first copies purged."""
    pytest.importorskip("tensorboard")
    flags = [*TINY[: TINY.index("--train-episodes")], "--train-episodes", "6", *TINY[TINY.index("--meta-batch") :]]
    out = tmp_path / "run"
    assert run(data_root, out, "--log", "tensorboard", "--max-steps", "1", flags=flags) == 0
    saved = tmp_path / "last-at-step-1.pt"
    shutil.copy(out / "checkpoints" / "last.pt", saved)
    assert run(data_root, out, "--resume", "--max-steps", "2", flags=flags) == 0  # the stored --log holds
    shutil.copy(saved, out / "checkpoints" / "last.pt")  # as if killed in step 3: step 2 is replayed
    assert run(data_root, out, "--resume", flags=flags) == 0
    records = metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert scalars(out) == expected_scalars(records)


class Recorder(RunLogger):
    """A plug-in logger that remembers every call."""

    calls: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, **arguments: Any) -> None:
        Recorder.calls.append(("init", arguments))

    def on_step(self, record: dict[str, Any]) -> None:
        Recorder.calls.append(("on_step", json.loads(json.dumps(record))))

    def on_validation(self, record: dict[str, Any]) -> None:
        Recorder.calls.append(("on_validation", json.loads(json.dumps(record))))

    def on_end(self, summary: dict[str, Any]) -> None:
        Recorder.calls.append(("on_end", summary))

    def close(self) -> None:
        Recorder.calls.append(("close", None))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    LOGGERS.names()  # the built-in entries first, so that the test's one is removed afterwards
    monkeypatch.setitem(LOGGERS._entries, "recorder", Recorder)
    monkeypatch.setattr(Recorder, "calls", [])
    return Recorder.calls


def test_a_plugin_logger_gets_every_record_of_metrics_jsonl_in_order(
    data_root: Path, tmp_path: Path, recorder: list[tuple[str, Any]]
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--log", "recorder") == 0
    (name, arguments), *calls, (last, _) = recorder
    assert name == "init" and last == "close"
    assert arguments["run_dir"] == out and arguments["start_step"] == 0
    assert arguments["config"].log == ["recorder"]
    kinds = {"train": "on_step", "val": "on_validation"}
    results = json.loads((out / "results.json").read_text())
    assert calls == [(kinds[r["kind"]], r) for r in metrics(out)] + [("on_end", results["train"])]
    assert not (out / "tensorboard").exists()


def test_log_may_be_added_on_resume_and_a_logger_starts_at_the_checkpoint(
    data_root: Path, tmp_path: Path, recorder: list[tuple[str, Any]]
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--max-steps", "1") == 0
    assert recorder == []
    assert run(data_root, out, "--resume", "--log", "recorder") == 0
    assert recorder[0][1]["start_step"] == 1
    replayed = [record for call, record in recorder[1:] if call in ("on_step", "on_validation")]
    assert replayed == [r for r in metrics(out) if r["step"] > 1]


def test_log_names_repeat_or_are_comma_separated(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--data-root", str(data_root), "run", "--log", "tensorboard,x", "--log", "y", "--log", "x,"]
    assert main([*argv, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["log"] == ["tensorboard", "x", "y"]


def test_log_is_not_part_of_a_grid_cell_identity() -> None:
    cfg = RunConfig()
    assert cell_identity(cfg.updated({"log": ["tensorboard"]})) == cell_identity(cfg)
    assert cell_identity(cfg.updated({"seed": 1})) != cell_identity(cfg)


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fewshot-sla: error: ")
    return lines[0].removeprefix("fewshot-sla: error: ")


def test_an_unknown_logger_is_one_line_listing_the_registered_ones(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--log", "tensorboard,wandb") == 2
    line = one_error_line(capsys)
    assert "unknown logger 'wandb'" in line and "choose one of: tensorboard" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboard_fails_up_front_in_one_line(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails, as when not installed
    out = tmp_path / "run"
    assert run(data_root, out, "--log", "tensorboard") == 2
    assert one_error_line(capsys) == render(TENSORBOARD_MISSING, CliVoice())
    assert list(tmp_path.iterdir()) == []
    # On --resume the stored configuration's loggers are checked too, before training touches the folder.
    argv = ["--data-root", str(data_root), "run", *TINY, "--log", "tensorboard", "--print-config"]
    assert main(argv) == 0
    out.mkdir()
    (out / "config.yaml").write_text(capsys.readouterr().out)
    assert main(["--data-root", str(data_root), "run", "--resume", "--quiet", "--out", str(out)]) == 2
    assert one_error_line(capsys) == render(TENSORBOARD_MISSING, CliVoice())
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "run"]
