"""The small end-of-run table ``run`` and ``eval`` print: an evaluation's accuracies with their 95% CIs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_sla.prediction_kinds import kind_label

if TYPE_CHECKING:
    from fewshot_sla.results import EvaluationRecord, ResultsFile


def format_results(run: ResultsFile, run_dir: Path, block: EvaluationRecord | None = None) -> str:
    """The small end-of-run table of an evaluation block (default: the main one): accuracy with 95% CIs per
    prediction kind (none for a single episode), plus context lines."""
    ev, train = block or run.evaluation, run.train
    s = ev.episode_set
    lines = [
        f"{run.method} / {run.backbone} on {run.dataset}: {s.ways}-way {s.shots}-shot, "
        f"transform {run.transform}, objective {run.objective}, seed {run.seed}",
    ]
    rate = train.episodes_per_s
    unit = "images" if train.shots == 0 else "episodes"  # the pretraining regime's "episode" is one image
    lines.append(
        f"trained {train.episodes} {unit} in {train.time_s:.1f} s"
        + (f" ({rate:.1f} {unit}/s)" if rate else "")
        + f", best validation at {unit[:-1]} {train.best_episodes}"
    )
    target = f" of {s.dataset}" if s.dataset != run.dataset else ""
    lines.append(
        f"tested on {ev.episodes} episodes{target} ({s.file}, hash {s.hash[:12]}"
        f"{', cached embeddings' if ev.cached else ''}) in {ev.time_s:.1f} s"
    )

    def interval(half_width: float | None) -> str:
        return "-" if half_width is None else "+- " + format(half_width, ".2f")

    lines.append(f"  {'prediction':<11} {'accuracy':>9}  {'95% CI':>8}  {'95% CI (t)':>10}")
    for kind, acc in ev.accuracy.items():
        lines.append(f"  {kind_label(kind):<11} {acc.mean:8.2f}%  {interval(acc.ci95):>8}  {interval(acc.ci95_t):>10}")
    lines.append(f"  {'chance':<11} {100.0 / s.ways:8.2f}%")
    lines.append(f"results: {run_dir / 'results.json'}")
    return "\n".join(lines)
