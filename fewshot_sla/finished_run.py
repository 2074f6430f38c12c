"""A finished run as the package reads it: ``FinishedRun.open(run_dir)``.

``open`` reads the run's ``results.json`` (the one-line errors of a missing, damaged, newer or unfinished file are
``results.finished_document``'s), completes what older files lack (``MIGRATIONS``, keyed on ``schema_version``) and
validates it as a ``ResultsFile``: every field, evaluation block and accuracy summary is then an attribute of a
typed record. The run's configuration (``config.yaml``, read when first asked for), its paths and its checkpoints
come with it. Nothing outside ``results.py`` and this module reads a results block by key
(``tests/unit/test_finished_run.py`` keeps it so).

What older results files (schema_version 1, written before a field was recorded) lack, and what they read as:

- ``evaluations`` (or an empty list): the main evaluation alone;
- an evaluation block's ``dataset_fingerprint``: the run's own store (cross-domain evaluations always record it);
- an evaluation block's ``headline``: the most preferred kind of its accuracies (``prediction_kinds``);
- an episode set's ``source``: ``shipped`` where its file is named inside the package's folder of sets, else
  ``file`` (a path as recorded);
- ``transform``: the transformation label (``results.transform_label``: ``none`` for an objective that uses none,
  where older files recorded the configured one);
- ``normalization`` (null): ImageNet's on RGB (``FinishedRun.normalization``); ``image_size`` and
  ``store_image_size`` (null): read from the run's store by those who need them (``trained``, ``eval``);
- every other field added since (``memory``, ``recipe``, ``learner_settings``, ``diagnostics``, the validation
  spec of ``train``): the record's default.

The file's JSON object as read (``FinishedRun.document``, not completed) is what an evaluation is added to and
written back (``engine/run_evaluation.py``), so re-evaluating an older run changes nothing else in its file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import ValidationError

from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.errors import UserError
from fewshot_sla.package_data import FORMER_SHIPPED_SHOWN
from fewshot_sla.results import (
    INCOMPLETE_RUN,
    RESULTS_FILE,
    SCHEMA_VERSION,
    AccuracySummary,
    EvaluationRecord,
    ResultsFile,
    RunPaths,
    episode_set_path,
    finished_document,
    read_per_episode,
    stamped,
    transform_label,
)
from fewshot_sla.validation import one_line_error

if TYPE_CHECKING:
    from fewshot_sla.data.store import Normalization

Checkpoint = Literal["best", "last"]
REREAD = "re-run it with this fewshot-sla"


def _completed_block(block: Any, run_fingerprint: Any) -> Any:
    """An evaluation block of a schema_version 1 file with what older ones lack filled in (see the module
    docstring); anything that is not a block is left for validation to name."""
    if not isinstance(block, dict):
        return block
    block = dict(block)
    if not block.get("dataset_fingerprint") and isinstance(run_fingerprint, str):
        block["dataset_fingerprint"] = run_fingerprint
    accuracy = block.get("accuracy")
    if not block.get("headline") and isinstance(accuracy, dict) and accuracy:
        from fewshot_sla.prediction_kinds import headline_kind

        block["headline"] = headline_kind(list(accuracy))
    episode_set = block.get("episode_set")
    if isinstance(episode_set, dict) and "source" not in episode_set and isinstance(episode_set.get("file"), str):
        shipped = str(Path(episode_set["file"]).parent) == FORMER_SHIPPED_SHOWN  # files without "source" are older
        block["episode_set"] = {**episode_set, "source": "shipped" if shipped else "file"}
    return block


def _complete_version_1(document: dict[str, Any]) -> dict[str, Any]:
    """A schema_version 1 file as the current ``ResultsFile`` reads it (see the module docstring)."""
    doc = dict(document)
    if not doc.get("evaluations") and "evaluation" in doc:
        doc["evaluations"] = [doc["evaluation"]]
    fingerprint = doc.get("dataset_fingerprint")
    if "evaluation" in doc:
        doc["evaluation"] = _completed_block(doc["evaluation"], fingerprint)
    if isinstance(doc.get("evaluations"), list):
        doc["evaluations"] = [_completed_block(block, fingerprint) for block in doc["evaluations"]]
    objective, transform = doc.get("objective"), doc.get("transform")
    if isinstance(objective, str) and isinstance(transform, str):
        doc["transform"] = transform_label(objective, transform)
    return doc


# schema_version -> what brings a file of that version to the current ``ResultsFile`` (a new schema version adds
# its own entry, and the older entries chain to it).
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _complete_version_1}


def typed_results(document: Mapping[str, Any], where: str | os.PathLike[str] = RESULTS_FILE) -> ResultsFile:
    """A results.json object (``document``, as read from ``where`` or as ``execute_run`` / ``evaluate_run`` return
    it before it is written: then stamped as ``write_results`` would) as a validated ``ResultsFile``, older
    files completed (``MIGRATIONS``). A schema_version this fewshot-sla never wrote, a missing field or a value of
    the wrong type is a one-line UserError naming ``where``."""
    doc = dict(document) if "schema_version" in document else stamped(dict(document))
    version = doc["schema_version"]
    migrate = MIGRATIONS.get(version) if isinstance(version, int) and version <= SCHEMA_VERSION else None
    if migrate is None:
        raise UserError(f"{where} has schema_version {version!r}, which no fewshot-sla reads; {REREAD}")
    doc = migrate(doc)
    missing = [name for name, info in ResultsFile.model_fields.items() if info.is_required() and name not in doc]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}; {REREAD}")
    try:
        return ResultsFile.model_validate(doc)
    except ValidationError as err:
        raise one_line_error(
            err,
            lambda loc: f"{where} does not match the results schema at {'/'.join(str(part) for part in loc)}",
            hint=lambda loc: REREAD,
        ) from None


def typed_evaluation(block: Mapping[str, Any], results: ResultsFile) -> EvaluationRecord:
    """One evaluation block of ``results`` (e.g. the one ``evaluate_run`` just added) as a validated record."""
    completed = _completed_block(dict(block), results.dataset_fingerprint)
    try:
        return EvaluationRecord.model_validate(completed)
    except ValidationError as err:
        raise one_line_error(err, lambda loc: "an evaluation block does not match the results schema") from None


@dataclass(frozen=True, eq=False)
class FinishedRun:
    """A finished run: its folder, its results (typed) and, when asked for, its configuration and checkpoints."""

    path: Path
    results: ResultsFile
    # The results.json object as read (not completed): what an evaluation is added to before it is written back.
    document: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, run_dir: str | os.PathLike[str]) -> FinishedRun:
        """The finished run in ``run_dir``; a folder that is not one, or a results file that is damaged, newer than
        this fewshot-sla, unfinished or not of the schema, is a one-line UserError saying what to do."""
        path, document = finished_document(run_dir)
        return cls(path, typed_results(document, RunPaths(path).results), document)

    def moved(self, path: Path) -> FinishedRun:
        """The same results, read as those of the folder ``path`` (a copy of the run's results elsewhere)."""
        return dataclasses.replace(self, path=path)

    @property
    def paths(self) -> RunPaths:
        """Where each file of the run lives."""
        return RunPaths(self.path)

    @cached_property
    def config(self) -> RunConfig:
        """The run's resolved configuration (``config.yaml``; read on first use: a missing or damaged one is a
        UserError)."""
        return load_config(self.paths.config, INCOMPLETE_RUN)

    def checkpoint(self, which: Checkpoint = "best") -> Path:
        """The ``best`` (best validation) or ``last`` (full training state) checkpoint file."""
        return self.paths.best_checkpoint if which == "best" else self.paths.last_checkpoint

    @property
    def evaluation(self) -> EvaluationRecord:
        """The main evaluation (the run's own test set)."""
        return self.results.evaluation

    @property
    def evaluations(self) -> list[EvaluationRecord]:
        """Every evaluation, one per episode set (the main one included; latest last)."""
        return self.results.evaluations

    def evaluation_for(self, episode_set_hash: str) -> EvaluationRecord | None:
        """The evaluation on the episode set with this hash, if the run has one."""
        for block in self.results.evaluations:
            if block.episode_set.hash == episode_set_hash:
                return block
        return None

    def accuracy(self, kind: str) -> AccuracySummary:
        """The main evaluation's summary (percent) of one prediction kind."""
        return self.results.evaluation.accuracy[kind]

    def store_fingerprint(self, block: EvaluationRecord) -> str:
        """The fingerprint of the store an evaluation read (the run's own, or another's for a cross-domain one)."""
        return block.dataset_fingerprint or self.results.dataset_fingerprint

    def episode_set_file(self, block: EvaluationRecord) -> Path:
        """Where the episode set of an evaluation lies (``results.episode_set_path``)."""
        return episode_set_path(self.path, block.episode_set.file, block.episode_set.source)

    def per_episode(self, episode_set_hash: str) -> dict[str, np.ndarray]:
        """Per-episode accuracies (fractions) on the given episode set, one array per prediction kind."""
        block = self.evaluation_for(episode_set_hash)
        if block is None:
            raise UserError(f"run {self.path} was not evaluated on episode set {episode_set_hash[:16]}")
        s = block.episode_set
        return read_per_episode(self.path, block.per_episode_file, self.results.dataset, s.dataset, s.file, s.source)

    @property
    def normalization(self) -> Normalization:
        """The input normalisation the run trained with (ImageNet's on RGB for runs from before it was recorded)."""
        from fewshot_sla.data.store import IMAGENET_NORMALIZATION, Normalization

        record = self.results.normalization
        if not record:
            return IMAGENET_NORMALIZATION
        return Normalization(mean=tuple(record["mean"]), std=tuple(record["std"]))
