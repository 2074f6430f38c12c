"""The learning-curve plot of a run: training loss (log scale), training accuracy on the labels the loss is over
(N*M joint labels under SLA), and N-way validation accuracy, each on its own axes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot_sla.atomic import atomic_path
from fewshot_sla.config import RunConfig, load_config
from fewshot_sla.prediction_kinds import kind_label
from fewshot_sla.registry import OBJECTIVES
from fewshot_sla.results import INCOMPLETE_RUN, RunPaths

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve keeps every point."""
    if len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def training_labels(cfg: RunConfig) -> str:
    """What a run's training accuracy counts: ``5-way`` when the learner is trained on the episode's own labels,
    ``5*4 = 20 joint labels`` when the objective hands it N*M joint labels (SLA)."""
    ways = cfg.train_ways or cfg.ways
    # Only the label count is read: any valid feature size builds the objective.
    labels = OBJECTIVES.create(cfg.objective, transform=cfg.transform, feature_dim=1).learner_ways(ways)
    return f"{ways}-way" if labels == ways else f"{ways}*{labels // ways} = {labels} joint labels"


def learning_curve_figure(metrics_file: Path) -> Figure:
    """The three panels of a run's ``metrics.jsonl`` (beside its ``config.yaml``): smoothed training loss on a
    log axis (linear when some loss is not positive), smoothed training accuracy labelled with its label space,
    and validation accuracy per prediction kind (N-way)."""
    from matplotlib.figure import Figure

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        (train if record.get("kind") == "train" else val).append(record)
    cfg = load_config(RunPaths(Path(metrics_file).parent).config, INCOMPLETE_RUN)
    fig = Figure(figsize=(14, 3.8))
    ax_loss, ax_train, ax_val = fig.subplots(1, 3)
    if train:
        episodes = np.array([r["episodes"] for r in train], dtype=np.float64)
        window = max(1, len(train) // 50)
        loss = _smooth(np.array([r["loss"] for r in train], dtype=np.float64), window)
        ax_loss.plot(episodes, loss)
        if np.all(loss > 0):
            ax_loss.set_yscale("log")
        if all("acc" in r for r in train):
            ax_train.plot(episodes, 100 * _smooth(np.array([r["acc"] for r in train], dtype=np.float64), window))
    for kind in sorted({k for r in val for k in r["accuracy"]}):
        points = [(r["episodes"], r["accuracy"][kind]) for r in val if kind in r["accuracy"]]
        ax_val.plot(*zip(*points), marker="o", label=kind_label(kind))
    ax_loss.set(xlabel="training episodes", ylabel="loss", title="training loss (smoothed)")
    ax_train.set(
        xlabel="training episodes", ylabel="accuracy (%)", title=f"training accuracy ({training_labels(cfg)}, smoothed)"
    )
    ax_val.set(xlabel="training episodes", ylabel="accuracy (%)", title=f"validation accuracy ({cfg.ways}-way)")
    if ax_val.lines:
        ax_val.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_learning_curve(metrics_file: Path, out_png: Path) -> None:
    """Draw ``learning_curve_figure(metrics_file)`` into a PNG, written atomically."""
    fig = learning_curve_figure(metrics_file)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
