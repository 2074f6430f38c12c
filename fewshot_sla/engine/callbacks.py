"""The training loop's callbacks: everything a run does around its optimizer steps, one small class each.

``Trainer.run`` (``train.py``) only draws meta-batches, steps the optimizer, and stops on its budget, ``max_steps``,
Ctrl-C or a preemption signal. The rest is a ``Callback``, called in list order:

- ``on_train_start(trainer)``: once, before the first step (after a resumed run's restore);
- ``on_gradients(trainer, metrics)``: after each meta-batch's gradients and metrics are summed over processes,
  before the optimizer step (raise to refuse the update: ``DivergenceGuard``);
- ``on_step_end(trainer, record)``: after each step, with its ``metrics.jsonl`` record;
- ``on_validation(trainer, record)``: after each validation, with its record (``PeriodicValidation`` makes it);
- ``on_train_end(trainer, status)``: when the loop stops (``finished``, ``interrupted``, ``max-steps``).

The list, in order: ``DivergenceGuard``, ``SolverWarnings``, ``ProgressBar``, one ``LoggerCallback`` per
experiment logger (``loggers.py``: ``metrics.jsonl``, TensorBoard, plug-ins), the caller's own
(``Trainer.run(callbacks=...)``, ``execute_run(callbacks=...)``), then ``PeriodicValidation`` (validation at the
run's cadence, ``best.pt`` and ``last.pt``) and ``ClockCheckpoint`` (``last.pt`` every ``checkpoint_every``
minutes). So a caller's callback sees each step before the validation that follows it. A callback ends training
early with ``trainer.finish_requested = True`` (early stopping: the run is then tested as finished, with its best
checkpoint), or stops it to be resumed later with ``trainer.stop_requested = True`` (as Ctrl-C: saved with that
step). A callback that changes what is trained breaks bit-identical resume unless it keeps its state in the
checkpoint.
Every process calls its callbacks (collectives such as validation run everywhere); only process 0 writes files.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from tqdm import tqdm

from fewshot_sla import preemption
from fewshot_sla.engine.distributed import Processes
from fewshot_sla.engine.evaluate import unconverged_message
from fewshot_sla.engine.loggers import RunLogger
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import UNCONVERGED
from fewshot_sla.prediction_kinds import headline_kind
from fewshot_sla.results import RunPaths, TrainSummary

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What callbacks see of the trainer (``engine/train.Trainer``; a protocol, so that this module does not import
    the loop that imports it)."""

    state: Any  # train.TrainState: step, best_accuracy, best_step, best_val, time_s, step_time_s
    meta_batch: int
    val_every: int
    total_steps: int
    pending_validation: bool
    stop_requested: bool
    finish_requested: bool
    saved_at: float
    processes: Processes
    paths: RunPaths

    def stopping(self) -> bool: ...
    def validate(self) -> tuple[dict[str, float], dict[str, float | None]]: ...
    def emit_validation(self, record: dict[str, Any]) -> None: ...
    def save_last(self) -> None: ...
    def save_best(self, accuracy: dict[str, float]) -> None: ...
    def diverged(self, loss: float) -> UserError: ...
    def summary(self) -> TrainSummary: ...


class Callback:
    """A behaviour of the training loop (see the module docstring); each hook does nothing unless overridden."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step."""

    def on_gradients(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """The step's gradients are summed; the optimizer has not stepped yet."""

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an optimizer step (``record``: its ``metrics.jsonl`` line)."""

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After a validation (``record``: its ``metrics.jsonl`` line)."""

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        """The loop stopped: ``finished``, ``interrupted`` or ``max-steps``."""


class DivergenceGuard(Callback):
    """A non-finite loss stops the run before the update is applied, naming the last good checkpoint."""

    def on_gradients(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        loss = metrics["loss"]
        if loss != loss or abs(loss) == float("inf"):
            raise trainer.diverged(loss)


class SolverWarnings(Callback):
    """Say once per run (process 0) when a learner's solver stopped short of its tolerance in training."""

    def __init__(self) -> None:
        self.warned = False

    def on_gradients(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        stopped = {k: v for k, v in metrics.items() if k.endswith(UNCONVERGED) and v > 0}
        if stopped and trainer.processes.writer and not self.warned:
            self.warned = True
            log.warning(
                "%s in training (step %d; logged per step in %s)",
                unconverged_message(stopped),
                trainer.state.step + 1,
                trainer.paths.metrics.name,
            )


class ProgressBar(Callback):
    """A tqdm bar of the steps (process 0, unless the run is quiet, and only on a terminal) with the loss, and one
    line per validation (also when the output goes to a file, where no bar is drawn between them)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm[Any] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            desc="train",
            unit="step",
            disable=None if self.enabled else True,  # None: no bar when stderr is not a terminal (a log file)
            dynamic_ncols=True,
        )

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "acc") if k in record}, refresh=False)

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.enabled and self.bar is not None:
            shown = ", ".join(f"{k} {v:.2f}%" for k, v in record["accuracy"].items())
            self.bar.write(f"step {record['step']}: validation {shown}")

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        if self.bar is not None:
            self.bar.close()


class LoggerCallback(Callback):
    """Hands the loop's records to an experiment logger (``loggers.RunLogger``); the ``train`` block of
    results.json at the end of a finished run."""

    def __init__(self, logger: RunLogger) -> None:
        self.logger = logger

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.logger.on_step(record)

    def on_validation(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.logger.on_validation(record)

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        if status == "finished":
            self.logger.on_end(trainer.summary().to_dict())


class PeriodicValidation(Callback):
    """Validation every ``val_every`` training episodes and after the last step: the best model (by the headline
    prediction kind) kept in ``best.pt``, the training state in ``last.pt``. The training state is saved first,
    marked as waiting for the validation, so that a preemption during the validation (which stops at once) loses
    no step; a run resumed from such a checkpoint validates before its next step."""

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.pending_validation:
            self.validate(trainer)

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        b, every, step = trainer.meta_batch, trainer.val_every, trainer.state.step
        done = step * b
        if done // every > (done - b) // every or step == trainer.total_steps:
            trainer.pending_validation = True
            if not trainer.stopping():  # stopping now: the stop saves the state, the validation still pending
                self.validate(trainer)

    def validate(self, trainer: Trainer) -> None:
        state = trainer.state
        trainer.pending_validation = True
        trainer.save_last()
        with preemption.immediate():
            accuracy, ci95 = trainer.validate()
        trainer.pending_validation = False
        key = headline_kind(list(accuracy))
        record = {
            "kind": "val",
            "step": state.step,
            "episodes": state.step * trainer.meta_batch,
            "accuracy": accuracy,
            "ci95": ci95,
            "key": key,
        }
        trainer.emit_validation(record)
        if accuracy[key] > state.best_accuracy:
            state.best_accuracy, state.best_step, state.best_val = accuracy[key], state.step, accuracy
            trainer.save_best(accuracy)
        trainer.save_last()


class ClockCheckpoint(Callback):
    """``last.pt`` every ``minutes`` of training since the last save (validations save too), so that a kill
    (SIGKILL, out of memory, a dead node) loses at most that much."""

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * minutes

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not trainer.pending_validation and time.monotonic() - trainer.saved_at >= self.seconds:
            trainer.save_last()
