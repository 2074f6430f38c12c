"""Preemption: SIGTERM, SIGUSR1 and SIGUSR2 (what Slurm, Kubernetes, submitit and ``kill`` send before killing a
job) save the state at the current step, never delete a run, and end with one line naming the resume command; a
resumed run ends bit-identical to an uninterrupted one. The wall-clock checkpoint cadence bounds what a SIGKILL
loses. A grid cell preempted under Slurm is requeued and resumed (submitit's checkpoint protocol)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.engine import execute as execute_module
from fewshot_sla.engine import plan as plan_module
from fewshot_sla.engine import train as train_module
from fewshot_sla.locks import lock_path
from fewshot_sla.preemption import PREEMPTION_SIGNALS
from tests.integration.reliability.test_resume import FLAGS, assert_same_run

RESUME = "continue with 'fewshot-sla run --resume --out {}'"


def run(data_root: Path, out: Path, *extra: str) -> int:
    return main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out), *extra])


def last_step(out: Path) -> tuple[int, bool]:
    """The step of checkpoints/last.pt and whether its validation was done."""
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["step"], ckpt["validated"]


def one_line(err: str) -> str:
    lines = err.split("\r")[-1].strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def reference(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(data_root, out) == 0
    return out


def signal_at(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, signum: int, when=lambda *a: True) -> None:
    """Make ``owner.name`` send ``signum`` to this process when ``when(self, ...)`` holds, in the middle of it."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("signum", PREEMPTION_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_a_step_saves_that_step_and_the_resumed_run_matches(
    data_root: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    signum: int,
) -> None:
    signal_at(monkeypatch, train_module.Trainer, "step", signum, lambda self, *a: self.state.step == 2)
    before = {s: signal.getsignal(s) for s in (*PREEMPTION_SIGNALS, signal.SIGINT)}
    out = tmp_path / "run"
    assert run(data_root, out) == 128 + signum
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    line = one_line(capsys.readouterr().err)
    name = signal.Signals(signum).name
    assert line == f"fewshot-sla: stopped by {name} at step 3, the state saved; {RESUME.format(out)}"
    assert last_step(out) == (3, True)  # step 3 completed and saved; step 3 is no validation step
    monkeypatch.undo()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_a_signal_during_a_validation_stops_at_once_and_the_validation_is_redone(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    signal_at(monkeypatch, train_module.Trainer, "validate", signal.SIGTERM, lambda self: self.state.step == 4)
    out = tmp_path / "run"
    assert run(data_root, out) == 143
    assert one_line(capsys.readouterr().err).endswith(RESUME.format(out))
    assert last_step(out) == (4, False)  # saved as the validation of step 4 began
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2]
    monkeypatch.undo()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)  # the validation of step 4 done once, its record written once


def test_a_validation_replayed_after_its_record_was_written_is_logged_once(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill after the validation's record but before its checkpoint: the replayed validation is not doubled."""
    signal_at(monkeypatch, train_module.Trainer, "validate", signal.SIGTERM, lambda self: self.state.step == 2)
    out = tmp_path / "run"
    assert run(data_root, out) == 143
    assert last_step(out) == (2, False)
    # As if the validation of step 2 had been logged (its record is the reference's) before the kill.
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(x for x in lines if json.loads(x)["step"] <= 2))
    monkeypatch.undo()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_a_signal_before_the_first_step_keeps_a_folder_that_resumes(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    signal_at(monkeypatch, execute_module, "Trainer", signal.SIGUSR1)  # the folder and config.yaml are written
    out = tmp_path / "run"
    assert run(data_root, out) == 128 + signal.SIGUSR1
    assert one_line(capsys.readouterr().err) == f"fewshot-sla: stopped by SIGUSR1; {RESUME.format(out)}"
    assert (out / "config.yaml").is_file() and not (out / "checkpoints" / "last.pt").exists()
    monkeypatch.undo()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_a_signal_while_planning_leaves_nothing_and_says_so(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    signal_at(monkeypatch, plan_module, "build_model", signal.SIGTERM)
    out = tmp_path / "run"
    assert run(data_root, out) == 143
    assert one_line(capsys.readouterr().err) == "fewshot-sla: stopped by SIGTERM"
    assert not out.exists() and not lock_path(out).exists()


def test_a_signal_during_the_test_evaluation_keeps_the_trained_run(
    data_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    signal_at(monkeypatch, execute_module, "evaluate_checkpoint", signal.SIGTERM)
    out = tmp_path / "run"
    assert run(data_root, out) == 143
    assert one_line(capsys.readouterr().err).endswith(RESUME.format(out))
    assert last_step(out) == (4, True) and not (out / "results.json").exists()
    monkeypatch.undo()
    assert run(data_root, out, "--resume") == 0
    assert_same_run(reference, out)


def test_checkpoints_follow_the_wall_clock_between_validations(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With validation only at the end, a crash at step 3 keeps the state of step 2 when checkpoints are due every
    step (a tiny --checkpoint-every), and nothing at the default cadence; the resumed run matches."""
    flags = ["--val-every", "8"]
    whole = tmp_path / "whole"
    assert run(data_root, whole, *flags) == 0
    original = train_module.Trainer.step

    def crash_at_step_3(self):
        if self.state.step == 2:
            raise RuntimeError("the node died")
        return original(self)

    monkeypatch.setattr(train_module.Trainer, "step", crash_at_step_3)
    frequent = tmp_path / "frequent"
    with pytest.raises(RuntimeError, match="the node died"):
        run(data_root, frequent, *flags, "--checkpoint-every", "1e-9")
    assert last_step(frequent) == (2, True)
    default = tmp_path / "default"
    with pytest.raises(RuntimeError, match="the node died"):
        run(data_root, default, *flags)
    assert not default.exists()  # nothing saved before the crash: the new run's folder is removed
    monkeypatch.undo()
    assert run(data_root, frequent, *flags, "--resume") == 0
    assert_same_run(whole, frequent)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.mark.slow
def test_a_run_sent_sigterm_at_random_moments_never_loses_a_step_and_matches_an_uninterrupted_one(
    data_root: Path, tmp_path: Path
) -> None:
    """SIGTERM a real ``fewshot-sla run`` process at random moments (before and after its first checkpoint, in
    training, validation and the test evaluation), resume after each: every stop exits 143 with one line, keeps
    every completed step (the checkpoint is at the last step in metrics.jsonl), and the finished run equals an
    uninterrupted one bit for bit, with no temporary file or lock left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    base = [sys.executable, "-m", "fewshot_sla", "--data-root", str(data_root), "run", *FLAGS, "--val-every", "2"]
    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run([*base, "--out", str(reference)], env=env, check=True, capture_output=True)
    whole = time.perf_counter() - start
    out = tmp_path / "stopped"
    rng = random.Random(20261206)
    stops = 0
    while stops < 6:
        if (out / "results.json").is_file():
            shutil.rmtree(out)  # it finished before the signal: run it again, to be stopped elsewhere
        before = snapshot(out)
        resume = ["--resume"] if (out / "config.yaml").is_file() else []
        process = subprocess.Popen(
            [*base, "--out", str(out), *resume], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            process.wait(timeout=rng.uniform(0.2, 1.0) * whole)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.wait()
        err = process.stderr.read() if process.stderr else ""
        if process.returncode == 0:
            continue
        if process.returncode == -signal.SIGTERM:  # before the CLI's handlers (Python starting) or after (exiting)
            assert snapshot(out) == before or (out / "results.json").is_file(), err
            continue
        stops += 1
        assert process.returncode == 143, err
        assert one_line(err).startswith("fewshot-sla: stopped by SIGTERM"), err
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().strip():
            logged = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
            assert last_step(out)[0] == logged, err  # no completed step lost
        assert not out.exists() or (out / "config.yaml").is_file() or not any(out.iterdir())
    if not (out / "results.json").is_file():
        resume = ["--resume"] if (out / "config.yaml").is_file() else []
        subprocess.run([*base, "--out", str(out), *resume], env=env, check=True, capture_output=True)
    assert_same_run(reference, out)
    assert sorted(out.rglob("*.tmp")) == [] and not lock_path(out).exists()


def test_a_preempted_slurm_cell_saves_is_requeued_and_resumes_to_the_same_run(
    data_root: Path, reference: Path, tmp_path: Path
) -> None:
    """submitit calls ``checkpoint`` on the preemption signal: the running cell saves and exits, and the
    submission it returns (the requeued job) resumes the cell to the uninterrupted cell's numbers. The cell trains
    200 steps, so that the signal, sent once a step is logged, finds it training however fast the machine is."""
    pytest.importorskip("submitit")
    from fewshot_sla.config import load_config
    from fewshot_sla.leaderboard.executors import CellTask, RequeueableCell

    config = tmp_path / "cell.yaml"
    longer = {"train_episodes": 400, "val_every": 200, "lr_schedule_episodes": 400}
    config.write_text(load_config(reference / "config.yaml").updated(longer).to_yaml())

    def cell(name: str) -> CellTask:
        return CellTask(
            name,
            tmp_path / name,
            config,
            tmp_path / f"{name}.log",
            resume=False,
            data_root=str(data_root),
            env={"OMP_NUM_THREADS": "1"},
        )

    uninterrupted = cell("uninterrupted")
    assert RequeueableCell()(uninterrupted).status == "finished", uninterrupted.log_file.read_text()
    task = cell("cell")
    job = RequeueableCell()
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(job(task)))
    worker.start()
    metrics = task.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)  # preempted once it has trained a step
    requeued = job.checkpoint(task)
    worker.join()
    assert outcome[0].status == "interrupted", task.log_file.read_text()
    assert "fewshot-sla: stopped by SIGTERM" in task.log_file.read_text()
    assert requeued.args[0].resume is True
    assert requeued.function(*requeued.args).status == "finished", task.log_file.read_text()
    assert_same_run(uninterrupted.run_dir, task.run_dir)
