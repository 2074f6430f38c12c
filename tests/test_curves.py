"""The learning-curve plot: loss on a log axis, training accuracy labelled with its label space (N*M joint labels
under SLA), N-way validation accuracy on its own axes; read back from the figure's axes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewshot_sla.config import RunConfig
from fewshot_sla.engine.curves import learning_curve_figure, plot_learning_curve


def run_folder(tmp_path: Path, losses: list[float], **config: object) -> Path:
    """A run folder holding ``config.yaml`` and a ``metrics.jsonl`` of these training losses, validated twice."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(RunConfig(**config).to_yaml())
    records = [
        {"kind": "train", "step": i + 1, "episodes": i + 1, "loss": loss, "acc": 0.1 * (i + 1)}
        for i, loss in enumerate(losses)
    ]
    records.insert(2, {"kind": "val", "step": 2, "episodes": 2, "accuracy": {"si": 30.0, "ag": 40.0}, "key": "ag"})
    records.append({"kind": "val", "step": 4, "episodes": 4, "accuracy": {"si": 35.0, "ag": 45.0}, "key": "ag"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path / "metrics.jsonl"


def test_sla_curves_log_loss_joint_label_training_accuracy_and_n_way_validation(tmp_path: Path) -> None:
    metrics = run_folder(tmp_path, [3.0, 2.0, 1.0, 0.5], objective="sla", transform="rotation", ways=5, train_ways=5)
    loss, train, val = learning_curve_figure(metrics).axes
    assert loss.get_yscale() == "log"
    assert list(loss.lines[0].get_ydata()) == [3.0, 2.0, 1.0, 0.5]  # four records: no smoothing
    assert "5*4 = 20 joint labels" in train.get_title()
    np.testing.assert_allclose(train.lines[0].get_ydata(), [10.0, 20.0, 30.0, 40.0])
    assert val.get_title() == "validation accuracy (5-way)" and "joint" not in val.get_title()
    assert [t.get_text() for t in val.get_legend().get_texts()] == ["SLA+AG", "SLA+SI"]
    assert [list(line.get_ydata()) for line in val.lines] == [[40.0, 45.0], [30.0, 35.0]]
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
