"""The leaderboard's rows, each one typed record described once: ``AccuracyRow`` (``leaderboard.csv`` and the
accuracy tables), ``OtherRow`` (``other_evaluations.csv``: evaluations on other episode sets) and ``PairedRow``
(``paired_differences.csv``). A field marked with ``_in(TABLE, ...)`` is a column of those CSV tables, in field
order; ``leaderboard/build.py`` makes the rows, ``leaderboard/reproduction.py`` reads them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

LEADERBOARD, OTHER, PAIRED = "leaderboard", "other", "paired"


def _in(*tables: str) -> dict[str, tuple[str, ...]]:
    """The metadata of a row field that is a column of these CSV tables (``LEADERBOARD``: leaderboard.csv,
    ``OTHER``: other_evaluations.csv, ``PAIRED``: paired_differences.csv), in the order the fields are defined."""
    return {"tables": tables}


def columns(row_type: type, table: str) -> tuple[str, ...]:
    """The CSV columns of ``table``: the fields of ``row_type`` marked as its columns, in their order."""
    return tuple(f.name for f in fields(row_type) if table in f.metadata.get("tables", ()))


@dataclass
class AccuracyRow:
    """One row of an accuracy table: a measured setting (its runs, the seeds, pooled) on one episode set and
    dataset store, with one prediction kind; or a published number (``source_type``)."""

    source_type: Literal["measured", "published"] = field(metadata=_in(LEADERBOARD))
    dataset: str = field(metadata=_in(LEADERBOARD, OTHER))  # a cross-domain evaluation reads "source -> target"
    ways: int = field(metadata=_in(LEADERBOARD, OTHER))
    shots: int = field(metadata=_in(LEADERBOARD, OTHER))
    method: str = field(metadata=_in(LEADERBOARD, OTHER))
    backbone: str = field(metadata=_in(LEADERBOARD, OTHER))
    transform: str = field(metadata=_in(LEADERBOARD, OTHER))  # "" for a published row
    objective: str = field(metadata=_in(LEADERBOARD, OTHER))  # "" for a published row
    prediction: str = field(metadata=_in(LEADERBOARD, OTHER))  # the prediction kind; "" for a published row
    accuracy: float = field(metadata=_in(LEADERBOARD, OTHER))  # percent: the mean over the runs
    ci95: float | None = field(metadata=_in(LEADERBOARD, OTHER))  # the mean of the runs' 95% half-widths over episodes
    seed_std: float | None = field(
        metadata=_in(LEADERBOARD, OTHER)
    )  # the std of the runs' accuracies (None for one run)
    runs: int | None = field(metadata=_in(LEADERBOARD, OTHER))
    seeds: int | None = field(metadata=_in(LEADERBOARD, OTHER))  # how many distinct seeds
    seed_values: str = field(metadata=_in(LEADERBOARD, OTHER))  # the seeds, space-separated
    test_episodes: int | None = field(metadata=_in(LEADERBOARD, OTHER))
    train_episodes: int | None = field(metadata=_in(LEADERBOARD, OTHER))
    # the training episodes seen at each run's best validation check (the checkpoint tested), space-separated; ""
    # for a published row and runs that never validated
    best_val_episodes: str = field(metadata=_in(LEADERBOARD, OTHER))
    # whether a run's best validation check was its last one (validation still improving when its budget ran out);
    # None for a published row and runs that never validated
    best_at_end: bool | None = field(metadata=_in(LEADERBOARD, OTHER))
    episode_set: str = field(metadata=_in(LEADERBOARD, OTHER))  # the set's hash, 12 characters; "" for a published row
    fingerprint: str = field(metadata=_in(LEADERBOARD, OTHER))  # the store's fingerprint, 12 characters
    config_id: str = field(metadata=_in(LEADERBOARD, OTHER))  # the setting's hash, 8 characters
    source: str = field(metadata=_in(LEADERBOARD, OTHER))  # "measured here", or the citation
    protocol: str = field(metadata=_in(LEADERBOARD, OTHER))
    test_dataset: str = field(metadata=_in(OTHER))  # the dataset the test episodes came from
    test_queries: int | None = field(metadata=_in(OTHER))
    headline: bool  # the kind that represents the setting (a published row is its own headline)
    run_means: list[float]  # the runs' accuracies, for the plot's dots
    config: dict[str, Any] | None  # the resolved configuration of the first run (the same for all, seed aside)
    training: str = ""  # what the rows show as the training: objective (transformation) [tags] (``_label``)
    digits: int = 2  # decimals shown: a published row's as its source printed them (``98.8``, not ``98.80``)


@dataclass
class OtherRow(AccuracyRow):
    """An accuracy row of another episode set (``other_evaluations.csv``), a headline row with its paired
    difference to the baseline on the same set where there is one (None where there is none)."""

    comparison: str | None = field(default=None, metadata=_in(OTHER))
    difference: float | None = field(default=None, metadata=_in(OTHER))
    difference_ci95: float | None = field(default=None, metadata=_in(OTHER))
    difference_seed_std: float | None = field(default=None, metadata=_in(OTHER))
    difference_runs: int | None = field(default=None, metadata=_in(OTHER))
    p_ttest: float | None = field(default=None, metadata=_in(OTHER))


@dataclass
class PairedRow:
    """One row of the paired differences: a setting's headline prediction minus its baseline's, episode by
    episode (the mean over seeds), or the reason it was not compared (``note``; no numbers then)."""

    dataset: str = field(metadata=_in(PAIRED))
    ways: int = field(metadata=_in(PAIRED))
    shots: int = field(metadata=_in(PAIRED))
    method: str = field(metadata=_in(PAIRED))
    backbone: str = field(metadata=_in(PAIRED))
    transform: str = field(metadata=_in(PAIRED))
    objective: str = field(metadata=_in(PAIRED))
    comparison: str = field(metadata=_in(PAIRED))  # e.g. "SLA+AG - baseline"
    difference: float | None = field(metadata=_in(PAIRED))  # percentage points, the mean over seeds
    ci95: float | None = field(metadata=_in(PAIRED))  # the mean of the seeds' paired 95% half-widths
    seed_std: float | None = field(metadata=_in(PAIRED))
    runs: int = field(metadata=_in(PAIRED))
    seeds: int = field(metadata=_in(PAIRED))
    seed_values: str = field(metadata=_in(PAIRED))
    episodes: int = field(metadata=_in(PAIRED))
    p_ttest: float | None = field(metadata=_in(PAIRED))  # the paired t-test's p-value (one seed only)
    episode_set: str = field(metadata=_in(PAIRED))
    fingerprint: str = field(metadata=_in(PAIRED))
    config_id: str = field(metadata=_in(PAIRED))
    note: str = field(metadata=_in(PAIRED))  # "" when compared, else why not
    run_diffs: list[float]  # the seeds' differences, for the plot's dots


ACCURACY_COLUMNS = columns(AccuracyRow, LEADERBOARD)
# The other episode sets: the accuracy columns with the test set's dataset and queries, and the paired difference.
OTHER_COLUMNS = columns(OtherRow, OTHER)
PAIRED_COLUMNS = columns(PairedRow, PAIRED)
