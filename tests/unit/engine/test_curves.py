"""The learning-curve plot: loss on a log axis, training accuracy labelled with its label space (N*M joint labels
under SLA), N-way validation accuracy with its 95% intervals on its own axes, chance on both accuracy panels and
axes that run from chance to 100; read back from the figure's axes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes

from fewshot_sla.config import RunConfig
from fewshot_sla.engine.curves import learning_curve_figure, plot_learning_curve


def run_folder(
    tmp_path: Path,
    losses: list[float],
    ci95: list[dict[str, float | None]] | None = None,
    accuracy: list[dict[str, float]] | None = None,
    **config: object,
) -> Path:
    """A run folder holding ``config.yaml`` and a ``metrics.jsonl`` of these training losses, validated twice
    (``accuracy`` and ``ci95`` per validation; without ``ci95`` the records are as written before it was recorded)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(RunConfig(**config).to_yaml())
    records: list[dict[str, object]] = [
        {"kind": "train", "step": i + 1, "episodes": i + 1, "loss": loss, "acc": 0.1 * (i + 1)}
        for i, loss in enumerate(losses)
    ]
    accuracy = accuracy or [{"si": 30.0, "ag": 40.0}, {"si": 35.0, "ag": 45.0}]
    val = [{"kind": "val", "step": s, "episodes": s, "accuracy": a, "key": "ag"} for s, a in zip((2, 4), accuracy)]
    for record, widths in zip(val, ci95 or []):
        record["ci95"] = widths
    records.insert(2, val[0])
    records.append(val[1])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "metrics.jsonl"


def validation_series(ax: Axes) -> dict[str, tuple[list[float], list[float], list[float] | None]]:
    """Each error-bar series of a panel by its legend label: x, y and the half-widths of its bars (None: no bars)."""
    series = {}
    for container in ax.containers:
        line, _, bars = container.lines
        widths = None
        if container.has_yerr:
            # a point without an interval (NaN) has no bar
            widths = [float(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments() if len(seg)]
        series[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), widths)
    return series


def chance_lines(ax: Axes) -> list[float]:
    """The y of every horizontal line labelled as chance."""
    return [float(line.get_ydata()[0]) for line in ax.lines if line.get_label().startswith("chance")]


def test_sla_curves_log_loss_joint_label_training_accuracy_and_n_way_validation(tmp_path: Path) -> None:
    metrics = run_folder(tmp_path, [3.0, 2.0, 1.0, 0.5], objective="sla", transform="rotation", ways=5, train_ways=5)
    loss, train, val = learning_curve_figure(metrics).axes
    assert loss.get_yscale() == "log"
    assert list(loss.lines[0].get_ydata()) == [3.0, 2.0, 1.0, 0.5]  # four records: no smoothing
    assert "5*4 = 20 joint labels" in train.get_title()
    np.testing.assert_allclose(train.lines[0].get_ydata(), [10.0, 20.0, 30.0, 40.0])
    assert val.get_title() == "validation accuracy (5-way)" and "joint" not in val.get_title()
    assert [t.get_text() for t in val.get_legend().get_texts()] == ["chance (20%)", "SLA+AG", "SLA+SI"]
    series = validation_series(val)
    assert [series[k][1] for k in ("SLA+AG", "SLA+SI")] == [[40.0, 45.0], [30.0, 35.0]]
    png = tmp_path / "learning_curve.png"
    plot_learning_curve(metrics, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("config", "labels"),
    [
        ({"objective": "baseline", "transform": "none", "ways": 5, "train_ways": 10}, "10-way"),
        ({"objective": "sla+sd", "transform": "rotation2", "ways": 5, "train_ways": 3}, "3*2 = 6 joint labels"),
    ],
)
def test_training_accuracy_names_the_labels_the_objective_trains_on(
    tmp_path: Path, config: dict[str, object], labels: str
) -> None:
    _, train, _ = learning_curve_figure(run_folder(tmp_path, [1.0, 0.5, 0.4, 0.3], **config)).axes
    assert train.get_title() == f"training accuracy ({labels}, smoothed)"


def test_a_loss_that_is_not_positive_keeps_a_linear_axis(tmp_path: Path) -> None:
    """A plug-in objective's loss may reach zero or below, which a log axis cannot show."""
    loss, _, _ = learning_curve_figure(run_folder(tmp_path, [1.0, 0.0, -0.5, -1.0], objective="sla")).axes
    assert loss.get_yscale() == "linear"


def test_validation_points_carry_their_recorded_95_percent_intervals(tmp_path: Path) -> None:
    ci95 = [{"si": 2.5, "ag": 1.5}, {"si": 2.0, "ag": None}]  # None: a single validation episode
    _, _, val = learning_curve_figure(run_folder(tmp_path, [1.0, 0.5, 0.4, 0.3], ci95=ci95, objective="sla")).axes
    series = validation_series(val)
    np.testing.assert_allclose(series["SLA+SI"][2], [2.5, 2.0])
    (bar,) = series["SLA+AG"][2]  # the point without an interval has no bar
    assert bar == pytest.approx(1.5)
    assert "95% CI" in val.get_ylabel()


def test_records_from_before_the_interval_was_recorded_still_plot_without_bars(tmp_path: Path) -> None:
    metrics = run_folder(tmp_path, [1.0, 0.5, 0.4, 0.3], objective="sla")
    _, _, val = learning_curve_figure(metrics).axes
    series = validation_series(val)
    assert series["SLA+AG"] == ([2.0, 4.0], [40.0, 45.0], None)
    png = tmp_path / "learning_curve.png"
    plot_learning_curve(metrics, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_axes_show_chance_and_run_from_chance_to_100(tmp_path: Path) -> None:
    """A two-point change of validation accuracy must not fill the panel: the axis spans chance to 100."""
    accuracy = [{"si": 61.0, "ag": 62.0}, {"si": 62.0, "ag": 64.0}]
    metrics = run_folder(tmp_path, [1.0, 0.5, 0.4, 0.3], accuracy=accuracy, objective="sla", transform="rotation")
    _, train, val = learning_curve_figure(metrics).axes
    assert chance_lines(val) == [20.0] and val.get_ylim() == (15.0, 100.0)  # chance clear of the axis
    # training accuracy over 5*4 = 20 joint labels: chance 5%, and the 10-40% values are above it
    assert chance_lines(train) == [5.0] and train.get_ylim() == (0.0, 100.0)


def test_values_below_chance_stay_inside_the_axis(tmp_path: Path) -> None:
    accuracy = [{"plain": 17.0}, {"plain": 24.0}]
    metrics = run_folder(
        tmp_path, [1.0, 0.5, 0.4, 0.3], accuracy=accuracy, ci95=[{"plain": 2.0}, {"plain": 1.0}], objective="baseline"
    )
    _, _, val = learning_curve_figure(metrics).axes
    assert val.get_ylim() == (10.0, 100.0)  # below 17 - 2: the multiple of 5 at least a point below


def test_validation_with_other_ways_than_the_test_is_titled_and_judged_by_its_own_chance(tmp_path: Path) -> None:
    metrics = run_folder(tmp_path, [1.0, 0.5, 0.4, 0.3], objective="sla", ways=20, val_ways=5)
    _, _, val = learning_curve_figure(metrics).axes
    assert val.get_title() == "validation accuracy (5-way)" and chance_lines(val) == [20.0]
