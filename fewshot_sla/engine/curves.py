"""The learning-curve plot of a run: training loss (log scale), training accuracy on the labels the loss is over
(N*M joint labels under SLA), and validation accuracy with its 95% intervals, each on its own axes.

The accuracy panels do not zoom in on their data: each shows chance (100 / the labels it is over) as a dashed line,
and its axis runs from just below chance (lower only when a value is below it) to 100, so that a change of a point or
two looks its size. Validation points carry the 95% interval over validation episodes that ``metrics.jsonl`` records
(``ci95``); records written before it was recorded plot without bars."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot_sla.atomic import atomic_path
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.engine.build import validation_spec
from fewshot_sla.prediction_kinds import kind_label
from fewshot_sla.registry import OBJECTIVES
from fewshot_sla.results import INCOMPLETE_RUN, RunPaths

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AXIS_STEP = 5.0  # the lower end of an accuracy axis is a multiple of this many points


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve keeps every point."""
    if len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    means: np.ndarray = (cumsum[idx] - cumsum[lo]) / (idx - lo)
    return means


def _training_label_count(cfg: RunConfig) -> tuple[int, int]:
    """(ways of the training episodes, labels the learner is trained on: N, or N*M joint labels under SLA)."""
    ways = cfg.train_ways or cfg.ways
    # Only the label count is read: any valid feature size builds the objective.
    labels = OBJECTIVES.create(cfg.objective, transform=cfg.transform, feature_dim=1).learner_ways(ways)
    return ways, int(labels)


def training_labels(cfg: RunConfig) -> str:
    """What a run's training accuracy counts: ``5-way`` when the learner is trained on the episode's own labels,
    ``5*4 = 20 joint labels`` when the objective hands it N*M joint labels (SLA)."""
    ways, labels = _training_label_count(cfg)
    return f"{ways}-way" if labels == ways else f"{ways}*{labels // ways} = {labels} joint labels"


def accuracy_axis(ax: Axes, chance: float, lowest: Sequence[float] = ()) -> None:
    """An accuracy axis (percent) that does not exaggerate: a dashed chance line, and the y axis from below
    chance, or below the lowest value (an interval's lower end) when one is lower, to 100. The lower end is the
    multiple of ``AXIS_STEP`` at least a point below, so that the chance line stays clear of the axis."""
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.4g}%)")
    finite = [v for v in lowest if math.isfinite(v)]
    bottom = max(0.0, math.floor((min([chance, *finite]) - 1.0) / AXIS_STEP) * AXIS_STEP)
    ax.set_ylim(bottom, 100.0)


def _validation_points(val: list[dict[str, Any]], kind: str) -> tuple[list[float], list[float], list[float]]:
    """Episodes, accuracies and 95% half-widths (NaN where a record has none) of one prediction kind."""
    episodes, accuracy, ci95 = [], [], []
    for r in val:
        if kind in r["accuracy"]:
            episodes.append(float(r["episodes"]))
            accuracy.append(float(r["accuracy"][kind]))
            width = (r.get("ci95") or {}).get(kind)
            ci95.append(math.nan if width is None else float(width))
    return episodes, accuracy, ci95


def learning_curve_figure(metrics_file: Path) -> Figure:
    """The three panels of a run's ``metrics.jsonl`` (beside its ``config.yaml``): smoothed training loss on a
    log axis (linear when some loss is not positive), smoothed training accuracy labelled with its label space,
    and validation accuracy per prediction kind (N-way, the validation episodes' ways) with its 95% intervals;
    both accuracy panels with chance and an axis from chance to 100 (``accuracy_axis``)."""
    from matplotlib.figure import Figure

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        (train if record.get("kind") == "train" else val).append(record)
    cfg = load_config(RunPaths(Path(metrics_file).parent).config, INCOMPLETE_RUN)
    fig = Figure(figsize=(14, 3.8))
    ax_loss, ax_train, ax_val = fig.subplots(1, 3)
    train_accuracy: np.ndarray = np.zeros(0)
    if train:
        episodes = np.array([r["episodes"] for r in train], dtype=np.float64)
        window = max(1, len(train) // 50)
        loss = _smooth(np.array([r["loss"] for r in train], dtype=np.float64), window)
        ax_loss.plot(episodes, loss)
        if np.all(loss > 0):
            ax_loss.set_yscale("log")
        if all("acc" in r for r in train):
            train_accuracy = 100 * _smooth(np.array([r["acc"] for r in train], dtype=np.float64), window)
            ax_train.plot(episodes, train_accuracy, label="training accuracy")
    lowest: list[float] = []
    for kind in sorted({k for r in val for k in r["accuracy"]}):
        x, y, ci = _validation_points(val, kind)
        bars = None if all(math.isnan(c) for c in ci) else np.array(ci)
        ax_val.errorbar(x, y, yerr=bars, marker="o", capsize=3, label=kind_label(kind))
        lowest += [a - (0.0 if math.isnan(c) else c) for a, c in zip(y, ci)]
    _, labels = _training_label_count(cfg)
    accuracy_axis(ax_train, 100.0 / labels, train_accuracy.tolist())
    val_ways = validation_spec(cfg).ways
    accuracy_axis(ax_val, 100.0 / val_ways, lowest)
    ax_loss.set(xlabel="training episodes", ylabel="loss", title="training loss (smoothed)")
    ax_train.set(
        xlabel="training episodes", ylabel="accuracy (%)", title=f"training accuracy ({training_labels(cfg)}, smoothed)"
    )
    ax_val.set(
        xlabel="training episodes",
        ylabel="accuracy (%), 95% CI",
        title=f"validation accuracy ({val_ways}-way)",
    )
    ax_train.legend(fontsize=8)
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_learning_curve(metrics_file: Path, out_png: Path) -> None:
    """Draw ``learning_curve_figure(metrics_file)`` into a PNG, written atomically."""
    fig = learning_curve_figure(metrics_file)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
