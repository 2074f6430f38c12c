"""``fewshot-sla compare``: paired statistics on the same episodes, checked against scipy; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from fewshot_sla.cli import main

TINY = [
    "--device",
    "cpu",
    "--quiet",
    "--train-episodes",
    "3",
    "--val-every",
    "3",
    "--val-episodes",
    "8",
    "--eval-episodes",
    "24",
    "--queries",
    "4",
    "--train-queries",
    "4",
    "--backbone-option",
    "hidden=8",
    "--image-size",
    "16",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    root = data_root
    base = tmp_path_factory.mktemp("compare")
    made = {}
    for name, extra in {
        "sla0": [],
        "sla1": ["--seed", "1"],
        "plain": ["--objective", "baseline", "--transform", "none"],
    }.items():
        made[name] = base / name
        assert main(["--data-root", str(root), "run", *TINY, *extra, "--out", str(made[name])]) == 0
    return made


def compare(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    return code, out, err


def per_episode(run: Path) -> dict[str, np.ndarray]:
    results = json.loads((run / "results.json").read_text())
    with np.load(run / results["evaluation"]["per_episode_file"]) as npz:
        return {k: npz[k] for k in npz.files}


def test_shared_kinds_are_compared_with_scipy_statistics(capsys, runs: dict[str, Path]) -> None:
    code, out, err = compare(capsys, str(runs["sla0"]), str(runs["sla1"]), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [(c["kind_a"], c["kind_b"]) for c in data["comparisons"]] == [("si", "si"), ("ag", "ag")]
    a, b = per_episode(runs["sla0"]), per_episode(runs["sla1"])
    for row in data["comparisons"]:
        x, y = a[row["kind_a"]], b[row["kind_b"]]
        d = x - y
        assert row["n"] == 24
        assert row["mean_diff"] == pytest.approx(100 * d.mean(), abs=1e-9)
        assert row["mean_a"] == pytest.approx(100 * x.mean()) and row["mean_b"] == pytest.approx(100 * y.mean())
        assert row["ci95"] == pytest.approx(100 * 1.959964 * d.std(ddof=1) / np.sqrt(24), rel=1e-5)
        if d.std() > 0:
            assert row["p_ttest"] == pytest.approx(st.ttest_rel(x, y).pvalue, rel=1e-9)
        assert row["wins"] == int((d > 0).sum()) and row["losses"] == int((d < 0).sum())
        assert 0 <= row["p_wilcoxon"] <= 1


NOTE = "pairing A's SLA+AG with B's plain (the runs share no prediction kind; choose others with --kind-a/--kind-b)"


def test_an_sla_run_and_a_baseline_pair_their_headline_kinds_and_say_so(capsys, runs: dict[str, Path]) -> None:
    sla, plain = str(runs["sla0"]), str(runs["plain"])
    code, out, err = compare(capsys, sla, plain, "--json")
    assert code == 0, err
    auto = json.loads(out)
    code, out, err = compare(capsys, sla, plain, "--kind-a", "ag", "--kind-b", "plain", "--json")
    assert code == 0, err
    explicit = json.loads(out)
    assert [(c["kind_a"], c["kind_b"]) for c in auto["comparisons"]] == [("ag", "plain")]
    assert auto["comparisons"] == explicit["comparisons"]
    assert auto["comparisons"][0]["mean_b"] == pytest.approx(100 * per_episode(runs["plain"])["plain"].mean())
    assert auto["note"] == NOTE and explicit["note"] is None
    code, out, err = compare(capsys, sla, plain)
    assert code == 0, err
    assert [line for line in out.splitlines() if "pairing" in line] == [f"note: {NOTE}"]
    assert "SLA+AG" in out and "24 paired test episodes" in out
    code, out, err = compare(capsys, plain, sla, "--json")
    assert json.loads(out)["note"].startswith("pairing A's plain with B's SLA+AG")
    assert [(c["kind_a"], c["kind_b"]) for c in json.loads(out)["comparisons"]] == [("plain", "ag")]


def test_explicit_kinds_win_over_the_headline_pairing(capsys, runs: dict[str, Path]) -> None:
    sla, plain = str(runs["sla0"]), str(runs["plain"])
    code, out, err = compare(capsys, sla, plain, "--kind-a", "si", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [(c["kind_a"], c["kind_b"]) for c in data["comparisons"]] == [("si", "plain")] and data["note"] is None
    assert data["comparisons"][0]["mean_a"] == pytest.approx(100 * per_episode(runs["sla0"])["si"].mean())
    code, out, err = compare(capsys, sla, plain, "--kind-a", "si")
    assert code == 0 and "SLA+SI" in out and "pairing" not in out
    code, out, err = compare(capsys, str(runs["sla0"]), str(runs["sla1"]), "--kind", "ag", "--json")
    assert [c["kind_a"] for c in json.loads(out)["comparisons"]] == ["ag"]
    code, out, err = compare(capsys, str(runs["sla0"]), str(runs["sla1"]))
    assert code == 0 and "pairing" not in out  # shared kinds: compared kind by kind, as before
    code, out, err = compare(capsys, sla, plain, "--kind", "si")
    assert code == 2 and "has no 'si' predictions" in err


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    results = json.loads((dst / "results.json").read_text())
    edit(results)
    (dst / "results.json").write_text(json.dumps(results))
    return dst


def test_runs_on_different_episode_sets_are_refused_until_evaluated_on_one(
    capsys, runs: dict[str, Path], tmp_path: Path
) -> None:
    def other_set(results: dict) -> None:
        for block in [results["evaluation"], *results["evaluations"]]:
            block["episode_set"]["hash"] = "f" * 64

    other = _edited_copy(runs["sla1"], tmp_path / "other", other_set)
    code, _, err = compare(capsys, str(runs["sla0"]), str(other))
    assert code == 2 and "different episode sets" in err and "fewshot-sla eval" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = compare(capsys, str(runs["sla0"]), str(runs["sla1"]), "--episode-set", "0000")
    assert code == 2 and "no episode set with hash 0000" in err


def test_runs_tested_on_different_stores_are_refused_unless_paired_across_stores(
    capsys, runs: dict[str, Path], tmp_path: Path
) -> None:
    def other_store(results: dict) -> None:
        for block in [results["evaluation"], *results["evaluations"]]:
            block["dataset_fingerprint"] = "0" * 64

    other = _edited_copy(runs["sla1"], tmp_path / "other", other_store)
    code, _, err = compare(capsys, str(runs["sla0"]), str(other))
    assert code == 2 and "tested on different synthetic stores" in err and len(err.strip().splitlines()) == 1
    assert "--across-stores" in err
    # Allowed, the episodes pair as on one store (the copy's per-episode accuracies are the original's), and said
    code, out, err = compare(capsys, str(runs["sla0"]), str(other), "--across-stores", "--json")
    assert code == 0, err
    across = json.loads(out)
    code, out, _ = compare(capsys, str(runs["sla0"]), str(runs["sla1"]), "--json")
    same_store = json.loads(out)
    assert across["comparisons"] == same_store["comparisons"] and same_store["note"] is None
    assert "different synthetic stores" in across["note"] and "000000000000" in across["note"]
    code, out, _ = compare(capsys, str(runs["sla0"]), str(other), "--across-stores")
    assert code == 0 and "note: tested on different synthetic stores" in out


def test_a_later_evaluation_on_another_set_keeps_the_common_one_comparable(
    capsys, runs: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "sla1"
    shutil.copytree(runs["sla1"], copy)
    assert main(["--data-root", str(data_root), "eval", str(copy), "--eval-episodes", "12", "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = compare(capsys, str(runs["sla0"]), str(copy), "--json")
    assert code == 0, err
    assert json.loads(out)["comparisons"][0]["n"] == 24


def test_results_are_found_and_read_back_for_leaderboards(runs: dict[str, Path], tmp_path: Path) -> None:
    from fewshot_sla.errors import UserError
    from fewshot_sla.results import find_runs, load_results

    assert sorted(p.name for p in find_runs(runs["sla0"].parent)) == ["plain", "sla0", "sla1"]
    run = load_results(runs["sla0"])
    per = run.per_episode(run.evaluation["episode_set"]["hash"])
    assert run.accuracy("ag")["mean"] == pytest.approx(100 * per["ag"].mean())
    newer = _edited_copy(runs["sla0"], tmp_path / "newer", lambda r: r.update(schema_version=99))
    with pytest.raises(UserError, match="upgrade fewshot-sla"):
        load_results(newer)
