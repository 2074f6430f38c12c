"""Leaderboard build on hand-made results.json files: rows, seeds, paired differences, refusals, published rows,
evaluations on other episode sets in their own tables, and the transformation label of objectives that use none."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.errors import UserError
from fewshot_sla.leaderboard.build import build_leaderboard
from fewshot_sla.leaderboard.published import DEFAULT_PUBLISHED, PublishedResult, load_published
from fewshot_sla.results import (
    EvaluationRecord,
    RunPaths,
    add_evaluation,
    load_results,
    save_per_episode,
    write_results,
)
from tests.helpers.paths import REPO

SHARED = REPO.parent / "shared"
SET_A = "a" * 64
SET_B = "b" * 64
DATA_1 = "1" * 64
DATA_2 = "2" * 64


def _summary(values: np.ndarray) -> dict[str, float]:
    """Mean and 95% half-width in percent, written directly with numpy (independent of the engine)."""
    n = len(values)
    std = float(np.std(values, ddof=1))
    return {
        "mean": 100 * float(np.mean(values)),
        "std": 100 * std,
        "ci95": 100 * 1.96 * std / math.sqrt(n),
        "ci95_t": 100 * 2.0 * std / math.sqrt(n),
        "n": n,
    }


def make_run(
    root: Path,
    name: str,
    *,
    objective: str,
    seed: int = 0,
    per_episode: dict[str, np.ndarray],
    episode_set: str = SET_A,
    fingerprint: str = DATA_1,
    method: str = "protonet",
    dataset: str = "miniimagenet",
    shots: int = 1,
    transform: str | None = None,
    recorded_transform: str | None = None,
    missing_keys: tuple[str, ...] = (),
    best_step: int = 100,
    **config: object,
) -> Path:
    """A finished run folder written through the results module's own writers. ``transform`` (default: ``none``
    for a baseline, else ``rotation``) is the configured one and ``recorded_transform`` (default: the same) what
    results.json records; ``missing_keys`` are configuration keys left out, as in runs older than those keys;
    ``best_step`` is the best validation check's step of the run's 100."""
    transform = transform or ("none" if objective == "baseline" else "rotation")
    cfg = RunConfig(
        method=method,
        dataset=dataset,
        backbone="conv4",
        transform=transform,
        objective=objective,
        shots=shots,
        seed=seed,
        train_episodes=100,
        **config,
    )  # type: ignore[arg-type]
    run_dir = root / name
    block = _evaluation(run_dir, per_episode, episode_set, fingerprint, dataset, shots)
    train = dict(ways=5, shots=shots, queries=15, episodes=100, meta_batch=1, steps=100, time_s=1.0)
    train.update(episodes_per_s=100.0, best_step=best_step, best_episodes=best_step, best_val_accuracy=50.0)
    train.update(val_episodes=10)
    write_results(
        run_dir,
        {
            "status": "finished",
            "method": method,
            "backbone": "conv4",
            "dataset": dataset,
            "dataset_fingerprint": fingerprint,
            "transform": recorded_transform or transform,
            "objective": objective,
            "seed": seed,
            "ways": 5,
            "shots": shots,
            "queries": 15,
            "train": {**train, "val_key": block["headline"]},
            "device": "cpu",
            "amp": False,
            "versions": {"python": "3", "torch": "2", "numpy": "2", "fewshot_sla": "0"},
            "git_commit": None,
            "created": "2026-01-01T00:00:00+00:00",
            "config": {k: v for k, v in cfg.to_dict().items() if k not in missing_keys},
            "evaluation": block,
            "evaluations": [block],
        },
    )
    return run_dir


def _evaluation(
    run_dir: Path,
    per_episode: dict[str, np.ndarray],
    episode_set: str,
    fingerprint: str,
    dataset: str,
    shots: int,
    ways: int = 5,
) -> dict[str, object]:
    """An evaluation block of these per-episode accuracies, its per-episode file written."""
    paths = RunPaths(run_dir)
    save_per_episode(paths.per_episode(episode_set), per_episode, episode_set, fingerprint)
    n = len(next(iter(per_episode.values())))
    return {
        "episode_set": {
            "hash": episode_set,
            "file": "x.npz",
            "dataset": dataset,
            "split": "test",
            "ways": ways,
            "shots": shots,
            "queries": 15,
            "count": n,
            "seed": 0,
        },
        "episodes": n,
        "checkpoint": "best",
        "cached": True,
        "time_s": 1.0,
        "episodes_per_s": float(n),
        "accuracy": {kind: _summary(v) for kind, v in per_episode.items()},
        "headline": "ag" if "ag" in per_episode else "plain",
        "per_episode_file": str(paths.per_episode(episode_set).relative_to(run_dir)),
        "best_step": 100,
        "device": "cpu",
        "dataset_fingerprint": fingerprint,
    }


def add_eval(
    run_dir: Path,
    per_episode: dict[str, np.ndarray],
    episode_set: str,
    *,
    fingerprint: str = DATA_1,
    dataset: str = "miniimagenet",
    ways: int = 5,
) -> None:
    """Another evaluation of a finished run, added to its results.json as ``fewshot-sla eval`` adds one."""
    data = load_results(run_dir).data
    block = _evaluation(run_dir, per_episode, episode_set, fingerprint, dataset, data["shots"], ways)
    record = EvaluationRecord.model_validate(block)
    write_results(run_dir, {k: v for k, v in add_evaluation(data, record).items() if k != "schema_version"})


def _episodes(seed: int, n: int = 40, p: float = 0.5) -> np.ndarray:
    """Per-episode accuracies (multiples of 1/75, as with 5-way 15-query episodes)."""
    rng = np.random.default_rng(seed)
    return rng.binomial(75, p, size=n) / 75.0


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_accuracy_rows_and_paired_difference_match_numpy(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base, si, ag = _episodes(1), _episodes(2, p=0.55), _episodes(3, p=0.6)
    make_run(runs, "base", objective="baseline", per_episode={"plain": base})
    make_run(runs, "sla", objective="sla", per_episode={"si": si, "ag": ag})
    report = build_leaderboard(runs, tmp_path / "out")
    assert report.runs == 2 and report.paired_rows == 1
    acc = {(r["objective"], r["prediction"]): r for r in _rows(tmp_path / "out" / "leaderboard.csv")}
    assert set(acc) == {("baseline", "plain"), ("sla", "si"), ("sla", "ag")}
    assert float(acc[("sla", "ag")]["accuracy"]) == pytest.approx(100 * ag.mean())
    assert float(acc[("baseline", "plain")]["ci95"]) == pytest.approx(100 * 1.96 * base.std(ddof=1) / math.sqrt(40))
    assert acc[("sla", "ag")]["seed_std"] == "" and acc[("sla", "ag")]["runs"] == "1"
    assert acc[("sla", "ag")]["seeds"] == "1" and acc[("sla", "ag")]["seed_values"] == "0"  # a count, not seed 0
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    d = ag - base  # SLA+AG minus the baseline, episode by episode
    assert float(pair["difference"]) == pytest.approx(100 * d.mean())
    assert float(pair["ci95"]) == pytest.approx(100 * 1.959964 * d.std(ddof=1) / math.sqrt(len(d)), rel=1e-5)
    assert pair["comparison"] == "SLA+AG - baseline" and pair["note"] == ""
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert f"{100 * d.mean():+.2f}" in md
    for name in ("accuracy.png", "paired_difference.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [
            "leaderboard.md",
            "leaderboard.csv",
            "paired_differences.csv",
            "other_evaluations.csv",
            "accuracy.png",
            "paired_difference.png",
            "reproduction.md",
            "reproduction.csv",
            "reproduction.png",
        ]
    )


def test_seeds_are_summarised_as_mean_and_std_beside_the_episode_interval(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    pairs = []
    for seed in (0, 1, 2):
        base, ag = _episodes(10 + seed), _episodes(20 + seed, p=0.6)
        make_run(runs, f"base{seed}", objective="baseline", seed=seed, per_episode={"plain": base})
        make_run(runs, f"sla{seed}", objective="sla", seed=seed, per_episode={"ag": ag, "si": ag})
        pairs.append((base, ag))
    build_leaderboard(runs, tmp_path / "out")
    rows = {r["objective"]: r for r in _rows(tmp_path / "out" / "leaderboard.csv") if r["prediction"] != "si"}
    means = [100 * b.mean() for b, _ in pairs]
    assert rows["baseline"]["runs"] == "3" and rows["baseline"]["seeds"] == "3"
    assert rows["baseline"]["seed_values"] == "0 1 2"
    assert float(rows["baseline"]["accuracy"]) == pytest.approx(np.mean(means))
    assert float(rows["baseline"]["seed_std"]) == pytest.approx(np.std(means, ddof=1))
    per_run_ci = [100 * 1.96 * b.std(ddof=1) / math.sqrt(40) for b, _ in pairs]
    assert float(rows["baseline"]["ci95"]) == pytest.approx(np.mean(per_run_ci))
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    diffs = [100 * (a - b).mean() for b, a in pairs]
    assert pair["runs"] == "3" and pair["seeds"] == "3" and pair["seed_values"] == "0 1 2"
    assert float(pair["difference"]) == pytest.approx(np.mean(diffs))
    assert float(pair["seed_std"]) == pytest.approx(np.std(diffs, ddof=1))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"episode_set": SET_B}, "episode sets differ"),
        ({"fingerprint": DATA_2}, "dataset stores differ"),
    ],
)
def test_runs_on_other_episodes_or_data_are_never_paired(tmp_path: Path, changes: dict, reason: str) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    make_run(runs, "sla", objective="sla", per_episode={"ag": _episodes(2), "si": _episodes(3)}, **changes)
    build_leaderboard(runs, tmp_path / "out")
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    assert pair["difference"] == "" and pair["ci95"] == ""
    assert reason in pair["note"] and pair["note"].startswith("not compared")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert reason in md
    # The two runs stay separate rows of the accuracy table: never averaged together.
    assert len([r for r in _rows(tmp_path / "out" / "leaderboard.csv") if r["source_type"] == "measured"]) == 3


def test_only_runs_with_the_same_configuration_and_seed_are_paired(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)}, lr=0.01)
    make_run(runs, "sla-other-lr", objective="sla", per_episode={"ag": _episodes(2), "si": _episodes(3)}, lr=0.1)
    make_run(
        runs, "sla-other-seed", objective="sla", seed=1, per_episode={"ag": _episodes(4), "si": _episodes(5)}, lr=0.01
    )
    report = build_leaderboard(runs, tmp_path / "out")
    assert report.paired_rows == 0
    assert "No run has a baseline run to be compared with." in (tmp_path / "out" / "leaderboard.md").read_text()


def test_published_rows_appear_marked_beside_matching_measured_rows(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    published = [
        PublishedResult(
            "protonet",
            "conv4",
            "Conv-4 (64 filters)",
            "miniimagenet",
            5,
            1,
            49.42,
            0.78,
            600,
            None,
            "Snell et al. 2017",
            "arXiv:1703.05175",
            "",
        ),
        PublishedResult(
            "metaoptnet-svm",
            "resnet12",
            "ResNet-12",
            "cifarfs",
            5,
            1,
            72.0,
            0.7,
            1000,
            15,
            "Lee et al. 2019",
            "arXiv:1904.03758",
            "",
        ),
    ]
    build_leaderboard(runs, tmp_path / "out", published)
    rows = _rows(tmp_path / "out" / "leaderboard.csv")
    marked = [r for r in rows if r["source_type"] == "published"]
    assert len(marked) == 1  # CIFAR-FS has no measured row, so its published number is not shown
    assert marked[0]["accuracy"] == "49.42" and marked[0]["source"] == "Snell et al. 2017, arXiv:1703.05175"
    assert "600 test episodes" in marked[0]["protocol"] and "Conv-4 (64 filters)" in marked[0]["protocol"]
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    (line,) = [line for line in md.splitlines() if "49.42" in line]
    assert "**published**: Snell et al. 2017" in line and "600 test episodes" in line
    assert md.index("49.42") < md.index(f"{100 * _episodes(1).mean():.2f}")  # published row first, beside it


def test_shipped_published_table_holds_the_design_table() -> None:
    design = SHARED / "DESIGN.md"
    if not design.is_file():
        pytest.skip(f"{design} is absent (no ../shared beside the repository)")
    if not DEFAULT_PUBLISHED.is_file():
        pytest.fail(f"{DEFAULT_PUBLISHED} is missing")
    names = {
        "ProtoNet": "protonet",
        "MAML": "maml",
        "MetaOptNet-RR": "metaoptnet-ridge",
        "MetaOptNet-SVM": "metaoptnet-svm",
    }
    datasets = {"mini-ImageNet": "miniimagenet", "CIFAR-FS": "cifarfs", "FC100": "fc100"}
    expected = set()
    for line in design.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in names:
            backbone = "resnet12" if cells[1].startswith("ResNet") else "conv4"
            for shots, text in ((1, cells[3]), (5, cells[4])):
                mean, ci = (float(x) for x in re.split(r"\s*\+-\s*", text))
                expected.add((names[cells[0]], backbone, datasets[cells[2]], shots, mean, ci))
    assert len(expected) == 14
    # The table's other rows (Omniglot) are not in the design table.
    design_rows = [p for p in load_published() if p.dataset in datasets.values()]
    got = {(p.method, p.backbone, p.dataset, p.shots, p.accuracy, p.ci95) for p in design_rows}
    assert got == expected
    assert all(p.test_episodes and p.source for p in design_rows)


def test_malformed_published_table_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("method,backbone,dataset,ways,shots,accuracy,ci95,source\nprotonet,conv4,cub,5,1,high,0.5,x\n")
    with pytest.raises(UserError, match=r"p.csv line 2: 'accuracy' must be a number") as info:
        load_published(path)
    assert "\n" not in str(info.value)


def test_broken_runs_are_skipped_and_listed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    report = build_leaderboard(runs, tmp_path / "out")
    assert report.runs == 1 and [p.name for p, _ in report.skipped] == ["broken"]
    assert "## Skipped folders" in (tmp_path / "out" / "leaderboard.md").read_text()


def test_cli_build_writes_outputs_and_refuses_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    assert main(["leaderboard", "build", str(runs), "--out", str(tmp_path / "out"), "--no-published"]) == 0
    assert (tmp_path / "out" / "leaderboard.md").is_file()
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["leaderboard", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished run" in err
    assert not (tmp_path / "out2").exists()


SET_C = "c" * 64


def test_a_run_evaluated_again_is_still_one_row_and_its_other_episode_sets_get_their_own_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fewshot-sla eval` adds evaluations to results.json: the accuracy table, its plot and the paired differences
    keep one row per method (its own test set), and each other episode set is a table of its own."""
    from fewshot_sla.leaderboard import build

    runs = tmp_path / "runs"
    base, ag = _episodes(1), _episodes(2, p=0.6)
    base_b, ag_b, si_b = _episodes(4, n=60), _episodes(5, n=60, p=0.65), _episodes(6, n=60)
    make_run(runs, "base", objective="baseline", per_episode={"plain": base})
    sla = make_run(runs, "sla", objective="sla", per_episode={"ag": ag, "si": _episodes(3)})
    add_eval(sla, {"ag": ag_b, "si": si_b}, SET_B)  # e.g. the 10,000-episode set
    add_eval(runs / "base", {"plain": base_b}, SET_B)
    add_eval(sla, {"ag": _episodes(7), "si": _episodes(8)}, SET_C, fingerprint=DATA_2, dataset="cub")  # cross-domain
    axes = []
    monkeypatch.setattr(build, "_save", lambda fig, path: axes.append((path.name, fig.axes)))
    report = build_leaderboard(runs, tmp_path / "out")
    out = tmp_path / "out"

    measured = [r for r in _rows(out / "leaderboard.csv") if r["source_type"] == "measured"]
    assert sorted((r["objective"], r["prediction"]) for r in measured) == [
        ("baseline", "plain"),
        ("sla", "ag"),
        ("sla", "si"),
    ]
    assert {r["episode_set"] for r in measured} == {SET_A[:12]} and report.accuracy_rows == 3
    (pair,) = _rows(out / "paired_differences.csv")  # no "not compared" row for the other sets
    assert pair["note"] == "" and float(pair["difference"]) == pytest.approx(100 * (ag - base).mean())
    ((_, (panel,)),) = [item for item in axes if item[0] == "accuracy.png"]
    assert len(panel.patches) == 2  # one bar per method: baseline and SLA+AG

    other = _rows(out / "other_evaluations.csv")
    assert report.other_rows == len(other) == 5
    on_b = {(r["objective"], r["prediction"]): r for r in other if r["episode_set"] == SET_B[:12]}
    assert set(on_b) == {("baseline", "plain"), ("sla", "ag"), ("sla", "si")}
    assert float(on_b[("sla", "ag")]["accuracy"]) == pytest.approx(100 * ag_b.mean())
    assert float(on_b[("sla", "ag")]["difference"]) == pytest.approx(100 * (ag_b - base_b).mean())
    assert on_b[("sla", "si")]["difference"] == "" and on_b[("sla", "ag")]["test_episodes"] == "60"
    on_cub = [r for r in other if r["episode_set"] == SET_C[:12]]
    assert {r["dataset"] for r in on_cub} == {"miniimagenet -> cub"} and len(on_cub) == 2
    assert all(r["difference"] == "" for r in on_cub)  # the baseline was not tested there: no pair, no note

    md = (out / "leaderboard.md").read_text()
    accuracy_table = md[md.index("## Accuracy") : md.index("## Paired difference")]
    assert "[set" not in accuracy_table and "not compared" not in md
    assert "### miniimagenet: 5-way 1-shot, 60 episodes, 15 queries/class (episode set bbbbbbbb" in md
    assert "### cub: 5-way 1-shot, 40 episodes" in md
    assert f"{100 * (ag_b - base_b).mean():+.2f}" in md[md.index("## Other episode sets") :]


def test_an_sla_run_is_compared_with_a_baseline_evaluated_on_its_set_later(tmp_path: Path) -> None:
    """The baseline's main set differs, but `eval` gave it the SLA run's set: the main rows are paired there."""
    runs = tmp_path / "runs"
    base_a, ag = _episodes(1), _episodes(2, p=0.6)
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(9)}, episode_set=SET_B)
    add_eval(runs / "base", {"plain": base_a}, SET_A)
    make_run(runs, "sla", objective="sla", per_episode={"ag": ag, "si": _episodes(3)})
    build_leaderboard(runs, tmp_path / "out")
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    assert pair["note"] == "" and float(pair["difference"]) == pytest.approx(100 * (ag - base_a).mean())


def test_a_baseline_reads_as_using_no_transformation_also_from_runs_that_recorded_one(tmp_path: Path) -> None:
    """Runs made before the fix recorded a baseline's configured (unused) transformation, e.g. the default
    rotation: rows show none, and such a baseline is the same setting as one configured with none."""
    runs = tmp_path / "runs"
    make_run(runs, "base0", objective="baseline", transform="rotation", per_episode={"plain": _episodes(1)})
    make_run(runs, "base1", objective="baseline", seed=1, transform="none", per_episode={"plain": _episodes(2)})
    make_run(runs, "sla0", objective="sla", per_episode={"ag": _episodes(3), "si": _episodes(4)})
    build_leaderboard(runs, tmp_path / "out")
    rows = [r for r in _rows(tmp_path / "out" / "leaderboard.csv") if r["objective"] == "baseline"]
    assert [(r["transform"], r["runs"], r["seeds"]) for r in rows] == [("none", "2", "2")]
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    assert pair["note"] == "" and pair["transform"] == "rotation"  # the SLA run's own transformation
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    (line,) = [line for line in md.splitlines() if "| baseline |" in line]
    assert "rotation" not in line and "\\[" not in line  # no tag: one setting


def test_transformation_labels_come_from_the_objective() -> None:
    from fewshot_sla.objectives import BASELINE
    from fewshot_sla.registry import OBJECTIVES
    from fewshot_sla.results import UNTRANSFORMED_OBJECTIVES, transform_label

    assert transform_label("baseline", "rotation") == "none" and transform_label("sla", "rotation") == "rotation"
    assert BASELINE in UNTRANSFORMED_OBJECTIVES
    # What makes the label true: a baseline predicts from the plain images alone whatever its transformation.
    for name in UNTRANSFORMED_OBJECTIVES:
        objective = OBJECTIVES.create(name, transform="rotation", feature_dim=4)
        assert objective.prediction_copies == 1 and not list(objective.parameters())
        assert objective.learner_ways(5) == 5
    assert OBJECTIVES.create("sla", transform="rotation", feature_dim=4).learner_ways(5) == 20


def test_runs_from_before_a_configuration_key_existed_are_the_same_setting(tmp_path: Path) -> None:
    """An older run's config.yaml lacks keys added since (val_ways, val_shots): they count as their defaults,
    so it shares a row with a newer run of the same setting and is paired with it."""
    runs = tmp_path / "runs"
    old = ("val_ways", "val_shots")
    make_run(runs, "base0", objective="baseline", per_episode={"plain": _episodes(1)}, missing_keys=old)
    make_run(runs, "base1", objective="baseline", seed=1, per_episode={"plain": _episodes(2)})
    make_run(runs, "sla0", objective="sla", per_episode={"ag": _episodes(3), "si": _episodes(4)})
    build_leaderboard(runs, tmp_path / "out")
    rows = [r for r in _rows(tmp_path / "out" / "leaderboard.csv") if r["objective"] == "baseline"]
    assert [r["runs"] for r in rows] == ["2"]
    (pair,) = _rows(tmp_path / "out" / "paired_differences.csv")
    assert pair["note"] == ""


def test_settings_of_one_method_read_apart_by_the_configuration_values_that_differ(tmp_path: Path) -> None:
    """Rows of one method, setting and training that differ in configuration name the differing values (an
    option one run does not set reads as its default); seeds of one setting stay one untagged row, and a method
    with a single setting gets no tag."""
    runs = tmp_path / "runs"
    make_run(runs, "plain", objective="baseline", per_episode={"plain": _episodes(1)}, lr=0.001)
    make_run(runs, "plain1", objective="baseline", seed=1, per_episode={"plain": _episodes(2)}, lr=0.001)
    make_run(runs, "lr", objective="baseline", per_episode={"plain": _episodes(3)}, lr=0.01)
    make_run(
        runs,
        "scaled",
        objective="baseline",
        per_episode={"plain": _episodes(4)},
        lr=0.001,
        learner_options={"scale": 100},
    )
    make_run(runs, "other", objective="baseline", method="matchingnet", per_episode={"plain": _episodes(5)})
    build_leaderboard(runs, tmp_path / "out")
    # Markdown shows the brackets escaped (no reference links)
    md = (tmp_path / "out" / "leaderboard.md").read_text().replace("\\[", "[").replace("\\]", "]").splitlines()
    protonet = sorted(line.split("| baseline")[1].split("|")[0].strip() for line in md if "| protonet |" in line)
    assert protonet == [
        "[learner_options.scale=100, lr=0.001]",
        "[learner_options.scale=default, lr=0.001]",
        "[learner_options.scale=default, lr=0.01]",
    ]
    (matchingnet,) = [line for line in md if "| matchingnet |" in line and "measured" in line]
    assert "| baseline |" in matchingnet and "[" not in matchingnet.split("| baseline |")[0]


def test_training_with_random_quarter_turns_is_named_even_in_a_row_of_its_own(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "turned", objective="baseline", per_episode={"plain": _episodes(1)}, augment_rotations=True)
    make_run(runs, "plain", objective="baseline", per_episode={"plain": _episodes(2)})
    make_run(runs, "alone", objective="baseline", method="matchingnet", per_episode={"plain": _episodes(3)},
             augment_rotations=True)  # fmt: skip
    build_leaderboard(runs, tmp_path / "out")
    md = (tmp_path / "out" / "leaderboard.md").read_text().splitlines()
    trainings = sorted(line.split("| conv4 | ")[1].split(" |")[0] for line in md if "| measured;" in line)
    assert trainings == ["baseline", "baseline + random quarter turns", "baseline + random quarter turns"]


def test_runs_on_different_data_read_apart_also_on_their_other_episode_sets(tmp_path: Path) -> None:
    """Two runs of one configuration on two stores (e.g. resized with different filters), each evaluated again on
    another episode set of its own store: both tables tell them apart by their data."""
    runs = tmp_path / "runs"
    for name, data, seed in (("lanczos", DATA_1, 1), ("nearest", DATA_2, 2)):
        run = make_run(runs, name, objective="baseline", fingerprint=data, per_episode={"plain": _episodes(seed)})
        add_eval(run, {"plain": _episodes(seed + 10)}, SET_B, fingerprint=data)
    build_leaderboard(runs, tmp_path / "out")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    for data in (DATA_1, DATA_2):
        assert md.count(f"baseline \\[data {data[:8]}\\]") == 2  # the run's own test set and the other one
