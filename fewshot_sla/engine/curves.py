"""The learning-curve plot of a run: training loss and accuracy (smoothed) and validation accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_sla.atomic import atomic_path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve keeps every point."""
    if len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_learning_curve(metrics_file: Path, out_png: Path) -> None:
    """Draw ``metrics.jsonl`` into a two-panel PNG (loss; training and validation accuracy), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        (train if record.get("kind") == "train" else val).append(record)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        episodes = np.array([r["episodes"] for r in train], dtype=np.float64)
        window = max(1, len(train) // 50)
        ax_loss.plot(episodes, _smooth(np.array([r["loss"] for r in train], dtype=np.float64), window))
        if all("acc" in r for r in train):
            acc = 100 * _smooth(np.array([r["acc"] for r in train], dtype=np.float64), window)
            ax_acc.plot(episodes, acc, label="train (episode labels of the objective)")
    for kind in sorted({k for r in val for k in r["accuracy"]}):
        points = [(r["episodes"], r["accuracy"][kind]) for r in val if kind in r["accuracy"]]
        ax_acc.plot(*zip(*points), marker="o", label=f"validation {kind}")
    ax_loss.set(xlabel="training episodes", ylabel="loss", title="training loss (smoothed)")
    ax_acc.set(xlabel="training episodes", ylabel="accuracy (%)", title="accuracy")
    if ax_acc.lines:
        ax_acc.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
