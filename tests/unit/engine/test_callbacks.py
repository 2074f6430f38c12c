"""The training loop's callbacks: a caller's callback sees every event in order with the records metrics.jsonl
gets, runs after the built-in ones, and can stop a run (which then saves and resumes to the same numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.engine.callbacks import Callback
from fewshot_sla.engine.execute import execute_run
from fewshot_sla.engine.plan import plan_run
from fewshot_sla.engine.train import Trainer
from tests.integration.reliability.test_resume import FLAGS, assert_same_run

# The values of test_resume's FLAGS: 4 steps of 2 episodes, validation every 2 steps.
SETTINGS: dict[str, Any] = dict(
    device="cpu",
    train_episodes=8,
    meta_batch=2,
    val_every=4,
    val_episodes=8,
    eval_episodes=16,
    queries=4,
    train_queries=4,
    backbone_options={"hidden": 8},
    image_size=16,
    augment=True,
    objective="sla+sd",
)


class Recorder(Callback):
    """Every event, in order, with what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_train_start(self, trainer: Trainer) -> None:
        self.events.append(("start", trainer.state.step))

    def on_gradients(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.events.append(("gradients", dict(metrics)))

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.events.append(("step", record))

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.events.append(("validation", (record, trainer.state.step)))

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        self.events.append(("end", status))


def execute(data_root: Path, out: Path, callbacks: list[Callback], resume: bool = False) -> str:
    cfg = RunConfig(**SETTINGS)
    plan = plan_run(cfg, overrides=SETTINGS, out=str(out), data_root=data_root, resume=resume, fit_memory="off")
    return execute_run(plan, progress=False, callbacks=callbacks).status


def test_a_callback_sees_every_event_in_order_with_the_logged_records(data_root: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    assert execute(data_root, tmp_path / "run", [recorder]) == "finished"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    names = [name for name, _ in recorder.events]
    assert names == ["start"] + ["gradients", "step"] * 2 + ["validation"] + ["gradients", "step"] * 2 + [
        "validation",
        "end",
    ]
    assert recorder.events[0] == ("start", 0) and recorder.events[-1] == ("end", "finished")
    validations = [event for name, event in recorder.events if name == "validation"]
    records = [r for name, r in recorder.events if name == "step"] + [record for record, _ in validations]
    assert sorted(records, key=lambda r: (r["step"], r["kind"] == "val")) == logged
    gradients = [m for name, m in recorder.events if name == "gradients"]
    assert [g["loss"] for g in gradients] == [r["loss"] for r in logged if r["kind"] == "train"]
    assert all(record["step"] == step for record, step in validations)  # at the step it validates


class StopAfter(Callback):
    """Early stopping in its simplest form: stop (as Ctrl-C does) after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            trainer.stop_requested = True


def test_a_callback_can_stop_a_run_which_saves_and_resumes_to_the_same_numbers(data_root: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(reference)]) == 0
    out = tmp_path / "run"
    assert execute(data_root, out, [StopAfter(3)]) == "interrupted"
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert execute(data_root, out, [], resume=True) == "finished"
    assert_same_run(reference, out)


class FinishAtValidation(Callback):
    """Early stopping: end training at the first validation."""

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        trainer.finish_requested = True


def test_a_callback_can_end_training_early_and_the_run_is_tested_as_finished(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert execute(data_root, out, [FinishAtValidation()]) == "finished"
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 2 and results["train"]["best_step"] == 2  # validated at step 2, then done
    assert results["evaluation"]["episodes"] == SETTINGS["eval_episodes"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 2
