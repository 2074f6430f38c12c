"""Reproduction verdicts: measured leaderboard rows against published ones (boundaries, combined intervals,
matching on backbone options, budgets), the shipped Omniglot rows and the Omniglot reproduction grid."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.errors import UserError
from fewshot_sla.leaderboard.build import accuracy_rows, build_leaderboard, load_entries
from fewshot_sla.leaderboard.published import PublishedResult, load_published
from fewshot_sla.leaderboard.reproduction import (
    DOCS_SECTION,
    Reproduction,
    ReproductionRow,
    judge,
    plot,
    reproduction_rows,
)
from tests.helpers.paths import REPO
from tests.unit.leaderboard.test_leaderboard_build import _episodes, _rows, make_run

GRID = REPO / "benchmarks" / "reproduce" / "omniglot.yaml"
HEADER = (
    "method,backbone,backbone_detail,backbone_options,dataset,ways,shots,accuracy,ci95,test_episodes,"
    "test_queries,train_episodes,source,reference,note"
)


def _published(
    accuracy: float,
    ci95: float | None,
    *,
    method: str = "protonet",
    options: dict | None = None,
    train_episodes: int | None = None,
    test_episodes: int | None = 600,
) -> PublishedResult:
    return PublishedResult(
        method,
        "conv4",
        "Conv-4",
        "miniimagenet",
        5,
        1,
        accuracy,
        ci95,
        test_episodes,
        None,
        "Someone et al. 2017",
        "arXiv:0000.00000",
        "",
        options or {},
        train_episodes,
    )


# ----- the verdict rule, at its boundaries -----


def test_published_value_exactly_at_our_interval_edge_is_reproduced_and_just_beyond_is_not() -> None:
    at_edge = judge(60.0, 1.5, 61.5, None)
    assert (at_edge.verdict, at_edge.basis) == ("reproduced", "published value within our 95% CI")
    assert at_edge.difference == pytest.approx(-1.5)
    assert judge(60.0, 1.5, 58.5, None).verdict == "reproduced"
    # No published interval: the difference's interval is ours alone, so just past our edge is a verdict.
    beyond = judge(60.0, 1.5, 61.5001, None)
    assert (beyond.verdict, beyond.ci95, beyond.ci_from) == ("below", 1.5, "ours only (no published CI)")
    assert judge(60.0, 1.5, 58.4999, None).verdict == "above"


def test_difference_interval_just_containing_zero_is_reproduced_and_just_excluding_it_is_not() -> None:
    # ours 60.0 +- 1.5 and published 62.5 +- 2.0: the difference -2.5 has the half-width sqrt(1.5^2 + 2^2) = 2.5.
    edge = judge(60.0, 1.5, 62.5, 2.0)
    assert edge.ci95 == pytest.approx(2.5) and edge.ci_from == "ours and published"
    assert (edge.verdict, edge.basis) == ("reproduced", "95% CI of the difference contains 0")
    assert judge(60.0, 1.5, 62.5001, 2.0).verdict == "below"
    assert judge(60.0, 1.5, 57.5, 2.0).verdict == "reproduced"
    above = judge(60.0, 1.5, 57.4999, 2.0)
    assert above.verdict == "above" and above.difference == pytest.approx(2.5001)


def test_the_published_values_rounding_widens_the_interval_only_by_half_its_last_digit() -> None:
    # ours 98.60 +- 0.17 against a printed 98.8 (any value in 98.75..98.85): 98.75 - 98.60 = 0.15 <= 0.17.
    v = judge(98.60, 0.17, 98.8, None, rounding=0.05)
    assert v.verdict == "reproduced" and v.basis.startswith("95% CI of the difference, widened by the published")
    assert "(±0.05)" in v.basis and v.ci95 == pytest.approx(0.17)  # the interval shown stays ours
    assert judge(98.60, 0.17, 98.8, None).verdict == "below"  # exact published value: as before
    # The edge: |difference| = interval + rounding is inside, a hair beyond is not (both sides, both CI sources).
    assert judge(60.0, 1.5, 61.55, None, rounding=0.05).verdict == "reproduced"
    assert judge(60.0, 1.5, 61.5501, None, rounding=0.05).verdict == "below"
    assert judge(60.0, 1.5, 57.445, 2.0, rounding=0.005).verdict == "above"  # 2.555 > 2.5 + 0.005
    assert judge(60.0, 1.5, 57.495, 2.0, rounding=0.005).verdict == "reproduced"
    # Inside our own interval the basis stays the plainer one.
    assert judge(60.0, 1.5, 61.0, None, rounding=0.05).basis == "published value within our 95% CI"


def test_combined_interval_uses_both_intervals() -> None:
    v = judge(71.3, 0.42, 69.0, 0.61)
    assert v.ci95 == pytest.approx(math.sqrt(0.42**2 + 0.61**2))
    assert v.difference == pytest.approx(2.3) and v.verdict == "above"


# ----- end to end: runs -> leaderboard build -> reproduction outputs -----


def _two_seed_baseline(runs: Path, **config: object) -> tuple[float, float]:
    """Two seeds of one protonet baseline setting; their mean accuracy and mean per-run 95% half-width (numpy)."""
    means, cis = [], []
    for seed in (0, 1):
        acc = _episodes(30 + seed, p=0.55)
        make_run(runs, f"base{seed}", objective="baseline", seed=seed, per_episode={"plain": acc}, **config)
        means.append(100 * acc.mean())
        cis.append(100 * 1.96 * acc.std(ddof=1) / math.sqrt(len(acc)))
    return float(np.mean(means)), float(np.mean(cis))


def _write_table(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    ("offset", "published_ci", "verdict"),
    [
        (1.0, None, "reproduced"),  # at our interval's upper edge (offset in units of our half-width)
        (1.001, None, "below"),  # just past it, nothing published to widen the interval
        (-1.001, None, "above"),
        (1.4, 1.0, "reproduced"),  # outside our interval, inside the combined one
    ],
)
def test_build_writes_a_verdict_per_matching_row(
    tmp_path: Path, capsys: pytest.CaptureFixture, offset: float, published_ci: float | None, verdict: str
) -> None:
    runs = tmp_path / "runs"
    mean, ci = _two_seed_baseline(runs)
    published = mean + offset * ci
    pub_ci = "" if published_ci is None else str(published_ci * ci)
    table = _write_table(
        tmp_path / "published.csv",
        [f"protonet,conv4,Conv-4 (64 filters),,miniimagenet,5,1,{published!r},{pub_ci},600,,,Someone et al. 2017,,"],
    )
    out = tmp_path / "out"
    assert main(["leaderboard", "build", str(runs), "--out", str(out), "--published", str(table)]) == 0
    assert f"1 {verdict}" in capsys.readouterr().out
    (row,) = _rows(out / "reproduction.csv")
    assert row["verdict"] == verdict
    assert float(row["accuracy"]) == pytest.approx(mean) and float(row["ci95"]) == pytest.approx(ci)
    assert row["runs"] == "2" and row["seeds"] == "0 1"
    assert float(row["published_accuracy"]) == published
    assert float(row["difference"]) == pytest.approx(mean - published)
    expected_ci = ci if published_ci is None else math.sqrt(ci**2 + (published_ci * ci) ** 2)
    assert float(row["difference_ci95"]) == pytest.approx(expected_ci)
    assert row["difference_ci_from"] == (
        "ours only (no published CI)" if published_ci is None else "ours and published"
    )
    md = (out / "reproduction.md").read_text()
    assert f"**{verdict}**" in md and "Someone et al. 2017" in md
    assert "reproduction.md" in (out / "leaderboard.md").read_text()
    with Image.open(out / "reproduction.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_budget_and_test_protocol_columns_come_from_the_config_and_the_table(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # make_run sets train_episodes=100: with meta-batches of 8 that is ceil(100 / 8) = 13 steps, 104 episodes seen.
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)}, meta_batch=8)
    build_leaderboard(runs, tmp_path / "out", [_published(50.0, 0.8, train_episodes=208, test_episodes=600)])
    (row,) = _rows(tmp_path / "out" / "reproduction.csv")
    assert (row["train_episodes"], row["meta_batch"], row["train_steps"], row["episodes_seen"]) == (
        "100",
        "8",
        "13",
        "104",
    )
    assert row["published_train_episodes"] == "208" and float(row["budget_ratio"]) == pytest.approx(0.5)
    assert (row["test_episodes"], row["published_test_episodes"], row["test_queries"]) == ("40", "600", "15")
    md = (tmp_path / "out" / "reproduction.md").read_text()
    assert "104 / 208" in md and "40 / 600" in md
    # Unknown published budget: the ratio stays empty rather than made up.
    build_leaderboard(runs, tmp_path / "out2", [_published(50.0, 0.8)])
    (row,) = _rows(tmp_path / "out2" / "reproduction.csv")
    assert row["published_train_episodes"] == "" and row["budget_ratio"] == ""


def test_rows_without_a_published_counterpart_get_no_verdict(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    make_run(runs, "sla", objective="sla", per_episode={"ag": _episodes(2), "si": _episodes(3)})
    make_run(runs, "ridge", objective="baseline", method="metaoptnet-ridge", per_episode={"plain": _episodes(4)})
    report = build_leaderboard(runs, tmp_path / "out", [_published(50.0, 0.8)])
    rows = _rows(tmp_path / "out" / "reproduction.csv")
    # The protonet baseline and its SLA run (headline SLA+AG only, not SI) are compared; the ridge run is not.
    assert sorted((r["method"], r["objective"], r["prediction"]) for r in rows) == [
        ("protonet", "baseline", "plain"),
        ("protonet", "sla", "ag"),
    ]
    assert sum(report.verdicts.values()) == 2
    md = (tmp_path / "out" / "reproduction.md").read_text()
    (line,) = [line for line in md.splitlines() if "metaoptnet-ridge" in line]
    assert "no published row" in line and "**" not in line
    # Without any published table every output is still written, with no verdict in it.
    build_leaderboard(runs, tmp_path / "none")
    assert _rows(tmp_path / "none" / "reproduction.csv") == []
    assert "No measured row has a published counterpart." in (tmp_path / "none" / "reproduction.md").read_text()


def test_backbone_options_must_match_after_filling_in_the_defaults(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "default", objective="baseline", per_episode={"plain": _episodes(1)})
    make_run(runs, "narrow", objective="baseline", per_episode={"plain": _episodes(2)}, backbone_options={"hidden": 32})
    entries, _ = load_entries(runs)
    # conv4's default is 64 filters: a published 'hidden=64' row is the default-configured run's, 'hidden=32' the
    # other's, and an unnamed option (the published row's defaults) only the default-configured run's.
    for options, expected in (({"hidden": 64}, {}), ({"hidden": 32}, {"hidden": 32}), ({}, {})):
        rep = reproduction_rows(accuracy_rows(entries), [_published(50.0, 0.8, options=options)])
        assert [r.backbone_options for r in rep.rows] == ["hidden=32" if expected else ""]
        ((_, why),) = rep.unmatched
        assert "backbone options differ" in why and "hidden=" in why


def _plotted(rep: Reproduction, path: Path) -> Any:
    """The figure ``plot`` hands to its save helper, drawn (so text extents are known)."""
    figures = []
    plot(rep, path, lambda fig, _: figures.append(fig))
    (fig,) = figures
    FigureCanvasAgg(fig).draw()
    return fig


def _one_row(tmp_path: Path) -> ReproductionRow:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    (row,) = reproduction_rows(accuracy_rows(load_entries(runs)[0]), [_published(50.0, 0.8)]).rows
    return row


def test_plot_keeps_every_interval_and_zero_inside_its_panel(tmp_path: Path) -> None:
    """A miss of tens of points and a difference of a tenth share a panel: both intervals, widened by the published
    rounding, and 0 lie inside the x axis, which turns logarithmic beyond +-1 point only when it must."""
    row = _one_row(tmp_path)
    near = replace(row, difference=-0.2, difference_ci95=0.17, published_rounding=0.05)
    far = replace(row, difference=-31.6, difference_ci95=0.36, method="matchingnet")
    for rows, scale in (([near], "linear"), ([near, far], "symlog")):
        ax = _plotted(Reproduction(rows, []), tmp_path / "r.png").axes[0]
        low, high = ax.get_xlim()
        assert ax.get_xscale() == scale
        assert low < 0.0 < high
        for r in rows:
            reach = r.difference_ci95 + r.published_rounding
            assert low < r.difference - reach and r.difference + reach < high


def test_plot_labels_of_long_configurations_never_overlap(tmp_path: Path) -> None:
    """Rows whose labels carry long unbreakable tags (a learner option, a data fingerprint) each keep their own
    lines: no two row labels, and no two verdicts printed at the rows' ends, share a pixel row."""
    row = _one_row(tmp_path)
    tags = "[data e06dbcb3] [learner_options.distance=default, learner_options.learn_scale=default, "
    rows = [
        replace(row, training=f"{tags}learner_options.scale={i}, train_episodes={1000 * i}, val_every=500]")
        for i in range(12)
    ]
    fig = _plotted(Reproduction(rows, []), tmp_path / "r.png")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    for texts in (ax.get_yticklabels(), [t for t in ax.texts]):
        boxes = sorted((t.get_window_extent(renderer) for t in texts), key=lambda box: box.y0)
        assert len(boxes) == len(rows)
        assert all(below.y1 <= above.y0 for below, above in pairwise(boxes))


# ----- the published table -----


def test_published_table_reads_blank_intervals_budgets_and_options(tmp_path: Path) -> None:
    path = _write_table(
        tmp_path / "p.csv",
        [
            "maml,conv4,x,hidden=64; strided=true,omniglot,5,1,98.7,0.4,600,1,1920000,Finn et al. 2017,,",
            "protonet,conv4,x,,omniglot,5,1,98.8,,1000,,,Snell et al. 2017,,",
        ],
    )
    maml, proto = load_published(path)
    assert (maml.ci95, maml.train_episodes, dict(maml.backbone_options)) == (
        0.4,
        1920000,
        {"hidden": 64, "strided": True},
    )
    assert (proto.ci95, proto.train_episodes, dict(proto.backbone_options)) == (None, None, {})
    # A table in the older format (no backbone_options, no train_episodes) still loads.
    old = tmp_path / "old.csv"
    old.write_text("method,backbone,dataset,ways,shots,accuracy,ci95,source\nprotonet,conv4,cub,5,1,50.0,0.5,x\n")
    (row,) = load_published(old)
    assert (row.ci95, row.train_episodes, dict(row.backbone_options)) == (0.5, None, {})
    assert (maml.rounding, proto.rounding, maml.digits) == (pytest.approx(0.05), pytest.approx(0.05), 1)
    bad = _write_table(tmp_path / "bad.csv", ["maml,conv4,x,hidden,omniglot,5,1,98.7,0.4,,,,Finn,,"])
    with pytest.raises(UserError, match=r"bad.csv line 2: 'backbone_options' must be key=value"):
        load_published(bad)


@pytest.mark.parametrize(
    ("printed", "decimals", "rounding"),
    [("98.8", 1, 0.05), ("49.42", 2, 0.005), ("98", 0, 0.5), ("98.80", 2, 0.005), ("9.88e1", 1, 0.05)],
)
def test_the_published_precision_is_read_from_the_digits_written(
    tmp_path: Path, printed: str, decimals: int, rounding: float
) -> None:
    (row,) = load_published(_write_table(tmp_path / "p.csv", [f"protonet,conv4,x,,cub,5,1,{printed},,,,,S,,"]))
    assert (row.decimals, row.rounding) == (decimals, pytest.approx(rounding))
    assert f"{row.accuracy:.{row.digits}f}" == f"{float(printed):.{decimals}f}"


def test_tables_print_a_published_number_with_the_digits_its_source_gave(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    table = _write_table(
        tmp_path / "p.csv", ["protonet,conv4,Conv-4,,miniimagenet,5,1,50.4,0.6,600,,,Someone et al. 2017,,"]
    )
    out = tmp_path / "out"
    build_leaderboard(runs, out, load_published(table))
    assert "| 50.4 ± 0.6 |" in (out / "reproduction.md").read_text()
    published_line = next(line for line in (out / "leaderboard.md").read_text().splitlines() if "Someone" in line)
    assert "| 50.4 | 0.6 |" in published_line and "50.40" not in published_line
    (row,) = _rows(out / "reproduction.csv")
    assert float(row["published_rounding"]) == pytest.approx(0.05)


def test_shipped_table_has_the_omniglot_rows() -> None:
    omniglot = {(p.method, p.ways, p.shots): p for p in load_published() if p.dataset == "omniglot"}
    expected = {
        "protonet": (98.8, None, 99.7, None, 96.0, None, 98.9, None),
        "matchingnet": (98.1, None, 98.9, None, 93.8, None, 98.5, None),
        "maml": (98.7, 0.4, 99.9, 0.1, 95.8, 0.3, 98.9, 0.2),
        "maml-fo": (98.3, 0.5, 99.2, 0.2, 89.4, 0.5, 97.9, 0.1),
        "relationnet": (99.6, 0.2, 99.8, 0.1, 97.6, 0.2, 99.1, 0.1),
    }
    assert len(omniglot) == 20
    for method, values in expected.items():
        for i, (ways, shots) in enumerate(((5, 1), (5, 5), (20, 1), (20, 5))):
            p = omniglot[(method, ways, shots)]
            assert (p.accuracy, p.ci95) == values[2 * i : 2 * i + 2]
            assert p.backbone == ("relation-conv4" if method == "relationnet" else "conv4")
            assert dict(p.backbone_options) == ({"hidden": 64, "strided": True} if "maml" in method else {})
    assert all(p.test_episodes == 1000 for (m, _, _), p in omniglot.items() if m == "protonet")
    # Finn et al.: 60,000 meta-iterations of 32 (5-way) or 16 (20-way) tasks.
    assert [omniglot[("maml", w, 1)].train_episodes for w in (5, 20)] == [1_920_000, 960_000]


# ----- the reproduction grid -----


def test_omniglot_grid_pairs_every_baseline_with_rotation_sla() -> None:
    data = yaml.safe_load(GRID.read_text())
    assert data["datasets"] == ["omniglot"]
    methods = [m if isinstance(m, str) else m["method"] for m in data["methods"]]
    assert sorted(methods) == ["maml", "maml-fo", "matchingnet", "protonet", "relationnet"]
    assert data["variants"] == [
        {"transform": "none", "objective": "baseline"},
        {"transform": "rotation", "objective": "sla"},
    ]
    assert (data["ways"], data["shots"]) == ([5, 20], [1, 5])
    header = GRID.read_text().split("\nname:")[0]
    assert "fewshot-sla leaderboard run benchmarks/reproduce/omniglot.yaml" in header
    assert "--out benchmarks/results/reproduce/omniglot" in header


def test_omniglot_grid_loads_and_its_cells_match_the_published_rows() -> None:
    from fewshot_sla.registry import BACKBONES, DATASETS, LEARNERS

    needed = {"matchingnet", "relationnet"} - set(LEARNERS.names())
    if needed or "omniglot" not in DATASETS.names() or "relation-conv4" not in BACKBONES.names():
        pytest.skip("the omniglot dataset, the matchingnet/relationnet learners or relation-conv4 are not registered")
    from fewshot_sla.config.grid import load_grid
    from fewshot_sla.leaderboard.reproduction import effective_options

    cells = load_grid(GRID).cells
    assert len(cells) == 5 * 2 * 2 * 2
    published = {(p.method, p.ways, p.shots): p for p in load_published() if p.dataset == "omniglot"}
    for cell in cells:
        c = cell.config
        p = published[(c.method, c.ways, c.shots)]
        assert c.backbone == p.backbone
        assert effective_options(c.backbone, c.backbone_options) == effective_options(p.backbone, p.backbone_options)


def test_csv_columns_are_stable(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    build_leaderboard(runs, tmp_path / "out", [_published(50.0, None)])
    with open(tmp_path / "out" / "reproduction.csv", newline="") as fh:
        header = next(csv.reader(fh))
    for column in (
        "published_accuracy",
        "published_ci95",
        "published_rounding",
        "difference_ci95",
        "verdict",
        "episodes_seen",
    ):
        assert column in header


def test_the_documentation_section_holds_the_table_and_the_rows_not_compared_but_not_the_plot(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "base", objective="baseline", per_episode={"plain": _episodes(1)})
    make_run(runs, "ridge", objective="baseline", method="metaoptnet-ridge", per_episode={"plain": _episodes(4)})
    build_leaderboard(runs, tmp_path / "out", [_published(50.0, 0.8)])
    lines = (tmp_path / "out" / "reproduction.md").read_text().splitlines()
    start = lines.index(f"<!-- --8<-- [start:{DOCS_SECTION}] -->")
    end = lines.index(f"<!-- --8<-- [end:{DOCS_SECTION}] -->")
    section, rest = "\n".join(lines[start:end]), "\n".join(lines[end:])
    assert "| protonet |" in section and "## Not compared" in section and "metaoptnet-ridge" in section
    assert "reproduction.png" not in section and "reproduction.png" in rest
    # The documentation includes that section of every committed reproduction table it shows.
    for page in (REPO / "docs" / "results").glob("*.md"):
        for included in re.findall(r'--8<-- "([^"]*reproduction\.md)(:[^"]*)?"', page.read_text()):
            assert included[1] == f":{DOCS_SECTION}", page
            assert f"[start:{DOCS_SECTION}]" in (REPO / included[0]).read_text()


def test_the_table_says_where_the_tested_checkpoint_was_found_and_whether_validation_was_still_rising(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "early", objective="baseline", per_episode={"plain": _episodes(1)}, best_step=40, lr=0.01)
    make_run(runs, "end", objective="baseline", per_episode={"plain": _episodes(2)}, best_step=100, lr=0.02)
    build_leaderboard(runs, tmp_path / "out", [_published(50.0, 0.8)])
    rows = {r["best_val_episodes"]: r["best_at_end"] for r in _rows(tmp_path / "out" / "reproduction.csv")}
    assert rows == {"40": "False", "100": "True"}
    md = (tmp_path / "out" / "reproduction.md").read_text()
    (early,) = [line for line in md.splitlines() if "\\[lr=0.01\\]" in line]
    (end,) = [line for line in md.splitlines() if "\\[lr=0.02\\]" in line]
    assert "best val. at 40 |" in early and "best val. at 100 (the last check)" in end
