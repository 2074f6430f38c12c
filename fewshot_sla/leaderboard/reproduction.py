"""Reproduction verdicts: each measured leaderboard row beside the published row of the same setting.

A measured row (its headline prediction) matches a published row when method, backbone, dataset (not a
cross-domain evaluation), ways and shots are equal and the backbone options are the same once each side's
unnamed options take the backbone factory's defaults (a backbone not registered here compares the options as
written; ``in_channels``, which the data sets, is not compared). For each match the table gives both
accuracies with their 95% intervals, the difference ours - published with a 95% interval that combines both,
sqrt(ci_ours^2 + ci_published^2) (independent estimates; ours alone where the source publishes no interval, and
the table says so), and a verdict:

- **reproduced**: the published value lies within our 95% interval, or the interval of the difference
  contains 0 (both inclusive, up to ``TOLERANCE`` percentage points of floating-point rounding), or it does once
  widened by the published value's own rounding: a source printing ``98.8`` says only that its run lay within
  0.05 of it (``PublishedResult.rounding``, from the digits the table writes), so a difference of -0.20 +- 0.17
  cannot tell ours from a published 98.75; the verdict's basis says when that widening decided it;
- otherwise **above** (ours higher) or **below** (ours lower).

With several seeds a row is their mean and the mean of their per-run episode intervals, as the leaderboard
reports it (the spread across seeds is shown, not folded into the interval). Beside the verdict: the training
budget (episodes seen: ``ceil(train_episodes / meta_batch)`` steps of ``meta_batch`` episodes, from the run's
resolved configuration, whose ``train_episodes`` already counts episodes) against the published one, and the
test episodes and queries on each side.

Outputs (written atomically by ``build.build_leaderboard``): ``reproduction.md``, ``reproduction.csv`` and
``reproduction.png``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from textwrap import fill
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot_sla.errors import UserError
from fewshot_sla.leaderboard.published import PublishedResult, format_options
from fewshot_sla.objectives import BASELINE
from fewshot_sla.prediction_kinds import kind_label
from fewshot_sla.results import now_iso

if TYPE_CHECKING:
    from fewshot_sla.leaderboard.rows import AccuracyRow

REPRODUCED, ABOVE, BELOW = "reproduced", "above", "below"
# Percentage points within which a boundary case counts as inside: floating-point rounding only.
TOLERANCE = 1e-9
BOTH_CIS = "ours and published"
OURS_ONLY = "ours only (no published CI)"
# Backbone options the data decides (greyscale stores), not the published setting.
DATA_OPTIONS = ("in_channels",)
WITHIN_OURS = "published value within our 95% CI"
DIFF_CONTAINS_ZERO = "95% CI of the difference contains 0"
WITHIN_ROUNDING = "95% CI of the difference, widened by the published value's rounding, contains 0"
# Characters per line of a row's label in the plot (a setting's configuration tags wrap onto more lines).
LABEL_WIDTH = 60
# Percentage points: a plot panel whose intervals reach further is drawn on a symmetric-log axis.
LINEAR_SPAN = 5.0
# The snippet section of reproduction.md that the documentation site includes (docs/results/*.md).
DOCS_SECTION = "table"


@dataclass(frozen=True)
class Verdict:
    """How a measured accuracy compares with a published one (all in percent)."""

    difference: float  # ours - published
    ci95: float  # half-width of the difference's 95% interval
    ci_from: str  # BOTH_CIS or OURS_ONLY
    verdict: str  # REPRODUCED, ABOVE or BELOW
    basis: str  # why reproduced (WITHIN_OURS, DIFF_CONTAINS_ZERO or WITHIN_ROUNDING with the rounding); else empty


def judge(ours: float, ours_ci: float, published: float, published_ci: float | None, rounding: float = 0.0) -> Verdict:
    """The verdict for ours (mean, 95% half-width) against a published value, its half-width (None: none
    published) and its rounding (half a unit of its last printed digit; 0: exact). A non-finite interval of ours
    (a single test episode) counts as zero width."""
    ci = ours_ci if math.isfinite(ours_ci) else 0.0
    difference = ours - published
    if published_ci is None:
        combined, ci_from = ci, OURS_ONLY
    else:
        combined, ci_from = math.hypot(ci, published_ci), BOTH_CIS
    if abs(published - ours) <= ci + TOLERANCE:
        return Verdict(difference, combined, ci_from, REPRODUCED, WITHIN_OURS)
    if abs(difference) <= combined + TOLERANCE:
        return Verdict(difference, combined, ci_from, REPRODUCED, DIFF_CONTAINS_ZERO)
    if rounding > 0 and abs(difference) <= combined + rounding + TOLERANCE:
        return Verdict(difference, combined, ci_from, REPRODUCED, f"{WITHIN_ROUNDING} (±{rounding:g})")
    return Verdict(difference, combined, ci_from, ABOVE if difference > 0 else BELOW, "")


def effective_options(backbone: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A backbone's options with the ones left unnamed filled from its registered factory's defaults (the options
    as given when the backbone is not registered here, e.g. a plug-in that is not installed), without the
    ``DATA_OPTIONS``."""
    from fewshot_sla.registry import BACKBONES

    given = {k: v for k, v in options.items() if k not in DATA_OPTIONS}
    try:
        factory = BACKBONES.get(backbone)
        parameters = inspect.signature(factory).parameters.values()
    except (UserError, TypeError, ValueError):
        return given
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {
        p.name: p.default
        for p in parameters
        if p.kind in keyword and p.default is not p.empty and p.name not in DATA_OPTIONS
    }
    return {**defaults, **given}


def _differing(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    """The options in which two effective option sets differ, e.g. ``hidden=64 (published 32)``."""
    missing = "unset"
    parts = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key, missing), theirs.get(key, missing)
        if a != b:
            parts.append(f"{key}={_text(a)} (published {_text(b)})")
    return ", ".join(parts)


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _budget(config: Mapping[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """(train_episodes, meta_batch, optimizer steps, episodes seen) of a resolved configuration."""
    episodes, batch = config.get("train_episodes"), config.get("meta_batch")
    if not episodes or not batch:
        return episodes, batch, None, None
    steps = math.ceil(episodes / batch)
    return episodes, batch, steps, steps * batch


@dataclass(frozen=True)
class ReproductionRow:
    """One row of the reproduction table: a measured headline row beside a matching published row (all
    accuracies in percent). Every field but ``training`` is a column of ``reproduction.csv``, in this order."""

    dataset: str
    ways: int
    shots: int
    method: str
    backbone: str
    backbone_options: str  # the run's, as written in the published table ("" for none)
    transform: str
    objective: str
    prediction: str
    runs: int | None
    seeds: str  # the seed values, space-separated
    published_accuracy: float
    published_ci95: float | None
    published_rounding: float  # half a unit of the published accuracy's last printed digit (0: unknown)
    accuracy: float
    ci95: float
    seed_std: float | None
    difference: float  # ours - published
    difference_ci95: float
    difference_ci_from: str  # BOTH_CIS or OURS_ONLY
    verdict: str  # REPRODUCED, ABOVE or BELOW
    verdict_basis: str  # why reproduced (WITHIN_OURS, DIFF_CONTAINS_ZERO or WITHIN_ROUNDING ...); empty otherwise
    train_episodes: int | None
    meta_batch: int | None
    train_steps: int | None
    episodes_seen: int | None
    published_train_episodes: int | None
    budget_ratio: float | None  # episodes seen, ours / published
    best_val_episodes: str  # the episodes seen at each run's best validation check (the checkpoint tested)
    best_at_end: bool | None  # whether a run's best validation check was its last (still improving at the end)
    test_episodes: int | None
    published_test_episodes: int | None
    test_queries: int | None
    published_test_queries: int | None
    source: str  # the published row's citation
    published_protocol: str
    config_id: str
    training: str = field(default="", metadata={"column": False})  # the measured row's label (not a column)
    published_digits: int = field(default=2, metadata={"column": False})  # decimals the source printed


COLUMNS = tuple(f.name for f in fields(ReproductionRow) if f.metadata.get("column", True))


@dataclass(frozen=True)
class Reproduction:
    """The reproduction table: one row per (measured headline row, matching published row), and the measured
    headline rows that have none, each with the reason."""

    rows: list[ReproductionRow]
    unmatched: list[tuple[AccuracyRow, str]]

    def counts(self) -> dict[str, int]:
        """Rows per verdict."""
        return {v: sum(r.verdict == v for r in self.rows) for v in (REPRODUCED, ABOVE, BELOW)}


def reproduction_rows(acc_rows: Sequence[AccuracyRow], published: Sequence[PublishedResult]) -> Reproduction:
    """Compare every measured headline row of ``accuracy_rows`` (which carry the run's resolved ``config``) with
    the published rows of its setting."""
    rows: list[ReproductionRow] = []
    unmatched: list[tuple[AccuracyRow, str]] = []
    for r in acc_rows:
        if r.source_type != "measured" or not r.headline:
            continue
        config = r.config or {}
        ours_options = effective_options(r.backbone, config.get("backbone_options") or {})
        same_setting = [
            p
            for p in published
            if (p.method, p.backbone, p.dataset, p.ways, p.shots) == (r.method, r.backbone, r.dataset, r.ways, r.shots)
        ]
        matches = [p for p in same_setting if effective_options(p.backbone, p.backbone_options) == ours_options]
        if not matches:
            if same_setting:
                p = same_setting[0]
                why = (
                    f"backbone options differ from {p.citation()}: "
                    f"{_differing(ours_options, effective_options(p.backbone, p.backbone_options))}"
                )
            else:
                why = "no published row for this method, backbone, dataset, ways and shots"
            unmatched.append((r, why))
            continue
        for p in matches:
            rows.append(_row(r, config, p))
    rows.sort(key=_order)
    unmatched.sort(key=lambda item: _order(item[0]))
    return Reproduction(rows, unmatched)


def _order(r: AccuracyRow | ReproductionRow) -> tuple[Any, ...]:
    return (
        r.dataset,
        r.ways,
        r.shots,
        r.method,
        r.backbone,
        r.objective != BASELINE,
        r.objective,
        r.transform,
        r.config_id,
        r.source,
    )


def _row(r: AccuracyRow, config: Mapping[str, Any], p: PublishedResult) -> ReproductionRow:
    # A measured row's interval is a number (NaN for runs of a single episode: judged as no interval).
    ours_ci = math.nan if r.ci95 is None else r.ci95
    v = judge(r.accuracy, ours_ci, p.accuracy, p.ci95, p.rounding)
    episodes, batch, steps, seen = _budget(config)
    return ReproductionRow(
        dataset=r.dataset,
        ways=r.ways,
        shots=r.shots,
        method=r.method,
        backbone=r.backbone,
        backbone_options=format_options(config.get("backbone_options") or {}),
        transform=r.transform,
        objective=r.objective,
        training=r.training,
        prediction=r.prediction,
        runs=r.runs,
        seeds=r.seed_values,
        published_accuracy=p.accuracy,
        published_ci95=p.ci95,
        published_rounding=p.rounding,
        published_digits=p.digits,
        accuracy=r.accuracy,
        ci95=ours_ci,
        seed_std=r.seed_std,
        difference=v.difference,
        difference_ci95=v.ci95,
        difference_ci_from=v.ci_from,
        verdict=v.verdict,
        verdict_basis=v.basis,
        train_episodes=episodes,
        meta_batch=batch,
        train_steps=steps,
        episodes_seen=seen,
        published_train_episodes=p.train_episodes,
        budget_ratio=seen / p.train_episodes if seen and p.train_episodes else None,
        best_val_episodes=r.best_val_episodes,
        best_at_end=r.best_at_end,
        test_episodes=r.test_episodes,
        published_test_episodes=p.test_episodes,
        test_queries=r.test_queries,
        published_test_queries=p.test_queries,
        source=p.citation(),
        published_protocol=p.protocol(),
        config_id=r.config_id,
    )


def _fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: float | None, sign: bool = False, digits: int = 2) -> str:
    text = _fmt(value, digits, sign=sign)
    return f"{text} ± {_fmt(ci, digits)}" if ci is not None else f"{text} (no CI)"


def _count(value: int | None) -> str:
    return f"{value:,}" if value else "?"


def _best_text(r: ReproductionRow) -> str:
    """Where the tested checkpoint came from, e.g. ``; best val. at 8,000 (the last check)``."""
    if not r.best_val_episodes:
        return ""
    at = ", ".join(_count(int(e)) for e in r.best_val_episodes.split())
    return f"; best val. at {at}" + (" (the last check)" if r.best_at_end else "")


def summary(rep: Reproduction) -> str:
    """One sentence: how many settings were compared and the verdicts."""
    if not rep.rows:
        return "No measured row matches a published row (same method, backbone and options, dataset, ways, shots)."
    c = rep.counts()
    return (
        f"{len(rep.rows)} measured row(s) compared with a published row: {c[REPRODUCED]} reproduced, "
        f"{c[ABOVE]} above, {c[BELOW]} below."
    )


def render_markdown(
    rep: Reproduction, runs_dir: Path, table: Callable[[Sequence[str], Iterable[Sequence[str]]], str]
) -> str:
    """``reproduction.md``: the rule, the table of verdicts, the rows not compared and the plot; all but the plot
    between the markers of section ``DOCS_SECTION``, which the documentation site includes (pymdownx.snippets,
    ``--8<-- "reproduction.md:table"``; the markers are HTML comments, unseen where the file is read as Markdown).
    ``table(header, lines)`` renders a Markdown table (the leaderboard's own helper)."""
    lines = [
        [
            r.dataset,
            str(r.ways),
            str(r.shots),
            r.method,
            r.backbone + (f" ({r.backbone_options})" if r.backbone_options else ""),
            f"{r.training}: {kind_label(r.prediction)}",
            _with_ci(r.published_accuracy, r.published_ci95, digits=r.published_digits),  # as the source printed
            _with_ci(r.accuracy, r.ci95) + (f" ({r.runs} runs)" if (r.runs or 0) > 1 else ""),
            _with_ci(r.difference, r.difference_ci95, sign=True),
            r.difference_ci_from,
            f"**{r.verdict}**" + (f" ({r.verdict_basis})" if r.verdict_basis else ""),
            f"{_count(r.episodes_seen)} / {_count(r.published_train_episodes)}{_best_text(r)}",
            f"{_count(r.test_episodes)} / {_count(r.published_test_episodes)}",
            r.source,
        ]
        for r in rep.rows
    ]
    parts = [
        f"<!-- --8<-- [start:{DOCS_SECTION}] -->",
        "# Reproduction",
        "",
        f"Built {now_iso()} from the runs under `{runs_dir}`. {summary(rep)}",
        "",
        "Each measured setting (its headline prediction: SLA+AG for SLA runs) beside the published number of the "
        "same method, backbone with the same options, dataset, ways and shots. Accuracies are test accuracies "
        "in %, ± the 95% interval over test episodes (several seeds: the mean accuracy and the mean per-run "
        "interval; the spread across seeds is in `reproduction.csv`, not in the interval). The difference is "
        "ours - published; its 95% interval is sqrt(ci_ours² + ci_published²) when the source publishes an "
        "interval, and ours alone otherwise (column *CI from*). Verdict: **reproduced** when the published value "
        "lies within our 95% interval or the interval of the difference contains 0, or does once widened by the "
        "published value's rounding (half a unit of its last printed digit: a printed 98.8 is any value from 98.75 "
        "to 98.85; the verdict says when that decided it), else **above** or **below**. Only `baseline` rows are "
        "reproductions of the published method; other objectives (e.g. SLA) "
        "are shown against the same published baseline. Episodes seen = optimizer steps x meta-batch (the run's "
        "resolved configuration) against the published training episodes; `?` where unknown; *best val.*: the "
        "episodes seen at the best validation check, whose checkpoint is tested, and *the last check* where that "
        "was the run's final one, i.e. validation accuracy was still rising when the budget ran out. The published "
        "numbers keep their own protocol (test episodes and queries, image size, training details): see "
        "`reproduction.csv` (`published_protocol`).",
        "",
        table(
            [
                "dataset",
                "ways",
                "shots",
                "method",
                "backbone",
                "training: prediction",
                "published % ±95% CI",
                "ours % ±95% CI",
                "ours - published ±95% CI",
                "CI from",
                "verdict",
                "episodes seen (ours / published)",
                "test episodes (ours / published)",
                "source",
            ],
            lines,
        )
        if lines
        else "No measured row has a published counterpart.",
        "",
    ]
    if rep.unmatched:
        parts += ["## Not compared", ""]
        parts += [
            f"- {r.dataset} {r.ways}-way {r.shots}-shot, {r.method} / {r.backbone}, {r.training}: {why}"
            for r, why in rep.unmatched
        ]
        parts.append("")
    parts += [f"<!-- --8<-- [end:{DOCS_SECTION}] -->", "## Plot", "", "![reproduction](reproduction.png)", ""]
    return "\n".join(parts)


def _wrapped(label: str) -> str:
    """A row's label on lines of about ``LABEL_WIDTH`` characters, words (``key=value`` tags) kept whole."""
    return fill(label, LABEL_WIDTH, break_long_words=False)


def _row_label(r: ReproductionRow) -> str:
    """A plot row's label: method and backbone, the wrapped training tags and prediction, the source cited."""
    training = _wrapped(f"{r.training}: {kind_label(r.prediction)}")
    return f"{r.method} / {r.backbone}\n{training}\nvs {r.source.split(',')[0]}"


def _lines(label: str) -> int:
    return label.count("\n") + 1


def plot(rep: Reproduction, path: Path, save: Callable[[Any, Path], None]) -> None:
    """``reproduction.png``: per (dataset, ways, shots) panel, one row per compared setting with the difference
    ours - published and its 95% interval (the table's: both intervals combined, or ours alone), drawn lighter
    where the published value's rounding widens it, coloured by verdict and printed at the row's end. Rows stack
    vertically, so a label of any length keeps its own lines; a panel whose intervals reach beyond
    ``LINEAR_SPAN`` points is drawn on a symmetric-log axis, linear within +-1 point (its label says so), so a
    miss of tens of points and a tenth of a point are both readable. ``save(fig, path)`` is the leaderboard's."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    panels = sorted({(r.dataset, r.ways, r.shots) for r in rep.rows})
    rows = {p: [r for r in rep.rows if (r.dataset, r.ways, r.shots) == p] for p in panels}
    labels = {p: [_row_label(r) for r in rows[p]] for p in panels}
    # inches: each label line at 7 points, a gap between rows, and a panel's title and x axis
    heights = [0.13 * sum(_lines(t) + 1 for t in labels[p]) + 1.1 for p in panels] or [2.0]
    fig = Figure(figsize=(9.0, sum(heights)))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    colours = {REPRODUCED: "C2", ABOVE: "C0", BELOW: "C3"}
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[i])
        here = rows[panel]
        # row centres spaced by their labels' lines, so multi-line labels never overlap their neighbours
        spans = [_lines(t) + 1 for t in labels[panel]]
        y = np.cumsum(spans) - np.asarray(spans) / 2
        for yi, r in zip(y, here):
            colour = colours[r.verdict]
            if r.published_rounding > 0:
                reach = r.difference_ci95 + r.published_rounding
                ax.hlines(yi, r.difference - reach, r.difference + reach, color=colour, alpha=0.3, linewidth=5)
            ax.errorbar(r.difference, yi, xerr=r.difference_ci95, fmt="o", color=colour, capsize=3, markersize=4)
            ax.annotate(
                f"{r.verdict} {_with_ci(r.difference, r.difference_ci95, sign=True)}",
                (1.01, yi),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=7,
                color=colour,
            )
        ax.axvline(0.0, color="black", linewidth=0.8)
        ends = [r.difference + s * (r.difference_ci95 + r.published_rounding) for r in here for s in (-1, 1)]
        low, high = min([0.0, *ends]), max([0.0, *ends])
        xlabel = "ours - published (percentage points)"
        # room beyond the outermost interval ends and around 0: at least half a point, a tenth of the reach on a
        # linear axis and half of it on a logarithmic one
        room = 0.1
        if max(-low, high) > LINEAR_SPAN:
            ax.set_xscale("symlog", linthresh=1.0, linscale=2.0)
            xlabel += "; linear within +-1, logarithmic beyond"
            room = 0.5
        left, right = low - max(0.5, room * -low), high + max(0.5, room * high)
        ax.set_xlim(left, right)
        if ax.get_xscale() == "symlog":  # plain numbers at 1-3-10 steps (matplotlib's are powers of ten only)
            steps = [0.0, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0]
            ax.set_xticks([t for m in steps for t in {m, -m} if left <= t <= right])
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_yticks(y, labels[panel], fontsize=7)
        ax.set_ylim(float(sum(spans)), 0.0)
        ax.set(xlabel=xlabel, title=f"{panel[0]}, {panel[1]}-way {panel[2]}-shot: ours vs published")
    if panels:
        marks = [Line2D([], [], marker="o", color=colours[v], linestyle="", label=v) for v in colours]
        marks.append(Line2D([], [], color="grey", alpha=0.3, linewidth=5, label="widened by the published rounding"))
        fig.legend(handles=marks, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(marks))
    else:
        ax = fig.add_subplot(grid[0])
        ax.text(0.5, 0.5, "no measured row matches a published row", ha="center", va="center")
        ax.set_axis_off()
    save(fig, path)
