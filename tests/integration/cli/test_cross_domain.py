"""Cross-domain evaluation: ``eval RUN --dataset OTHER`` tests a trained run on another prepared dataset's test split,
with that dataset's episode sets and the run's own image size; results, compare and leaderboards show source ->
target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewshot_sla.cli import main
from fewshot_sla.data.catalog import open_store

TINY = ["--device", "cpu", "--quiet", "--train-episodes", "2", "--val-episodes", "2", "--eval-episodes", "6"]
TINY += ["--queries", "2", "--train-queries", "2", "--backbone-option", "hidden=8"]


def run_on(root: Path, out: Path, *flags: str) -> Path:
    assert main(["--data-root", str(root), "run", *TINY, *flags, "--out", str(out)]) == 0
    return out


def test_eval_on_another_dataset_uses_its_test_split_at_the_runs_image_size(
    two_datasets: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fewshot_sla.engine.run_evaluation as run_evaluation

    run = run_on(two_datasets, tmp_path / "run")  # trained at the synthetic store's own 32x32
    before = json.loads((run / "results.json").read_text())
    seen: list[tuple[int, ...]] = []
    built = run_evaluation.build_model

    def spying_build(*args, **kwargs):
        learner, objective = built(*args, **kwargs)
        learner.backbone.register_forward_pre_hook(lambda _, inputs: seen.append(tuple(inputs[0].shape[-2:])))
        return learner, objective

    monkeypatch.setattr(run_evaluation, "build_model", spying_build)
    capsys.readouterr()
    code = main(["--data-root", str(two_datasets), "eval", str(run), "--dataset", "tinyimagenet", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "tested on 6 episodes of tinyimagenet" in out
    assert "cross-domain: trained on synthetic, tested on tinyimagenet" in err
    assert seen and set(seen) == {(32, 32)}  # the 64x64 store's images reach the model at the run's 32x32
    after = json.loads((run / "results.json").read_text())
    assert after["evaluation"] == before["evaluation"]  # the run's own test evaluation stays the main one
    block = after["evaluations"][-1]
    target = open_store("tinyimagenet", two_datasets)
    assert block["episode_set"]["dataset"] == "tinyimagenet" and block["episode_set"]["split"] == "test"
    assert block["dataset_fingerprint"] == target.fingerprint != after["dataset_fingerprint"]
    per_episode = np.load(run / block["per_episode_file"])
    assert per_episode["ag"].shape == (6,) and str(per_episode["dataset_fingerprint"]) == target.fingerprint
    assert block["accuracy"]["ag"]["mean"] == pytest.approx(100 * per_episode["ag"].mean())
    # results.json records the training sizes, so the run's own store is not needed: a data root holding only the
    # target store gives the same per-episode results.
    only_target = tmp_path / "only-target"
    only_target.mkdir()
    (only_target / "tinyimagenet.h5").symlink_to(two_datasets / "tinyimagenet.h5")
    assert main(["--data-root", str(only_target), "eval", str(run), "--dataset", "tinyimagenet", "--quiet"]) == 0
    again = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert again["episode_set"]["hash"] == block["episode_set"]["hash"]
    np.testing.assert_array_equal(np.load(run / again["per_episode_file"])["ag"], per_episode["ag"])
    assert not (only_target / "synthetic.h5").exists()


def test_cross_domain_evaluations_compare_and_show_source_and_target(
    two_datasets: Path, tmp_path: Path, capsys
) -> None:
    runs = tmp_path / "runs"
    sla = run_on(two_datasets, runs / "sla", "--image-size", "16")
    base = run_on(two_datasets, runs / "base", "--image-size", "16", "--objective", "baseline", "--transform", "none")
    for run in (sla, base):
        assert main(["--data-root", str(two_datasets), "eval", str(run), "--dataset", "tinyimagenet", "--quiet"]) == 0
    target_hash = json.loads((sla / "results.json").read_text())["evaluations"][-1]["episode_set"]["hash"]
    capsys.readouterr()
    assert main(["compare", str(sla), str(base), "--episode-set", target_hash[:12], "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["episode_set_hash"] == target_hash
    # A lost per-episode file is named with the command that rebuilds it, which then works.
    block = json.loads((sla / "results.json").read_text())["evaluations"][-1]
    (sla / block["per_episode_file"]).unlink()
    assert main(["compare", str(sla), str(base), "--episode-set", target_hash[:12]]) == 2
    err = capsys.readouterr().err.strip()
    command = err.split("rebuild them with '")[1].rstrip("'").split()
    assert command[:3] == ["fewshot-sla", "eval", str(sla)] and "--dataset" in command and len(err.splitlines()) == 1
    assert main(["--data-root", str(two_datasets), *command[1:], "--quiet"]) == 0
    assert (sla / block["per_episode_file"]).is_file()
    board = tmp_path / "board"
    assert main(["leaderboard", "build", str(runs), "--out", str(board), "--no-published"]) == 0
    table = (board / "leaderboard.md").read_text()
    assert "synthetic -> tinyimagenet" in table and "| synthetic |" in table


def test_bad_target_datasets_fail_in_one_line(two_datasets: Path, tmp_path: Path, capsys) -> None:
    run = run_on(two_datasets, tmp_path / "run", "--image-size", "16")
    for name, expected in (("imagenet", "unknown dataset 'imagenet'"), ("cub", "fewshot-sla data prepare cub")):
        capsys.readouterr()
        code = main(["--data-root", str(two_datasets), "eval", str(run), "--dataset", name])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
