"""Checkpoints and --resume: an interrupted run (max-steps, a kill after a checkpoint, Ctrl-C) ends with exactly
the numbers of an uninterrupted one; a non-finite loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.engine import train as train_module

# 4 steps of 2 episodes, validation and checkpoint every 2 steps, with augmentation (its RNG must resume too).
FLAGS = [
    "--device",
    "cpu",
    "--quiet",
    "--train-episodes",
    "8",
    "--meta-batch",
    "2",
    "--val-every",
    "4",
    "--val-episodes",
    "8",
    "--eval-episodes",
    "16",
    "--queries",
    "4",
    "--train-queries",
    "4",
    "--backbone-option",
    "hidden=8",
    "--image-size",
    "16",
    "--augment",
    "--objective",
    "sla+sd",
]


def run(data_root: Path, out: Path, *extra: str) -> int:
    return main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(data_root, out) == 0
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Same test accuracies, per-episode results, best checkpoint and training losses."""
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["evaluation"]["accuracy"] == rb["evaluation"]["accuracy"]
    assert ra["evaluation"]["episode_set"]["hash"] == rb["evaluation"]["episode_set"]["hash"]
    assert ra["train"]["best_step"] == rb["train"]["best_step"]
    assert ra["train"]["best_val_accuracy"] == rb["train"]["best_val_accuracy"]
    pa, pb = np.load(a / ra["evaluation"]["per_episode_file"]), np.load(b / rb["evaluation"]["per_episode_file"])
    for kind in ("si", "ag", "sd"):
        np.testing.assert_array_equal(pa[kind], pb[kind])
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert ma == mb
    best_a = torch.load(a / "checkpoints" / "best.pt", weights_only=True)["model"]
    best_b = torch.load(b / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert best_a.keys() == best_b.keys()
    for key in best_a:
        assert torch.equal(best_a[key], best_b[key]), key


def test_max_steps_then_resume_matches_an_uninterrupted_run(
    data_root: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--max-steps", "1") == 0
    assert "continue with 'fewshot-sla run --resume" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert run(data_root, out, "--max-steps", "3", "--resume") == 0
    capsys.readouterr()
    assert run(data_root, out, "--resume") == 0
    # A resumed run trains the dataset its stored configuration names: no note about a missing --dataset.
    assert "no --dataset given" not in capsys.readouterr().out
    assert_same_run(reference, out)


def test_a_kill_after_a_checkpoint_replays_the_lost_steps(data_root: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--max-steps", "2") == 0
    saved = tmp_path / "last-at-step-2.pt"
    shutil.copy(out / "checkpoints" / "last.pt", saved)
    assert run(data_root, out, "--max-steps", "3", "--resume") == 0
    # As if killed during step 4: metrics hold step 3 (and half a line), the checkpoint is still step 2's.
    shutil.copy(saved, out / "checkpoints" / "last.pt")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_a_run_killed_before_its_first_checkpoint_starts_over(data_root: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "config.yaml", out / "config.yaml")
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_ctrl_c_saves_and_exits_then_resume_matches(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    original = train_module.Trainer.step

    def step_then_interrupt(self):
        metrics = original(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return metrics

    monkeypatch.setattr(train_module.Trainer, "step", step_then_interrupt)
    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)
    assert run(data_root, out) == 130
    assert signal.getsignal(signal.SIGINT) == handler_before
    assert "interrupted; state saved at step 3" in capsys.readouterr().err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(train_module.Trainer, "step", original)
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fewshot_sla.objectives import SelfDistillation

    original = SelfDistillation.loss
    calls = {"n": 0}

    def poisoned(self, learner, episode):
        loss, metrics = original(self, learner, episode)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 3 else (loss, metrics)

    monkeypatch.setattr(SelfDistillation, "loss", poisoned)
    out = tmp_path / "run"
    assert run(data_root, out, "--fit-memory", "off") == 2  # no memory probe: every loss call is a training step
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 3" in err[0] and "loss is nan" in err[0]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not (out / "results.json").exists()


def test_resume_refuses_a_changed_configuration(
    data_root: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--max-steps", "1") == 0
    capsys.readouterr()
    assert main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out), "--resume", "--shots", "2"]) == 2
    err = capsys.readouterr().err
    assert "differs in shots" in err and len(err.strip().splitlines()) == 1
