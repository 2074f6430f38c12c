"""Leaderboard tables and plots from every ``results.json`` below a folder, with published numbers beside them.

Each evaluation block of each finished run is one *entry* (a run evaluated on two episode sets gives two). A run's
*main* entry is its own test evaluation (``results.json``'s ``evaluation``); the others are the evaluations
``fewshot-sla eval`` added (another episode set or count, or another dataset). The accuracy table, its plot and
the paired differences hold main entries only, so every method is one row however often it was evaluated; the
other entries go into their own tables, one per episode set (``other_evaluations.csv``).

Entries whose configurations differ only in the seed (and in settings that do not change results) and that
share the episode set and the dataset fingerprint form one row: the mean over runs, the std across seeds,
and the per-run 95% episode interval (``runs`` counts the runs, ``seeds`` their distinct seeds, ``seed_values``
lists them). Configuration keys newer than a run count as their defaults, and an objective that uses no
transformation (``baseline``) counts and reads as transformation ``none`` whatever its configured one
(``results.transform_label``). A non-baseline run is compared with the ``baseline`` run of the same
configuration (transform and objective aside) and seed, episode by episode, only when both were tested on
the same episode set of the same dataset store (any of the baseline's evaluations); otherwise the table says
why they were not compared (for a main entry; another episode set is compared only where both have it).

Outputs (written atomically): ``leaderboard.md``, ``leaderboard.csv`` (accuracies, published rows
included), ``paired_differences.csv``, ``other_evaluations.csv`` (accuracies on the other episode sets, with the
paired difference to the baseline where there is one), ``accuracy.png``, ``paired_difference.png``, and the
reproduction table of the rows (any episode set) that match a published one (``reproduction.py``):
``reproduction.md``, ``reproduction.csv`` and ``reproduction.png``.

Runs are read through ``finished_run.FinishedRun`` (typed records; older results files completed on read). Rows
are typed records described once: ``AccuracyRow`` (``leaderboard.csv``), ``OtherRow`` (``other_evaluations.csv``),
``PairedRow`` (``paired_differences.csv``) and ``reproduction.ReproductionRow``; each CSV file's columns are the
fields its row marks as its columns, in their order (``columns``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from textwrap import fill
from typing import Any, NamedTuple

import numpy as np

from fewshot_sla.atomic import atomic_path, write_text_atomic
from fewshot_sla.config import RESULT_NEUTRAL_KEYS, RunConfig, default_text
from fewshot_sla.engine.stats import PairedComparison, paired_comparison
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.finished_run import FinishedRun
from fewshot_sla.leaderboard import reproduction
from fewshot_sla.leaderboard.published import PublishedResult
from fewshot_sla.leaderboard.rows import (
    ACCURACY_COLUMNS,
    OTHER_COLUMNS,
    PAIRED_COLUMNS,
    AccuracyRow,
    OtherRow,
    PairedRow,
)
from fewshot_sla.objectives import BASELINE
from fewshot_sla.prediction_kinds import display_rank, kind_label
from fewshot_sla.results import (
    UNTRANSFORMED_OBJECTIVES,
    EvaluationRecord,
    ResultsFile,
    find_runs,
    now_iso,
    transform_label,
)

# What a row does not tell apart: the settings that never change a run's numbers (config/run_config.py's Knobs),
# the seed (a row pools a setting's seeds) and the episode file (rows are keyed by the episode set's hash itself).
RESULT_FREE_KEYS = ("seed", "episodes_file", *RESULT_NEUTRAL_KEYS)
# The only configuration keys in which a run may differ from the baseline run it is compared with.
COMPARED_KEYS = ("transform", "objective")
OUTPUTS = (
    "leaderboard.md",
    "leaderboard.csv",
    "paired_differences.csv",
    "other_evaluations.csv",
    "accuracy.png",
    "paired_difference.png",
    "reproduction.md",
    "reproduction.csv",
    "reproduction.png",
)


def _identity(config: dict[str, Any], dropped: Iterable[str]) -> str:
    """A canonical text of ``config`` without the ``dropped`` keys, to compare configurations: keys newer than the
    run count as their defaults (a run from before ``val_ways`` existed is the same setting as one with it unset),
    and the transformation of an objective that uses none is ``none``."""
    dropped = set(dropped)
    full = {**RunConfig().to_dict(), **config}
    if "objective" in full and "transform" in full:
        full["transform"] = transform_label(full["objective"], full["transform"])
    return json.dumps({k: v for k, v in full.items() if k not in dropped}, sort_keys=True)


class Setting(NamedTuple):
    """The columns that describe an entry's setting to a reader (the first columns of its rows)."""

    dataset: str  # a cross-domain evaluation reads "source -> target"
    ways: int
    shots: int
    method: str
    backbone: str
    transform: str
    objective: str


@dataclass(frozen=True)
class Entry:
    """One evaluation (one episode set) of one finished run."""

    run: FinishedRun
    block: EvaluationRecord

    @property
    def results(self) -> ResultsFile:
        """The run's results (method, backbone, dataset, transform, objective, seed, ...)."""
        return self.run.results

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved configuration, as results.json records it."""
        return self.run.results.config

    @property
    def episode_set(self) -> str:
        """Hash of the test episode set."""
        return self.block.episode_set.hash

    @property
    def main(self) -> bool:
        """Whether this is the run's own test evaluation (not one ``fewshot-sla eval`` added)."""
        return self.episode_set == self.run.evaluation.episode_set.hash

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the dataset store the evaluation's episodes came from."""
        return self.run.store_fingerprint(self.block)

    @property
    def headline(self) -> str:
        """The prediction kind that represents this run (SLA+AG when present)."""
        return self.block.headline

    @property
    def setting(self) -> str:
        """The configuration without the seed: runs sharing it are seeds of one setting."""
        return _identity(self.config, RESULT_FREE_KEYS)

    @property
    def partner_key(self) -> str:
        """What a run shares with the baseline it is compared with: everything but transform and objective."""
        return _identity(self.config, tuple(k for k in RESULT_FREE_KEYS if k != "seed") + COMPARED_KEYS)

    def display(self) -> Setting:
        """The columns that describe this entry's setting to a reader."""
        s, r = self.block.episode_set, self.results
        return Setting(
            # a cross-domain evaluation shows where the run trained and where it was tested
            dataset=r.dataset if s.dataset == r.dataset else f"{r.dataset} -> {s.dataset}",
            ways=s.ways,
            shots=s.shots,
            method=r.method,
            backbone=r.backbone,
            transform=r.transform,  # from the objective (``finished_run`` reads older results so)
            objective=r.objective,
        )


def load_entries(runs_dir: str | os.PathLike) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """Every evaluation of every finished run below ``runs_dir``, and the runs skipped with the reason."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds the runs (e.g. runs/<grid name>)")
    entries: list[Entry] = []
    skipped: list[tuple[Path, str]] = []
    for path in find_runs(root):
        try:
            run = FinishedRun.open(path)
        except UserError as err:
            skipped.append((path, str(err)))
            continue
        entries.extend(Entry(run, block) for block in run.evaluations)
    return entries, skipped


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _std(values: Sequence[float]) -> float | None:
    """Sample std across runs (None for a single run)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _objective_rank(objective: str) -> tuple[bool, str]:
    """The baseline first, then the other objectives by name (da, mt, sla, sla+sd, plug-ins)."""
    return (objective != BASELINE, objective)


def _seeds(entries: Iterable[Entry]) -> tuple[int, str]:
    """The number of distinct seeds of these entries' runs, and the seeds themselves (space-separated)."""
    seeds = sorted({e.results.seed for e in entries})
    return len(seeds), " ".join(str(s) for s in seeds)


def accuracy_rows(
    entries: Sequence[Entry], published: Sequence[PublishedResult] = (), *, tag_sets: bool = True
) -> list[AccuracyRow]:
    """One row per (setting, episode set, dataset store, prediction kind), plus the published rows of every
    (dataset, ways, shots) that has measured rows; sorted for reading. Measured rows also carry the resolved
    ``config`` of their first run (the same for all, seed aside), their ``test_queries`` and ``test_dataset``.
    ``tag_sets``: tell rows apart by episode set in their ``training`` label (not needed where a table holds one
    episode set); rows on different data are always told apart."""
    groups: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        groups[(e.setting, e.episode_set, e.fingerprint)].append(e)
    rows = []
    for members in groups.values():
        members.sort(key=lambda e: (e.results.seed, str(e.run.path)))
        first = members[0]
        for kind in first.block.accuracy:
            if not all(kind in e.block.accuracy for e in members):
                continue
            accs = [e.block.accuracy[kind] for e in members]
            means, cis = [a.mean for a in accs], [a.ci95 for a in accs]
            seeds, seed_values = _seeds(members)
            validated = [e.results.train for e in members if e.results.train.best_val_accuracy is not None]
            s = first.block.episode_set
            rows.append(
                AccuracyRow(
                    **first.display()._asdict(),
                    source_type="measured",
                    prediction=kind,
                    headline=kind == first.headline,
                    accuracy=_mean(means),
                    # a run of a single test episode has no interval (null), nor then has the row
                    ci95=None if None in cis else _mean([c for c in cis if c is not None]),
                    seed_std=_std(means),
                    runs=len(members),
                    seeds=seeds,
                    seed_values=seed_values,
                    test_episodes=first.block.episodes,
                    test_queries=s.queries,
                    test_dataset=s.dataset,
                    train_episodes=first.config.get("train_episodes"),
                    best_val_episodes=" ".join(str(t.best_episodes) for t in validated),
                    best_at_end=any(t.best_step >= t.steps for t in validated) if validated else None,
                    episode_set=first.episode_set[:12],
                    fingerprint=first.fingerprint[:12],
                    config_id=_short(first.setting),
                    source="measured here",
                    protocol=f"{first.block.episodes} test episodes, {s.queries} queries/class, episode set "
                    f"{first.episode_set[:8]}",
                    run_means=means,
                    config=first.config,
                )
            )
    present = {(r.dataset, r.ways, r.shots) for r in rows}
    for p in published:
        if (p.dataset, p.ways, p.shots) in present:
            rows.append(
                AccuracyRow(
                    dataset=p.dataset,
                    ways=p.ways,
                    shots=p.shots,
                    method=p.method,
                    backbone=p.backbone,
                    transform="",
                    objective="",
                    source_type="published",
                    prediction="",
                    headline=True,
                    accuracy=p.accuracy,
                    ci95=p.ci95,
                    seed_std=None,
                    runs=None,
                    seeds=None,
                    seed_values="",
                    test_episodes=p.test_episodes,
                    test_queries=p.test_queries,
                    test_dataset=p.dataset,
                    train_episodes=p.train_episodes,
                    best_val_episodes="",
                    best_at_end=None,
                    episode_set="",
                    fingerprint="",
                    config_id="",
                    source=p.citation(),
                    protocol=p.protocol(),
                    run_means=[],
                    config=None,
                    digits=p.digits,
                )
            )
    rows.sort(
        key=lambda r: (
            r.dataset,
            r.ways,
            r.shots,
            r.method,
            r.backbone,
            r.source_type != "published",
            _objective_rank(r.objective),
            r.transform,
            r.config_id,
            r.episode_set,
            display_rank(r.prediction),
        )
    )
    _label(rows, tag_sets)
    return rows


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _label(rows: list[AccuracyRow], tag_sets: bool = True) -> None:
    """Set each row's ``training`` text (objective, the transformation where it uses one, random quarter turns where
    the run trained with them), adding the episode
    set (with ``tag_sets``), data or the configuration values that differ where measured rows would otherwise read
    the same."""
    for r in rows:
        if r.source_type == "published":
            r.training = "published"
        else:
            untransformed = r.objective in UNTRANSFORMED_OBJECTIVES
            r.training = r.objective if untransformed else f"{r.objective} ({r.transform})"
            if (r.config or {}).get("augment_rotations"):  # a departure from the protocol: named even when alone
                r.training += " + random quarter turns"
    # Episode sets and data are told apart per plot panel (so colours stay consistent across its methods),
    # configurations per method and backbone (the panel's x axis already separates those).
    if tag_sets:
        _tag(rows, lambda r: r.episode_set, "set")
    _tag(rows, lambda r: r.fingerprint, "data")
    _tag_configurations(rows)


def _tag(rows: list[AccuracyRow], value: Callable[[AccuracyRow], str], tag: str) -> None:
    """Add ``[tag value]`` to the ``training`` of measured rows that read the same (dataset, ways, shots, training,
    prediction) but differ in ``value``."""
    groups: dict[tuple[Any, ...], list[AccuracyRow]] = defaultdict(list)
    for r in rows:
        if r.source_type == "measured":
            groups[(r.dataset, r.ways, r.shots, r.training, r.prediction)].append(r)
    for members in groups.values():
        if len({value(r) for r in members}) > 1:
            for r in members:
                r.training += f" [{tag} {value(r)[:8]}]"


def _field_order(key: str) -> tuple[int, str]:
    """Sort key of a flat setting's key: its field's place in the configuration, then the option's name."""
    fields_in_order = list(RunConfig.model_fields)
    field_name, _, option = key.partition(".")
    return (fields_in_order.index(field_name) if field_name in fields_in_order else len(fields_in_order), option)


def _flat_setting(config: dict[str, Any]) -> dict[str, Any]:
    """A row's setting as ``key -> value`` in the configuration's field order, option dicts one level down as
    ``learner_options.scale``."""
    flat: dict[str, Any] = {}
    for key, value in sorted(json.loads(_identity(config, RESULT_FREE_KEYS)).items(), key=lambda i: _field_order(i[0])):
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def _value_text(key: str, setting: dict[str, Any]) -> str:
    """Configuration value ``key`` of a flat setting as a tag shows it: ``default`` for an option the setting does
    not set, what the field's unset value means (e.g. ``train`` for ``train_split``) for None, strings bare, JSON
    otherwise."""
    if key not in setting:
        return "default"
    value = setting[key]
    if value is None:
        return default_text(key)[0] if key in RunConfig.model_fields else "unset"
    return value if isinstance(value, str) else json.dumps(value)


def _tag_configurations(rows: list[AccuracyRow]) -> None:
    """Add the configuration values that tell apart measured rows otherwise reading the same (dataset, ways, shots,
    method, backbone, training, prediction), e.g. ``[learner_options.scale=1, train_episodes=3000]``: each row
    shows its values of the keys that differ within its group, ``default`` for an option it does not set."""
    groups: dict[tuple[Any, ...], list[AccuracyRow]] = defaultdict(list)
    for r in rows:
        if r.source_type == "measured":
            groups[(r.dataset, r.ways, r.shots, r.training, r.prediction, r.method, r.backbone)].append(r)
    for members in groups.values():
        if len({r.config_id for r in members}) < 2:
            continue
        settings = [_flat_setting(r.config or {}) for r in members]
        keys = list(dict.fromkeys(k for s in settings for k in s))
        differing = sorted(
            (k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1), key=_field_order
        )
        for r, s in zip(members, settings):
            r.training += " [" + ", ".join(f"{k}={_value_text(k, s)}" for k in differing) + "]"


def paired_rows(
    entries: Sequence[Entry], partners: Sequence[Entry] | None = None, *, explain: bool = True
) -> list[PairedRow]:
    """Headline-minus-baseline differences per setting, from per-episode accuracies on shared episode sets: each
    non-baseline entry of ``entries`` against a baseline entry of ``partners`` (default: ``entries``) on its
    episode set and data. With ``explain``, entries whose baseline was tested on other episodes or data get a row
    saying why they were not compared; without it they are left out."""
    baselines: dict[str, list[Entry]] = defaultdict(list)
    for e in entries if partners is None else partners:
        if e.results.objective == BASELINE:
            baselines[e.partner_key].append(e)
    for members in baselines.values():
        members.sort(key=lambda e: str(e.run.path))
    compared: dict[tuple[str, str, str, str], list[tuple[Entry, PairedComparison]]] = defaultdict(list)
    rows = []
    for e in entries:
        candidates = baselines.get(e.partner_key, []) if e.results.objective != BASELINE else []
        if not candidates:
            continue
        same = [b for b in candidates if b.episode_set == e.episode_set and b.fingerprint == e.fingerprint]
        if not same and not explain:
            continue
        if not same:
            b = next((b for b in candidates if b.main), candidates[0])
            why = (
                f"dataset stores differ (fingerprint {e.fingerprint[:8]} vs baseline {b.fingerprint[:8]})"
                if b.fingerprint != e.fingerprint
                else f"episode sets differ ({e.episode_set[:8]} vs baseline {b.episode_set[:8]})"
            )
            rows.append(
                _unpaired_row(e, f"not compared: {why}; evaluate both on one episode set with 'fewshot-sla eval'")
            )
            continue
        base = same[0]
        try:
            ours = e.run.per_episode(e.episode_set)[e.headline]
            theirs = base.run.per_episode(base.episode_set)[base.headline]
            comparison = paired_comparison(ours, theirs)
        except (UserError, KeyError, ValueError) as err:
            if explain:
                rows.append(_unpaired_row(e, f"not compared: per-episode results unusable ({err})"))
            continue
        compared[(e.setting, e.episode_set, e.fingerprint, e.headline)].append((e, comparison))
    for seeds in compared.values():
        seeds.sort(key=lambda m: (m[0].results.seed, str(m[0].run.path)))
        first = seeds[0][0]
        diffs = [100.0 * c.mean_diff for _, c in seeds]
        seed_count, seed_values = _seeds(m for m, _ in seeds)
        rows.append(
            PairedRow(
                **first.display()._asdict(),
                comparison=f"{kind_label(first.headline)} - baseline",
                difference=_mean(diffs),
                ci95=_mean([100.0 * c.ci95 for _, c in seeds]),
                seed_std=_std(diffs),
                runs=len(seeds),
                seeds=seed_count,
                seed_values=seed_values,
                episodes=seeds[0][1].n,
                episode_set=first.episode_set[:12],
                fingerprint=first.fingerprint[:12],
                config_id=_short(first.setting),
                p_ttest=seeds[0][1].p_ttest if len(seeds) == 1 else None,
                note="",
                run_diffs=diffs,
            )
        )
    rows.sort(
        key=lambda r: (
            r.dataset,
            r.ways,
            r.shots,
            r.method,
            r.backbone,
            _objective_rank(r.objective),
            r.transform,
            r.difference is None,
        )
    )
    return rows


def _unpaired_row(e: Entry, note: str) -> PairedRow:
    return PairedRow(
        **e.display()._asdict(),
        comparison=f"{kind_label(e.headline)} - baseline",
        difference=None,
        ci95=None,
        seed_std=None,
        runs=1,
        seeds=1,
        seed_values=str(e.results.seed),
        episodes=e.block.episodes,
        episode_set=e.episode_set[:12],
        fingerprint=e.fingerprint[:12],
        config_id=_short(e.setting),
        p_ttest=None,
        note=note,
        run_diffs=[],
    )


def other_evaluation_rows(acc: Sequence[AccuracyRow], pairs: Sequence[PairedRow]) -> list[OtherRow]:
    """The accuracy rows of the other episode sets, each headline row with its paired difference to the baseline
    on the same set (``comparison``, ``difference``, ``difference_ci95``, ``difference_seed_std``,
    ``difference_runs``, ``p_ttest``; None where there is none), sorted by episode set, then as ``accuracy_rows``."""
    by_key = {(r.config_id, r.episode_set, r.fingerprint): r for r in pairs if r.difference is not None}
    rows = []
    for r in acc:
        pair = by_key.get((r.config_id, r.episode_set, r.fingerprint)) if r.headline else None
        rows.append(
            OtherRow(
                **{f.name: getattr(r, f.name) for f in fields(AccuracyRow)},
                comparison=pair.comparison if pair else None,
                difference=pair.difference if pair else None,
                difference_ci95=pair.ci95 if pair else None,
                difference_seed_std=pair.seed_std if pair else None,
                difference_runs=pair.runs if pair else None,
                p_ttest=pair.p_ttest if pair else None,
            )
        )
    rows.sort(key=lambda r: _episode_set_key(r) + (0,))  # stable: accuracy_rows' order within a set
    return rows


def _episode_set_key(r: AccuracyRow) -> tuple[Any, ...]:
    """What names an episode set in the tables of other evaluations."""
    return (
        r.test_dataset,
        r.ways,
        r.shots,
        r.test_queries,
        r.test_episodes,
        r.episode_set,
        r.fingerprint,
    )


def _other_sections(other: Sequence[OtherRow]) -> list[str]:
    """One Markdown table per episode set of the other evaluations."""
    if not other:
        return ["No run was evaluated on another episode set (`fewshot-sla eval`)."]
    sets: dict[tuple[Any, ...], list[OtherRow]] = defaultdict(list)
    for r in other:
        sets[_episode_set_key(r)].append(r)
    fingerprints = {key[-1] for key in sets}
    parts: list[str] = []
    for key, rows in sets.items():
        dataset, ways, shots, queries, episodes, episode_set, fingerprint = key
        data = f", data {fingerprint[:8]}" if len(fingerprints) > 1 else ""
        parts += [
            f"### {dataset}: {ways}-way {shots}-shot, {episodes} episodes, {queries} queries/class "
            f"(episode set {episode_set[:8]}{data})",
            "",
            _md_table(
                [
                    "dataset",
                    "method",
                    "backbone",
                    "training",
                    "prediction",
                    "accuracy %",
                    "±95% CI (episodes)",
                    "±std (seeds)",
                    "runs",
                    "train episodes",
                    "paired difference to the baseline %",
                ],
                [
                    [
                        r.dataset,
                        r.method,
                        r.backbone,
                        r.training,
                        kind_label(r.prediction),
                        _fmt(r.accuracy),
                        _fmt(r.ci95),
                        _fmt(r.seed_std),
                        str(r.runs),
                        str(r.train_episodes) if r.train_episodes else "-",
                        f"{_fmt(r.difference, sign=True)} ± {_fmt(r.difference_ci95)} ({r.comparison})"
                        if r.difference is not None
                        else "-",
                    ]
                    for r in rows
                ],
            ),
            "",
        ]
    return parts[:-1]


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _md_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    def clean(cell: str) -> str:  # brackets escaped: "[data 1a2b] [lr=0.1]" is no reference link
        return str(cell).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(clean(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def render_markdown(
    acc: Sequence[AccuracyRow],
    pairs: Sequence[PairedRow],
    runs_dir: Path,
    n_runs: int,
    skipped: Sequence[tuple[Path, str]],
    reproduction_summary: str = "",
    other: Sequence[OtherRow] = (),
) -> str:
    """The leaderboard as Markdown: accuracy table (published rows marked), paired differences, the tables of the
    other episode sets (``other_evaluation_rows``), the reproduction summary (``reproduction.md`` has the table),
    plots."""
    acc_lines = []
    for r in acc:
        published = r.source_type == "published"
        acc_lines.append(
            [
                r.dataset,
                str(r.ways),
                str(r.shots),
                r.method,
                r.backbone,
                r.training,
                kind_label(r.prediction) if r.prediction else "-",
                _fmt(r.accuracy, r.digits),
                _fmt(r.ci95, r.digits),
                _fmt(r.seed_std),
                str(r.runs) if r.runs else "-",
                str(r.train_episodes) if r.train_episodes else "-",
                f"**published**: {r.source}; {r.protocol}" if published else f"measured; {r.protocol}",
            ]
        )
    pair_lines = [
        [
            r.dataset,
            str(r.ways),
            str(r.shots),
            r.method,
            r.backbone,
            f"{r.comparison} ({r.objective}, {r.transform})",
            _fmt(r.difference, sign=True),
            _fmt(r.ci95),
            _fmt(r.seed_std),
            str(r.runs),
            str(r.episodes),
            r.episode_set[:8],
            r.note or "paired on the same episodes",
        ]
        for r in pairs
    ]
    parts = [
        "# Leaderboard",
        "",
        f"Built {now_iso()} from {n_runs} finished run(s) under `{runs_dir}`. Accuracies are test accuracies in %. "
        "Each measured row is one setting: the mean over its runs (seeds), the 95% interval over test episodes "
        "(1.96 s / sqrt(n), per run; the mean over runs when there are several) and the standard deviation "
        "across seeds. Each run counts once, with its own test evaluation (the one its training ended with); "
        "evaluations added later with `fewshot-sla eval` (other episode sets or counts, other datasets) are in "
        "their own tables below, one per episode set. Rows marked **published** are numbers reported in the cited "
        "papers under their own protocol (backbone, test episodes, training budget); they were not measured here.",
        "",
        "## Accuracy",
        "",
        _md_table(
            [
                "dataset",
                "ways",
                "shots",
                "method",
                "backbone",
                "training",
                "prediction",
                "accuracy %",
                "±95% CI (episodes)",
                "±std (seeds)",
                "runs",
                "train episodes",
                "source; protocol",
            ],
            acc_lines,
        ),
        "",
        "## Paired difference to the baseline",
        "",
        "Each non-baseline run minus the `baseline` run with the same configuration and seed, episode by episode "
        "on the same test episodes of the same dataset store (SLA runs use their SLA+AG prediction). Runs tested "
        "on different episode sets or data are never paired; such rows say so.",
        "",
        _md_table(
            [
                "dataset",
                "ways",
                "shots",
                "method",
                "backbone",
                "comparison",
                "difference %",
                "±95% CI (paired episodes)",
                "±std (seeds)",
                "runs",
                "episodes",
                "episode set",
                "note",
            ],
            pair_lines,
        )
        if pair_lines
        else "No run has a baseline run to be compared with.",
        "",
        "## Other episode sets",
        "",
        "Evaluations a run was given besides its own test set, one table per episode set (named by the dataset "
        "it was drawn from; cross-domain rows read `training dataset -> test dataset`). The paired difference is "
        "each run's headline prediction minus the `baseline` run of its configuration and seed on this episode "
        "set, where that run was evaluated on it too (`other_evaluations.csv` has every number).",
        "",
        *_other_sections(other),
        "",
        "## Reproduction of published numbers",
        "",
        (reproduction_summary + " " if reproduction_summary else "")
        + "Verdicts (reproduced / above / below), differences with their 95% intervals and training budgets: "
        "[reproduction.md](reproduction.md), `reproduction.csv`, `reproduction.png`.",
        "",
        "## Plots",
        "",
        "![accuracy](accuracy.png)",
        "",
        "![paired difference](paired_difference.png)",
        "",
    ]
    if skipped:
        parts += ["## Skipped folders", ""] + [f"- `{path}`: {reason}" for path, reason in skipped] + [""]
    return "\n".join(parts)


# The columns of the CSV tables, from the rows' fields.


def render_csv(rows: Sequence[Any], columns: Sequence[str]) -> str:
    """Rows (dataclasses) as CSV text with the given columns, fields of theirs (numbers in full precision, empty
    for missing values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        values = [getattr(r, c) for c in columns]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def _panels(rows: Sequence[AccuracyRow] | Sequence[PairedRow]) -> list[tuple[str, int, int]]:
    return sorted({(r.dataset, r.ways, r.shots) for r in rows})


def _figure(n_panels: int, width_per_panel: float) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    rows = max(1, n_panels)
    fig = Figure(figsize=(width_per_panel, 3.6 * rows))
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _series(r: AccuracyRow) -> str:
    """The legend entry of a row's bar: its training, and the prediction kind of a measured row (a long one
    wrapped)."""
    return r.training if r.source_type == "published" else fill(f"{r.training}: {kind_label(r.prediction)}", 60)


def plot_accuracy(rows: Sequence[AccuracyRow], path: Path) -> None:
    """Bars of headline accuracy with 95% episode intervals per method/backbone, one panel per dataset and
    shot count; dots are the runs (seeds); hatched bars are published numbers."""
    rows = [r for r in rows if r.headline]
    panels = _panels(rows)
    width = max(
        [4.5]
        + [1.8 * len({(r.method, r.backbone) for r in rows if (r.dataset, r.ways, r.shots) == p}) + 2 for p in panels]
    )
    fig, axes = _figure(len(panels), min(width, 16))
    for ax, panel in zip(axes, panels):
        here = [r for r in rows if (r.dataset, r.ways, r.shots) == panel]
        groups = sorted({(r.method, r.backbone) for r in here})
        series = sorted({_series(r) for r in here}, key=lambda t: (t != "published", t))
        step = 0.8 / len(series)
        legend = {}
        for r in here:
            j = series.index(_series(r))
            x = groups.index((r.method, r.backbone)) - 0.4 + step * (j + 0.5)
            legend[_series(r)] = ax.bar(
                x,
                r.accuracy,
                step * 0.9,
                yerr=r.ci95,
                capsize=3,
                color=f"C{j}",
                hatch="//" if r.source_type == "published" else None,
                edgecolor="black",
                linewidth=0.5,
            )
            if len(r.run_means) > 1:
                ax.plot([x] * len(r.run_means), r.run_means, "k.", markersize=4)
        ax.legend([legend[label] for label in series], series, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xticks(range(len(groups)), [f"{m}\n{b}" for m, b in groups], fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set(ylabel="test accuracy (%)", title=f"{panel[0]}, {panel[1]}-way {panel[2]}-shot")
    if not panels:
        axes[0].text(0.5, 0.5, "no finished runs", ha="center", va="center")
    _save(fig, path)


def plot_paired(rows: Sequence[PairedRow], path: Path) -> None:
    """Horizontal bars of each paired difference to the baseline with its 95% interval, one panel per dataset
    and shot count; settings that could not be compared are left out."""
    compared = [(r, r.difference) for r in rows if r.difference is not None]
    panels = _panels([r for r, _ in compared])
    fig, axes = _figure(len(panels), 6.0)
    for ax, panel in zip(axes, panels):
        here = [(r, d) for r, d in compared if (r.dataset, r.ways, r.shots) == panel]
        labels = [f"{r.method} / {r.backbone}\n{r.comparison} ({r.objective}, {r.transform})" for r, _ in here]
        y = np.arange(len(here))
        ax.barh(
            y,
            [d for _, d in here],
            xerr=[r.ci95 for r, _ in here],
            capsize=3,
            color=["C2" if d >= 0 else "C3" for _, d in here],
            edgecolor="black",
            linewidth=0.5,
        )
        for yi, (r, _) in zip(y, here):
            if len(r.run_diffs) > 1:
                ax.plot(r.run_diffs, [yi] * len(r.run_diffs), "k.", markersize=4)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="accuracy difference (percentage points)", title=f"{panel[0]}, {panel[1]}-way {panel[2]}-shot")
    if not panels:
        axes[0].text(0.5, 0.5, "no run could be paired with a baseline", ha="center", va="center")
        axes[0].set_axis_off()
    _save(fig, path)


@dataclass(frozen=True)
class BuildReport:
    """What ``build_leaderboard`` read and wrote."""

    runs: int
    accuracy_rows: int
    paired_rows: int
    skipped: list[tuple[Path, str]]
    files: list[Path]
    verdicts: dict[str, int] = field(default_factory=dict)  # reproduction rows per verdict
    other_rows: int = 0  # accuracy rows of the other episode sets (other_evaluations.csv)


def build_leaderboard(
    runs_dir: str | os.PathLike, out_dir: str | os.PathLike, published: Sequence[PublishedResult] = ()
) -> BuildReport:
    """Read every finished run below ``runs_dir`` and write the tables and plots into ``out_dir``."""
    runs_dir, out = Path(runs_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{setting('out')} {out} is a file; choose a folder for the leaderboard")
    entries, skipped = load_entries(runs_dir)
    if not entries:
        raise UserError(
            f"no finished run (results.json) under {runs_dir}; run "
            f"'{command('leaderboard run', 'GRID', runs_dir=runs_dir)}' first"
        )
    main = [e for e in entries if e.main]  # one entry per run: its own test evaluation
    extra = [e for e in entries if not e.main]
    acc = accuracy_rows(main, published)
    pairs = paired_rows(main, entries)
    other = other_evaluation_rows(accuracy_rows(extra, tag_sets=False), paired_rows(extra, entries, explain=False))
    # Every episode set is matched (e.g. a 20-way run's 5-way evaluation).
    measured = [r for r in [*acc, *other] if r.source_type == "measured"]
    rep = reproduction.reproduction_rows(measured, published)
    n_runs = len({e.run.path for e in entries})
    files = dict(zip(OUTPUTS, (out / name for name in OUTPUTS)))
    write_text_atomic(
        files["leaderboard.md"],
        render_markdown(acc, pairs, runs_dir, n_runs, skipped, reproduction.summary(rep), other),
    )
    write_text_atomic(files["leaderboard.csv"], render_csv(acc, ACCURACY_COLUMNS))
    write_text_atomic(files["paired_differences.csv"], render_csv(pairs, PAIRED_COLUMNS))
    write_text_atomic(files["other_evaluations.csv"], render_csv(other, OTHER_COLUMNS))
    plot_accuracy(acc, files["accuracy.png"])
    plot_paired(pairs, files["paired_difference.png"])
    write_text_atomic(files["reproduction.md"], reproduction.render_markdown(rep, runs_dir, _md_table))
    write_text_atomic(files["reproduction.csv"], render_csv(rep.rows, reproduction.COLUMNS))
    reproduction.plot(rep, files["reproduction.png"], _save)
    return BuildReport(n_runs, len(acc), len(pairs), skipped, list(files.values()), rep.counts(), len(other))
