"""Experiment logging: the callbacks a training run reports to (``metrics.jsonl``, TensorBoard, plug-ins' trackers).

A logger receives the records the trainer writes to ``metrics.jsonl`` (see ``results.py``), as plain dicts:
``on_step`` one ``{"kind": "train", "step", "episodes", "lr", "loss", ...the objective's metrics}`` per optimizer
step, ``on_validation`` one ``{"kind": "val", "step", "episodes", "accuracy": {kind: percent}, "ci95": {kind: 95%
half-width in points, or None for one episode}, "key"}`` per validation, ``on_end`` the ``train`` block of
results.json once training has finished (not when it stops early to be resumed), and ``close`` always, last.
Records are shared between loggers: read them, never change them.

``metrics.jsonl`` (``JsonlLogger``) is always written; the run configuration's ``log`` names the others, looked
up in the ``LOGGERS`` registry (``fewshot-sla run --log NAME``). An entry is a factory (a class, say) called as
``factory(run_dir=..., config=..., start_step=..., replay_validation=...)``: the run folder, the resolved
``RunConfig``, the step training starts from (0, or the step of the checkpoint a resumed run continues; records
after it are replayed, so a logger that keeps history should drop what it holds beyond it), and whether the
validation at ``start_step`` is replayed too (a run stopped during that validation). Accept ``**kwargs`` for
arguments added later. An entry may have a ``check_available()`` (no arguments) that raises a ``UserError`` when
something it needs is missing; the CLI calls it before training starts. Only process 0 logs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fewshot_sla.atomic import write_text_atomic
from fewshot_sla.config import RunConfig, required
from fewshot_sla.errors import UserError, setting
from fewshot_sla.registry import LOGGERS
from fewshot_sla.results import RunPaths

TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard/: the TensorBoard event files
TENSORBOARD_MISSING = (
    f"{setting('log')} tensorboard needs the tensorboard package: pip install 'fewshot-sla[tensorboard]'"
)


class RunLogger:
    """The callbacks of a run's logger (see the module docstring); each does nothing unless overridden."""

    def on_step(self, record: dict[str, Any]) -> None:
        """One training step's record (``kind`` "train")."""

    def on_validation(self, record: dict[str, Any]) -> None:
        """One validation's record (``kind`` "val")."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Training finished: the ``train`` block of results.json."""

    def close(self) -> None:
        """The run stops (finished, interrupted or failed): release files and connections."""


def truncate_metrics(path: Path, step: int, replay_validation: bool = False) -> None:
    """Drop the lines of ``path`` of steps after ``step`` (a resumed run recomputes them), and lines cut short
    by a kill or otherwise damaged (not a record with a numeric step); with ``replay_validation`` also the
    validation record of ``step`` itself."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        at = record.get("step") if isinstance(record, dict) else None
        if isinstance(at, bool) or not isinstance(at, int | float):
            continue  # not a record of this log
        if at < step or (at == step and not (replay_validation and record.get("kind") == "val")):
            kept.append(json.dumps(record) + "\n")
    write_text_atomic(path, "".join(kept))


def validation_ci95(accuracies: dict[str, Any]) -> dict[str, float | None]:
    """The ``ci95`` of a validation record: per prediction kind, the 95% half-width (1.96 s / sqrt(n), in
    percentage points) of the mean of its per-episode accuracies (fractions); None for a single episode."""
    from fewshot_sla.engine.stats import summarize

    widths: dict[str, float | None] = {}
    for kind, values in accuracies.items():
        ci = 100.0 * summarize(values).ci95 if len(values) else math.nan
        widths[kind] = ci if math.isfinite(ci) else None
    return widths


class JsonlLogger(RunLogger):
    """``RUN_DIR/metrics.jsonl``: one JSON object per line, flushed as it is written; on start the lines of
    steps after ``start_step`` are dropped and new ones appended."""

    def __init__(self, *, run_dir: Path, start_step: int = 0, replay_validation: bool = False, **_: Any) -> None:
        self.path = RunPaths(Path(run_dir)).metrics
        truncate_metrics(self.path, start_step, replay_validation)
        self._file = open(self.path, "a")  # noqa: SIM115  (open for the whole run; close() closes it)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_step(self, record: dict[str, Any]) -> None:
        self._write(record)

    def on_validation(self, record: dict[str, Any]) -> None:
        self._write(record)

    def close(self) -> None:
        self._file.close()


def _summary_writer_class() -> Any:
    """torch's ``SummaryWriter``; a missing tensorboard package is a UserError saying how to install it."""
    try:
        importlib.import_module("tensorboard")  # what torch.utils.tensorboard needs (which says so less plainly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(TENSORBOARD_MISSING) from None
    return SummaryWriter


@LOGGERS.register("tensorboard")
class TensorBoardLogger(RunLogger):
    """TensorBoard event files in ``RUN_DIR/tensorboard/``, the global step being the episodes seen: per step
    ``train/<metric>`` for every number of the record (``loss``, ``lr``, the objective's metrics), per
    validation ``val/accuracy/<kind>`` (percent). A resumed run marks the events after its checkpoint as purged,
    so TensorBoard shows each step once."""

    @staticmethod
    def check_available() -> None:
        """The tensorboard package must be installed."""
        _summary_writer_class()

    def __init__(self, *, run_dir: Path, config: RunConfig, start_step: int = 0, **_: Any) -> None:
        writer_class = _summary_writer_class()
        directory = Path(run_dir) / TENSORBOARD_DIR
        resumed = directory.is_dir() and any(directory.iterdir())
        start = start_step * required(config.meta_batch, "meta_batch")  # episodes seen when training starts
        self.writer = writer_class(log_dir=str(directory), purge_step=start + 1 if resumed else None)

    def on_step(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("kind", "step", "episodes") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, global_step=record["episodes"])

    def on_validation(self, record: dict[str, Any]) -> None:
        for kind, accuracy in record["accuracy"].items():
            self.writer.add_scalar(f"val/accuracy/{kind}", accuracy, global_step=record["episodes"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_loggers(names: Iterable[str]) -> None:
    """Every name must be a registered logger whose requirements are installed (one-line UserErrors)."""
    for name in names:
        if name not in LOGGERS:
            valid = ", ".join(LOGGERS.names()) or "(none registered)"
            raise UserError(f"unknown logger '{name}'; choose one of: {valid} (metrics.jsonl is always written)")
        check = getattr(LOGGERS.get(name), "check_available", None)
        if callable(check):
            check()


@contextlib.contextmanager
def open_loggers(
    run_dir: Path, config: RunConfig, start_step: int, replay_validation: bool = False
) -> Iterator[list[RunLogger]]:
    """The run's loggers, JSONL first then those ``config.log`` names, closed (in reverse order) on exit.
    ``replay_validation``: the validation at ``start_step`` is done again (its checkpoint was saved as it began)."""
    with contextlib.ExitStack() as stack:
        loggers: list[RunLogger] = []
        for name in [None, *config.log]:
            factory = JsonlLogger if name is None else LOGGERS.get(name)
            logger = factory(run_dir=run_dir, config=config, start_step=start_step, replay_validation=replay_validation)
            stack.callback(logger.close)
            loggers.append(logger)
        yield loggers
