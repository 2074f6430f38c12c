"""Run directories, the ``results.json`` schema, and loading many runs (for ``compare`` and leaderboards).

A run directory holds::

    config.yaml              the resolved RunConfig (every recipe field filled in)
    metrics.jsonl            one JSON object per line: {"kind": "train", "step", "episodes", "lr", "loss", ...the
                             objective's metrics} per training step and {"kind": "val", "step", "episodes",
                             "accuracy": {kind: percent}, "ci95": {kind: 95% half-width in points, null for one
                             episode}, "key"} per validation ("key": the kind selecting the best; "ci95" is absent
                             in runs from before it was recorded)
    checkpoints/last.pt      full training state (model, optimizer, scheduler, RNG states, step), for --resume
    checkpoints/best.pt      the model with the best validation accuracy
    init_from.json           the checkpoint the backbone started from (``InitRecord``), in a run with ``init_from``
    learning_curve.png       training loss/accuracy and validation accuracy against episodes
    tensorboard/             TensorBoard event files, when the run logs to it (``--log tensorboard``)
    per_episode/<h>.npz      per-episode test accuracies (fractions in [0, 1], float64) for the episode set whose
                             hash starts with <h>: one array per prediction kind, plus 0-d string arrays
                             ``episode_set_hash`` and ``dataset_fingerprint``
    test-episodes-*.npz      the test episode set, when neither the data root's ``episodes/`` folder nor the package's
                             shipped sets held a match and one was generated
    results.json             written last: its presence marks a finished run

``results.json`` is built from the typed records below (``RunRecord``, ``TrainSummary``, ``EvaluationRecord``);
``ResultsFile`` is the whole file, and ``results.schema.json`` (shipped in the package, generated from it by
``results_schema()``) is its JSON Schema. Strict JSON: a value that is not a finite number is written as null.
schema_version 1 (accuracies in percent; ``ci95`` = 1.96 s / sqrt(n), ``ci95_t`` = t-based
half-width, s the sample standard deviation over episodes)::

    schema_version   1
    status           "finished"
    method, backbone, dataset, dataset_fingerprint, transform, objective   str ("transform" names the transformation
                     the objective used: "none" for one that uses none, ``baseline``, whatever the config's
                     ``transform``; ``transform_label`` reads older files that recorded the config's value)
    seed, ways, shots, queries                                              int (the test episodes' spec)
    train            {ways, shots, queries, episodes, meta_batch, steps, time_s (wall, validation included),
                      episodes_per_s (training steps only), best_step, best_episodes, best_val_accuracy,
                      val_key, val_episodes, val_ways, val_shots, val_queries (the validation episodes' spec; null
                      in runs from before it was recorded)}
    evaluation       the main evaluation block (below): the run's own test set, the one its training ended with
    evaluations      every evaluation block, one per distinct episode set (the main one included; latest last)
    device           e.g. "cpu" or "cuda (NVIDIA H100 80GB HBM3)";  amp  bool
    normalization    {mean, std}: the per-channel input normalisation in training (its length: the channels)
    recipe           {name, source}: the published recipe the configuration's unset fields came from, with its citation
    image_size, store_image_size   the model's input size and the store's image size in training (images were
                     resized from the second to the first); null in older runs
    memory           {micro_batch, checkpointing, processes, estimated_step_bytes, budget_bytes, budget,
                      available_bytes, measured_peak_bytes, measured_baseline_bytes}: the memory plan of the training
                      (per process) and the peak measured while it trained (for a resumed run: since the resume)
    versions         {python, torch, numpy, fewshot_sla}
    git_commit       str or null
    created, updated ISO-8601 UTC times
    config           the full resolved configuration (as in config.yaml)
    init_from        {run_dir, checkpoint, sha256, step}: the other run's checkpoint the backbone started from
                     (``--init-from``: its folder, absolute, "best" or "last", the file's sha256, its step); null
                     when the run started from the seeded initialisation (and in runs from before it was recorded)
    extended_from    {run_dir, episodes, sha256}: the finished run this one continued (``--extend``: its folder,
                     absolute, the episodes it ended at, its last.pt's sha256); null for a run trained from step 0

An evaluation block::

    episode_set      {hash, file, source, dataset, split, ways, shots, queries, count, seed}; source: "shipped" (in
                     the package), "user" (DATA_ROOT/episodes/), "run" (generated into the run folder), "file"
                     (given with --episodes-file)
    episodes         number of test episodes n
    checkpoint       "best";  best_step  the training step it was saved at
    cached           whether embeddings were cached (EmbeddingLearners)
    time_s, episodes_per_s, device
    accuracy         {kind: {mean, std, ci95, ci95_t, n}} for each prediction kind of the objective
                     (see ``prediction_kinds``; intervals are null for a single episode)
    headline         the kind to quote first (the most preferred kind: ag, else sd, si, plain)
    per_episode_file path of the per-episode .npz, relative to the run directory
    dataset_fingerprint  the fingerprint of the store the episodes came from: the run's own, or, for a
                     cross-domain evaluation (``eval --dataset OTHER``; episode_set.dataset is then OTHER), the other
                     dataset's
    diagnostics      the learner's solver statistics over the episodes, e.g. {"svm_unconverged": fraction}

Reading: ``fewshot_sla.finished_run.FinishedRun.open(run_dir)`` gives a finished run's ``ResultsFile`` (older files
completed on read), its configuration, paths and checkpoints; the package reads results only through it.
``load_results`` gives the file's JSON object as it is, for scripts.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from fewshot_sla.atomic import atomic_path, write_text_atomic
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.io_errors import IOFailure, read_text
from fewshot_sla.package_data import FORMER_SHIPPED_SHOWN, SHIPPED_SHOWN, shipped_episode_sets
from fewshot_sla.version import __version__

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
CHECKPOINT_DIR = "checkpoints"
INIT_FILE = "init_from.json"
EXTENSION_FILE = "extended_from.json"  # the finished run a longer run continued (``run --extend``)
INCOMPLETE_RUN = f"the run folder is incomplete; start the run again with {setting('overwrite')}"
PER_EPISODE_DIR = "per_episode"
# The transformation label of a run whose objective uses none. The objectives that use none (``objectives.py``:
# ``baseline`` trains and predicts on the plain episode and never reads its ``transform``).
NO_TRANSFORM = "none"
UNTRANSFORMED_OBJECTIVES = frozenset({"baseline"})


# The closed sets of text values. The shipped JSON Schema keeps describing them as text (as it always has); the
# records check them on write and on read.
_TEXT = WithJsonSchema({"type": "string"})
RunStatus = Literal["finished"]
# Where an evaluation's episode set came from: shipped (in the package), user (DATA_ROOT/episodes), run (generated
# into the run folder), file (given with --episodes-file).
EpisodeSetSource = Literal["shipped", "user", "run", "file"]


EPISODE_SET_SOURCES: tuple[str, ...] = get_args(EpisodeSetSource)


def episode_set_source(source: str) -> EpisodeSetSource:
    """``source`` as an ``EpisodeSetSource`` (a ValueError for any other text)."""
    if source not in EPISODE_SET_SOURCES:
        raise ValueError(f"unknown episode-set source {source!r}; one of {', '.join(EPISODE_SET_SOURCES)}")
    return cast(EpisodeSetSource, source)


def transform_label(objective: str, transform: str) -> str:
    """The transformation a run used, for results and tables: ``none`` when its objective uses none (a
    ``baseline`` run configured with the default ``rotation`` used no rotation), else the configured one. Derived
    from the objective, so results files that recorded the configured value read correctly too."""
    return NO_TRANSFORM if objective in UNTRANSFORMED_OBJECTIVES else transform


@dataclass(frozen=True)
class RunPaths:
    """Where each file of a run directory lives."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved configuration, YAML."""
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        """Per-step metrics, one JSON object per line."""
        return self.root / METRICS_FILE

    @property
    def results(self) -> Path:
        """The results file; present once the run finished."""
        return self.root / RESULTS_FILE

    @property
    def curve(self) -> Path:
        """The learning-curve plot."""
        return self.root / CURVE_FILE

    @property
    def last_checkpoint(self) -> Path:
        """The full training state, for --resume."""
        return self.root / CHECKPOINT_DIR / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The model with the best validation accuracy."""
        return self.root / CHECKPOINT_DIR / "best.pt"

    @property
    def init_source(self) -> Path:
        """Where the backbone started (``--init-from``): the ``InitRecord`` a resumed run reports."""
        return self.root / INIT_FILE

    @property
    def extension_source(self) -> Path:
        """The finished run this one continued (``--extend``): the ``ExtensionRecord`` its results report."""
        return self.root / EXTENSION_FILE

    def per_episode(self, episode_set_hash: str) -> Path:
        """The per-episode accuracy file for the episode set with this hash."""
        return self.root / PER_EPISODE_DIR / f"{episode_set_hash[:16]}.npz"


def default_run_dir(
    dataset: str, method: str, ways: int, shots: int, transform: str, objective: str, seed: int
) -> Path:
    """``runs/<dataset>-<method>-<N>w<K>s-<transform>-<objective>-<seed>`` (relative to the working folder)."""
    return Path("runs") / f"{dataset}-{method}-{ways}w{shots}s-{transform}-{objective}-{seed}"


def now_iso() -> str:
    """The current UTC time, ISO-8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str]:
    """Versions of Python, torch, numpy and fewshot-sla."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fewshot_sla": __version__,
    }


def git_commit() -> str | None:
    """The commit of the source tree fewshot-sla runs from, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, in field order."""
        return self.model_dump(mode="json")


class TrainSummary(_Record):
    """The ``train`` block: the training episodes' spec, budget, time and the best validation."""

    ways: int
    shots: int
    queries: int
    episodes: int
    meta_batch: int
    steps: int
    time_s: float
    episodes_per_s: float | None
    best_step: int
    best_episodes: int
    best_val_accuracy: float | None  # null when no validation ran
    val_key: str | None
    val_episodes: int
    # The validation episodes' spec (null in runs from before it was recorded, which validated on the test spec).
    val_ways: int | None = None
    val_shots: int | None = None
    val_queries: int | None = None


class EpisodeSetInfo(_Record):
    """Which fixed episode set an evaluation used."""

    hash: str
    file: str
    source: Annotated[EpisodeSetSource, _TEXT] = "file"
    dataset: str
    split: str
    ways: int
    shots: int
    queries: int
    count: int
    seed: int


class AccuracySummary(_Record):
    """Mean accuracy (percent) over episodes with its 95% half-widths (None for a single episode)."""

    mean: float
    std: float
    n: int
    ci95: float | None
    ci95_t: float | None

    @field_validator("ci95", "ci95_t", mode="before")
    @classmethod
    def _undefined_is_null(cls, value: Any) -> Any:
        return None if isinstance(value, float) and value != value else value


class EvaluationRecord(_Record):
    """One evaluation of a run's checkpoint on one episode set."""

    episode_set: EpisodeSetInfo
    episodes: int
    checkpoint: str
    best_step: int
    cached: bool
    time_s: float
    episodes_per_s: float | None
    accuracy: dict[str, AccuracySummary]
    headline: str
    per_episode_file: str
    device: str
    dataset_fingerprint: str | None = None  # the store it read (another dataset's in a cross-domain evaluation)
    diagnostics: dict[str, float | None] = Field(default_factory=dict)  # the learner's solver statistics


class MemoryRecord(_Record):
    """The memory plan of a run's training (per process) and the peak measured while it trained."""

    micro_batch: int
    checkpointing: bool
    processes: int
    estimated_step_bytes: int | None  # the preflight's estimate of one step (engine/memory/)
    budget_bytes: int | None
    budget: str  # where the budget came from
    available_bytes: int | None
    measured_peak_bytes: int | None  # GPU: peak allocation; CPU: the process's peak resident memory (VmHWM)
    measured_baseline_bytes: int | None  # the same quantity when training started (GPU: allocated; CPU: VmRSS)


class InitRecord(_Record):
    """Where a run's backbone started (``--init-from``): another run's checkpoint, named by its content."""

    run_dir: str  # the source run's folder, absolute (the configuration's ``init_from`` holds it as given)
    checkpoint: Annotated[Literal["best", "last"], _TEXT]
    sha256: str  # of the checkpoint file as read
    step: int  # the source's training step the checkpoint was saved at


class ExtensionRecord(_Record):
    """The finished run a longer run continued (``run --extend``), named by its final training state."""

    run_dir: str  # the source run's folder, absolute
    episodes: int  # the training episodes the source ended at (where this run took over)
    sha256: str  # of the source's last.pt as read


class RunRecord(_Record):
    """What a finished run was: its parts, data, training summary and environment."""

    status: Annotated[RunStatus, _TEXT]
    method: str
    backbone: str
    dataset: str
    dataset_fingerprint: str
    transform: str
    objective: str
    seed: int
    ways: int
    shots: int
    queries: int
    train: TrainSummary
    device: str
    amp: bool
    versions: dict[str, str]
    git_commit: str | None
    created: str
    config: dict[str, Any]
    memory: MemoryRecord | None = None
    # The model's input size and the store's image size in training (null in runs from before they were recorded):
    # enough to preprocess new images exactly as in training without the store (predict, cross-domain eval).
    image_size: int | None = None
    store_image_size: int | None = None
    # The per-channel input normalisation in training ({"mean": [...], "std": [...]}; its length is the images'
    # channel count); null in runs from before it was recorded, which all used ImageNet's on RGB.
    normalization: dict[str, list[float]] | None = None
    # The recipe the run's unset fields came from: {"name", "source"}, the source citing the papers and code it
    # follows and the choices made where they are ambiguous (null in runs from before it was recorded).
    recipe: dict[str, str] | None = None
    learner_settings: dict[str, Any] = Field(default_factory=dict)  # e.g. the SVM's solver and its budget
    # The checkpoint the backbone started from (``--init-from``); null for a run from the seeded initialisation.
    init_from: InitRecord | None = None
    # The finished run this one trained on from (``--extend``); null for a run trained from step 0.
    extended_from: ExtensionRecord | None = None


class ResultsFile(RunRecord):
    """The whole ``results.json``: a finished run with its evaluations (see the module docstring)."""

    schema_version: int
    evaluation: EvaluationRecord
    evaluations: list[EvaluationRecord] = Field(min_length=1)
    updated: str


SCHEMA_FILE = Path(__file__).with_name("results.schema.json")


def results_schema() -> dict[str, Any]:
    """The JSON Schema of ``results.json``, as shipped in ``results.schema.json``."""
    schema = ResultsFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, +-inf) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def stamped(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` as ``write_results`` writes it: the schema version first, the update time last."""
    return {"schema_version": SCHEMA_VERSION, **results, "updated": now_iso()}


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` atomically, stamping the schema version and update time."""
    results = _finite(stamped(results))
    write_text_atomic(RunPaths(Path(run_dir)).results, json.dumps(results, indent=2, allow_nan=False) + "\n")


def add_evaluation(results: dict[str, Any], record: EvaluationRecord) -> dict[str, Any]:
    """``results`` with ``record`` added to its evaluations (replacing an older one on the same episode set). It
    becomes the main evaluation only when there is none yet or it re-evaluates the main one's episode set."""
    block = record.to_dict()
    h = block["episode_set"]["hash"]
    kept = [b for b in results.get("evaluations", []) if b["episode_set"]["hash"] != h]
    main = results.get("evaluation")
    if main is None or main["episode_set"]["hash"] == h:
        main = block
    return {**results, "evaluation": main, "evaluations": kept + [block]}


def with_learner(results: dict[str, Any], options: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``results`` describing its run with other learner ``options`` and ``settings``: ``eval --eval-head``'s copy
    of a pretraining run tested with another evaluation head."""
    return {**results, "config": {**results["config"], "learner_options": options}, "learner_settings": settings}


def save_per_episode(
    path: Path, accuracies: dict[str, np.ndarray], episode_set_hash: str, dataset_fingerprint: str
) -> None:
    """Write per-episode accuracies (one array per prediction kind) atomically as an .npz file."""
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float64) for k, v in accuracies.items()}
    arrays.update(episode_set_hash=np.array(episode_set_hash), dataset_fingerprint=np.array(dataset_fingerprint))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def episode_set_path(run_dir: Path, file: str, source: str | None) -> Path:
    """Where an evaluation's episode set lies (``file`` and ``source`` as its block records them): in the package
    for a shipped set, else the recorded path (relative ones: from the working folder when the file is there, else
    from the run folder)."""
    path = Path(file)
    if source == "shipped" or str(path.parent) in (SHIPPED_SHOWN, FORMER_SHIPPED_SHOWN):
        return shipped_episode_sets() / path.name
    return path if path.is_absolute() or path.exists() else run_dir / path


def read_per_episode(
    run_dir: Path, per_episode_file: str, run_dataset: str, tested_dataset: str, set_file: str, set_source: str | None
) -> dict[str, np.ndarray]:
    """The per-episode accuracies (fractions) of an evaluation block (its ``per_episode_file``, and its episode
    set's ``dataset``, ``file`` and ``source``), one array per prediction kind; a missing or damaged file is a
    UserError naming the ``eval`` that rebuilds it (with ``--dataset`` for a cross-domain evaluation)."""
    file = run_dir / per_episode_file
    try:
        with np.load(file) as npz:
            return {k: npz[k] for k in npz.files if k not in ("episode_set_hash", "dataset_fingerprint")}
    except (OSError, ValueError, EOFError):
        other = tested_dataset if tested_dataset != run_dataset else None
        where = episode_set_path(run_dir, set_file, set_source)
        again = command("eval", run_dir, dataset=other, episodes_file=where)
        raise UserError(f"per-episode results {file} are missing or damaged; rebuild them with '{again}'") from None


@dataclass(frozen=True)
class RunResult:
    """A finished run's results.json as read (the JSON object itself, for scripts; the package reads runs typed,
    through ``fewshot_sla.finished_run.FinishedRun``)."""

    path: Path
    data: dict[str, Any]

    @property
    def evaluation(self) -> dict[str, Any]:
        """The main evaluation block (the run's own test set)."""
        return self.data["evaluation"]

    def evaluation_for(self, episode_set_hash: str) -> dict[str, Any] | None:
        """The evaluation block on the episode set with this hash, if the run has one."""
        for block in self.data.get("evaluations", []):
            if block["episode_set"]["hash"] == episode_set_hash:
                return block
        return None

    def accuracy(self, kind: str) -> dict[str, float]:
        """The main evaluation's summary (percent) of one prediction kind."""
        return self.evaluation["accuracy"][kind]

    def episode_set_file(self, block: dict[str, Any]) -> Path:
        """Where the episode set of an evaluation block lies (``episode_set_path``)."""
        return episode_set_path(self.path, block["episode_set"]["file"], block["episode_set"].get("source"))

    def per_episode(self, episode_set_hash: str) -> dict[str, np.ndarray]:
        """Per-episode accuracies (fractions) on the given episode set, one array per prediction kind."""
        block = self.evaluation_for(episode_set_hash)
        if block is None:
            raise UserError(f"run {self.path} was not evaluated on episode set {episode_set_hash[:16]}")
        s = block["episode_set"]
        return read_per_episode(
            self.path, block["per_episode_file"], self.data["dataset"], s["dataset"], s["file"], s.get("source")
        )


def load_results(run_dir: str | os.PathLike) -> RunResult:
    """Read a finished run's results.json as it is (``finished_document``)."""
    return RunResult(*finished_document(run_dir))


def finished_document(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The folder of a finished run and its results.json, parsed (not checked against the schema beyond the
    schema version, the status and the main evaluation); a folder that is not one is a UserError saying what is
    missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give the folder of a run made by '{command('run')}'")
    file = RunPaths(path).results
    if not file.is_file():
        hint = (
            f"resume it with '{command('run', resume=True, out=path)}'"
            if RunPaths(path).config.is_file()
            else f"give the folder of a run made by '{command('run')}'"
        )
        raise UserError(f"{path} is not a finished run (no {RESULTS_FILE}); {hint}")
    data = _read_results(file)
    if data is None:
        raise UserError(
            f"{file} is damaged (not valid JSON); rebuild it from the run's checkpoints with "
            f"'{command('run', resume=True, out=path)}' (this re-tests the best checkpoint)"
        )
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise UserError(f"{file} has no schema_version; it was not written by fewshot-sla")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{file} has schema_version {version}, newer than this fewshot-sla reads "
            f"({SCHEMA_VERSION}); upgrade fewshot-sla"
        )
    if data.get("status") != "finished" or "evaluation" not in data:
        raise UserError(
            f"{file} records no finished evaluation; rebuild it from the run's checkpoints with "
            f"'{command('run', resume=True, out=path)}'"
        )
    return path, data


def _read_results(file: Path) -> Any:
    """The parsed content of a results file, or None when it is damaged (cut short, or not JSON)."""
    try:
        return json.loads(read_text(file, "the results file", "check the run folder"))
    except ValueError:
        return None
    except UserError as err:
        if isinstance(err, IOFailure):
            raise
        return None  # not UTF-8 text


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a finished run: a readable results.json that says so. A damaged results file
    does not count, so that ``run --resume`` can rebuild it."""
    file = RunPaths(Path(run_dir)).results
    if not file.is_file():
        return False
    data = _read_results(file)
    return isinstance(data, dict) and data.get("status") == "finished" and "evaluation" in data


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every run directory (a folder holding results.json) under ``root``, sorted."""
    return sorted(p.parent for p in Path(root).rglob(RESULTS_FILE))
