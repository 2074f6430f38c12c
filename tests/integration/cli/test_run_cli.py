"""``fewshot-sla run`` / ``eval`` end to end on the synthetic set, and every bad-input case (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewshot_sla.cli import main
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec
from tests.helpers.paths import REPO

TINY = [
    "--device",
    "cpu",
    "--quiet",
    "--train-episodes",
    "4",
    "--val-every",
    "2",
    "--val-episodes",
    "10",
    "--eval-episodes",
    "20",
    "--queries",
    "5",
    "--train-queries",
    "5",
    "--backbone-option",
    "hidden=8",
    "--image-size",
    "16",
]


def cli(capsys: pytest.CaptureFixture, data_root: Path, *args: str) -> tuple[int, str, str]:
    try:
        code = main(["--data-root", str(data_root), *args])
    except SystemExit as stop:  # argparse's own errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "a"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = main(["--data-root", str(data_root), "run", *TINY, "--out", str(out)])
    assert code == 0
    return out, buffer.getvalue()


def test_a_run_writes_every_output_and_prints_the_table(finished_run: tuple[Path, str]) -> None:
    out, printed = finished_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "learning_curve.png",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ):
        assert (out / name).is_file(), name
    assert not [p for p in out.rglob("*.tmp")]
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1 and results["status"] == "finished"
    for key in (
        "method",
        "backbone",
        "dataset",
        "dataset_fingerprint",
        "transform",
        "objective",
        "seed",
        "ways",
        "shots",
        "queries",
        "device",
        "versions",
        "git_commit",
        "train",
        "evaluation",
        "config",
    ):
        assert key in results, key
    assert (results["method"], results["dataset"], results["transform"], results["objective"]) == (
        "protonet",
        "synthetic",
        "rotation",
        "sla",
    )
    assert len(results["dataset_fingerprint"]) == 64
    ev = results["evaluation"]
    assert ev["episodes"] == 20 and ev["cached"] and len(ev["episode_set"]["hash"]) == 64
    assert set(ev["accuracy"]) == {"si", "ag"}
    for acc in ev["accuracy"].values():
        assert 0 <= acc["mean"] <= 100 and acc["n"] == 20 and acc["ci95"] > 0 and acc["ci95_t"] > acc["ci95"]
    train = results["train"]
    assert train["episodes"] == 4 and train["episodes_per_s"] > 0 and train["time_s"] > 0
    assert set(results["versions"]) >= {"python", "torch", "fewshot_sla"}
    per_episode = np.load(out / ev["per_episode_file"])
    assert per_episode["ag"].shape == (20,)
    assert ev["accuracy"]["ag"]["mean"] == pytest.approx(100 * per_episode["ag"].mean())
    assert "SLA+SI" in printed and "SLA+AG" in printed and "chance" in printed and "20.00%" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert yaml.safe_load((out / "config.yaml").read_text())["train_episodes"] == 4


def test_eval_adds_an_evaluation_on_another_episode_set(
    capsys, data_root: Path, finished_run: tuple[Path, str]
) -> None:
    out, _ = finished_run
    before = json.loads((out / "results.json").read_text())
    code, printed, err = cli(capsys, data_root, "eval", str(out), "--eval-episodes", "30", "--quiet")
    assert code == 0 and "SLA+AG" in printed and "tested on 30 episodes" in printed
    assert "the main evaluation stays the run's own test set" in err
    after = json.loads((out / "results.json").read_text())
    # The other set is added; the run's own test evaluation stays the main one.
    assert after["evaluation"] == before["evaluation"] and len(after["evaluations"]) == 2
    assert after["evaluations"][0] == before["evaluation"] and after["evaluations"][1]["episodes"] == 30
    # The same set again replaces its entry and reproduces the same numbers.
    code, _, _ = cli(capsys, data_root, "eval", str(out), "--eval-episodes", "20", "--quiet", "--no-feature-cache")
    again = json.loads((out / "results.json").read_text())
    assert len(again["evaluations"]) == 2 and not again["evaluation"]["cached"]
    for kind in ("si", "ag"):
        assert again["evaluation"]["accuracy"][kind]["mean"] == pytest.approx(
            before["evaluation"]["accuracy"][kind]["mean"]
        )


def test_default_folder_and_config_file_with_flag_override(
    capsys, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "my.yaml"
    config.write_text("shots: 2\nseed: 3\ntransform: none\nobjective: baseline\nlr: 0.002\n")
    code, printed, err = cli(
        capsys, data_root, "run", *TINY, "--config", str(config), "--shots", "1", "--train-episodes", "2"
    )
    assert code == 0, err
    run_dir = tmp_path / "runs" / "synthetic-protonet-5w1s-none-baseline-3"
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (stored["shots"], stored["seed"], stored["lr"], stored["train_episodes"]) == (1, 3, 0.002, 2)
    assert stored["optimizer"] == "adam"  # from the recipe
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["evaluation"]["accuracy"]) == {"plain"} and "plain" in printed
    (run_dir / "stale.txt").write_text("from before")
    code, _, err = cli(
        capsys, data_root, "run", *TINY, "--config", str(config), "--shots", "1", "--train-episodes", "2", "--overwrite"
    )
    assert code == 0, err
    assert not (run_dir / "stale.txt").exists() and (run_dir / "results.json").is_file()


def _bad(capsys, data_root: Path, *args: str) -> str:
    code, out, err = cli(capsys, data_root, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--method", "protonett"], "unknown learner 'protonett'; choose one of: "),
        (["--dataset", "imagenet1k"], "unknown dataset 'imagenet1k'"),
        (["--backbone", "vgg"], "unknown backbone 'vgg'"),
        (["--transform", "shear"], "unknown transform 'shear'"),
        (["--objective", "sla++"], "unknown objective 'sla++'"),
        (["--ways", "25"], "use --ways 20 or fewer"),
        (
            ["--train-ways", "70"],
            "training episodes: 70-way episodes need 70 classes but split 'train' has 64; use --train-ways 64 or fewer",
        ),
        (["--train-shots", "1000", "--train-queries", "1000"], "lower --train-shots/--train-queries"),
        (["--image-size", "5000"], "'image_size' must be at most 1024, got 5000"),
        (["--eval-episodes", "2000000"], "'eval_episodes' must be at most 1000000"),
        (["--set", "momentum=1.5"], "'momentum' must be at most 1, got 1.5"),
        (
            ["--method", "maml", "--learner-option", "inner_lr=.inf"],
            "learner option inner_lr must be a finite number, got inf",
        ),
        (["--shots", "100", "--queries", "60"], "lower --shots/--queries"),
        (["--ways", "0"], "'ways' must be at least 2, got 0; fix --ways"),
        (["--lr", "-1"], "'lr' must be greater than 0, got -1.0; fix --lr"),
        (["--lr", "nan"], "'lr' must be a finite number, got nan; fix --lr"),
        (["--seed", "-1"], "'seed' must be at least 0, got -1; fix --seed"),
        (["--backbone-option", "depth=3"], "unexpected keyword argument 'depth'); it takes hidden, in_channels"),
        (["--backbone-option", "hidden=abc"], "rejected its options {'hidden': 'abc'}"),
        (["--backbone-option", "hidden"], "expects KEY=VALUE"),
        (["--resume", "--overwrite"], "contradict"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--ways", "x"], "invalid int value"),
        (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
        (["--threads", "two"], "argument --threads: expected a whole number, got 'two'"),
    ],
)
def test_bad_run_arguments_fail_cleanly_and_write_nothing(
    capsys, data_root: Path, tmp_path: Path, flags: list[str], expected: str
) -> None:
    out = tmp_path / "run"
    line = _bad(capsys, data_root, "run", *TINY, "--out", str(out), *flags)
    assert expected in line
    assert not out.exists()


def test_threads_reach_torch_in_run_and_eval_and_are_left_to_torch_by_default(
    capsys, data_root: Path, tmp_path: Path, finished_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # the process's own thread count stays as it is
    run_dir = tmp_path / "run"
    assert cli(capsys, data_root, "run", *TINY, "--out", str(run_dir), "--threads", "3")[0] == 0
    assert calls == [3]
    copy = tmp_path / "copy"
    shutil.copytree(finished_run[0], copy)
    assert cli(capsys, data_root, "eval", str(copy), "--quiet", "--threads", "2")[0] == 0
    assert calls == [3, 2]
    assert cli(capsys, data_root, "eval", str(copy), "--quiet")[0] == 0
    assert calls == [3, 2]  # no --threads: torch's own choice (e.g. OMP_NUM_THREADS) stands
    assert "argument --threads: must be at least 1" in _bad(capsys, data_root, "eval", str(copy), "--threads", "-2")


def test_unprepared_dataset_names_the_prepare_command(capsys, tmp_path: Path) -> None:
    line = _bad(
        capsys, tmp_path / "empty-root", "run", *TINY, "--dataset", "miniimagenet", "--out", str(tmp_path / "run")
    )
    assert "fewshot-sla data prepare miniimagenet" in line
    assert not (tmp_path / "run").exists()


def test_bad_config_files_fail_cleanly(capsys, data_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ways: 5\nshotz: 1\n")
    assert "line 2: unknown key 'shotz'" in _bad(
        capsys, data_root, "run", "--config", str(bad), "--out", str(tmp_path / "r")
    )
    bad.write_text("ways: [5\n")
    assert "line" in _bad(capsys, data_root, "run", "--config", str(bad), "--out", str(tmp_path / "r"))
    bad.write_bytes("seed: 3  # r\u00e9sum\u00e9\n".encode("latin1"))
    assert f"cannot read config file {bad}: it is not UTF-8 text (byte 0xe9 at offset 12)" in _bad(
        capsys, data_root, "run", "--config", str(bad), "--out", str(tmp_path / "r")
    )
    assert f"cannot read config file {tmp_path}: it is a folder, not a file; check the --config path" in _bad(
        capsys, data_root, "run", "--config", str(tmp_path), "--out", str(tmp_path / "r")
    )
    assert not (tmp_path / "r").exists()


def test_existing_and_unwritable_output_folders_are_refused(
    capsys, data_root: Path, tmp_path: Path, finished_run: tuple[Path, str]
) -> None:
    out, _ = finished_run
    mtime = (out / "results.json").stat().st_mtime_ns
    assert f"already exists; re-evaluate it with 'fewshot-sla eval {out}'" in _bad(
        capsys, data_root, "run", *TINY, "--out", str(out)
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((out / "config.yaml").read_text())
    assert "already exists; pass --resume to continue it" in _bad(
        capsys, data_root, "run", *TINY, "--out", str(unfinished)
    )
    assert "already finished" in _bad(capsys, data_root, "run", *TINY, "--out", str(out), "--resume")
    assert (out / "results.json").stat().st_mtime_ns == mtime
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "refuses to delete" in _bad(capsys, data_root, "run", *TINY, "--out", str(other), "--overwrite")
    assert (other / "notes.txt").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not a folder" in _bad(capsys, data_root, "run", *TINY, "--out", str(blocker / "run"))
    assert "nothing to resume" in _bad(capsys, data_root, "run", *TINY, "--out", str(tmp_path / "new"), "--resume")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_parent_is_refused(capsys, data_root: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "permission denied" in _bad(capsys, data_root, "run", *TINY, "--out", str(locked / "run"))
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused(capsys, data_root: Path, tmp_path: Path) -> None:
    line = _bad(capsys, data_root, "run", *TINY, "--device", "cuda", "--out", str(tmp_path / "r"))
    assert "--device cuda" in line and "--device cpu" in line
    assert not (tmp_path / "r").exists()


def test_eval_and_compare_refuse_folders_that_are_not_finished_runs(capsys, data_root: Path, tmp_path: Path) -> None:
    assert "not a finished run" in _bad(capsys, data_root, "eval", str(tmp_path))
    assert "is not a folder" in _bad(capsys, data_root, "eval", str(tmp_path / "absent"))
    (tmp_path / "config.yaml").write_text("ways: 5\n")
    assert "resume it" in _bad(capsys, data_root, "eval", str(tmp_path))
    assert "not a finished run" in _bad(capsys, data_root, "compare", str(tmp_path), str(tmp_path))


def test_episode_files_for_another_dataset_or_with_a_wrong_hash_are_refused(
    capsys, data_root: Path, tmp_path: Path, finished_run: tuple[Path, str]
) -> None:
    from fewshot_sla.data.catalog import open_store

    test = open_store("synthetic", data_root).split("test")
    order = CanonicalOrder.of_split(test)
    other = EpisodeSet.make(order, dataset="cifarfs", split="test", spec=EpisodeSpec(5, 1, 5), count=20, seed=0)
    other_path = other.save(tmp_path / "other.npz")
    line = _bad(capsys, data_root, "run", *TINY, "--episodes-file", str(other_path), "--out", str(tmp_path / "r"))
    assert "for dataset 'cifarfs'" in line
    good = EpisodeSet.make(order, dataset="synthetic", split="test", spec=EpisodeSpec(5, 1, 5), count=20, seed=1)
    path = good.save(tmp_path / "good.npz")
    tampered = tmp_path / "tampered.npz"
    data = dict(np.load(path))
    data["positions"] = data["positions"][::-1].copy()
    np.savez(tampered, **data)
    assert "hash" in _bad(
        capsys, data_root, "run", *TINY, "--episodes-file", str(tampered), "--out", str(tmp_path / "r")
    )
    wrong_spec = EpisodeSet.make(
        order, dataset="synthetic", split="test", spec=EpisodeSpec(5, 2, 5), count=20, seed=0
    ).save(tmp_path / "2shot.npz")
    assert "match --ways/--shots/--queries" in _bad(
        capsys, data_root, "run", *TINY, "--episodes-file", str(wrong_spec), "--out", str(tmp_path / "r")
    )
    assert not (tmp_path / "r").exists()
    out, _ = finished_run
    assert "for dataset 'cifarfs'" in _bad(capsys, data_root, "eval", str(out), "--episodes-file", str(other_path))
    code, printed, _ = cli(capsys, data_root, "eval", str(out), "--episodes-file", str(path), "--quiet")
    assert code == 0 and "good.npz" in printed
    # eval takes a set of another spec, and says so.
    code, printed, err = cli(capsys, data_root, "eval", str(out), "--episodes-file", str(wrong_spec), "--quiet")
    assert code == 0 and "2shot.npz" in printed
    assert "this episode set is 5-way 2-shot; the run was set up for 5-way 1-shot" in err


def test_training_benchmark_smoke_mode_runs_on_the_cpu() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_training.py"),
            "--device",
            "cpu",
            "--tiny",
            "--methods",
            "protonet",
            "maml",
            "--amp",
            "both",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SLA/baseline step cost" in proc.stdout and "episodes/s" in proc.stdout


@pytest.mark.slow
def test_the_default_call_learns_well_above_chance(capsys, data_root: Path, tmp_path: Path) -> None:
    """The documented first call (synthetic, conv4, protonet, 5-way 1-shot, rotation, sla), its full budget."""
    code, _, err = cli(capsys, data_root, "run", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"))
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ev = results["evaluation"]
    assert ev["episodes"] == 1000 and results["train"]["episodes"] == 300
    for kind in ("si", "ag"):
        assert ev["accuracy"][kind]["mean"] - ev["accuracy"][kind]["ci95"] > 40.0  # chance is 20%


def test_mixed_precision_runs_and_is_recorded(capsys, data_root: Path, tmp_path: Path) -> None:
    code, _, err = cli(
        capsys,
        data_root,
        "run",
        *TINY,
        "--amp",
        "--method",
        "metaoptnet-svm",
        "--train-episodes",
        "2",
        "--meta-batch",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["amp"] is True and results["config"]["amp"] is True
    assert results["train"]["meta_batch"] == 2 and results["method"] == "metaoptnet-svm"


def test_the_synthetic_default_is_announced_only_when_no_dataset_is_named(
    capsys, data_root: Path, tmp_path: Path
) -> None:
    code, out, _ = cli(capsys, data_root, "run", *TINY, "--out", str(tmp_path / "a"))
    assert code == 0 and "no --dataset given" in out and "fewshot-sla data prepare" in out
    code, out, _ = cli(capsys, data_root, "run", *TINY, "--dataset", "synthetic", "--out", str(tmp_path / "b"))
    assert code == 0 and "no --dataset given" not in out


def test_print_config_shows_the_resolved_recipe_and_writes_nothing(capsys, data_root: Path, tmp_path: Path) -> None:
    from fewshot_sla.config import load_config

    code, out, err = cli(
        capsys,
        data_root,
        "run",
        "--method",
        "metaoptnet-svm",
        "--dataset",
        "cifarfs",
        "--print-config",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_config(tmp_path / "printed.yaml")
    assert (printed.optimizer, printed.lr, printed.train_shots, printed.meta_batch) == ("sgd", 0.1, 5, 8)
    assert not (tmp_path / "run").exists()


def test_an_unconverged_solver_is_logged_warned_and_recorded(capsys, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, err = cli(
        capsys,
        data_root,
        "run",
        *TINY,
        "--method",
        "metaoptnet-svm",
        "--learner-option",
        "solver=interior-point",
        "--learner-option",
        "eval_iterations=1",
        "--out",
        str(out),
    )
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("fewshot-sla: warning:")]
    assert warnings and all("'svm' stopped short of its tolerance" in w for w in warnings)
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"]["diagnostics"] == {"svm_unconverged": 1.0}  # one iteration at test
    assert results["learner_settings"] == {"solver": "interior-point", "train_iterations": 15, "eval_iterations": 1}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("svm_unconverged" in r for r in steps if r["kind"] == "train")


def test_print_config_names_where_each_value_came_from_and_loads_back(capsys, data_root: Path, tmp_path: Path) -> None:
    from fewshot_sla.config import RunConfig, load_config
    from fewshot_sla.config.recipes import apply_recipe

    given = tmp_path / "given.yaml"
    given.write_text("ways: 10\nshots: 5\nseed: 4\nlearner_options:\n  scale: 2.0\n")
    code, out, err = cli(
        capsys,
        data_root,
        "run",
        "--config",
        str(given),
        "--seed",
        "7",  # a flag wins over the file
        "--lr",
        "0.05",
        "--set",
        "momentum=0.5",
        "--learner-option",
        "extra={a: [1, 2], b: {c: 3}}",  # merged with the file's, written on several lines
        "--print-config",
    )
    assert code == 0, err
    origins = {
        line.split(":")[0]: line.split("  # ")[1] for line in out.splitlines() if "  # " in line and line[0] != "#"
    }
    assert origins["ways"] == origins["shots"] == "config file"
    assert origins["seed"] == origins["lr"] == origins["momentum"] == "flag"
    assert origins["train_episodes"] == origins["optimizer"] == origins["val_every"] == "recipe"
    assert origins["method"] == origins["eval_episodes"] == origins["device"] == "default"
    assert "\n# learner_options: flag\nlearner_options:\n" in out and out.startswith("# fewshot-sla run configuration")
    assert set(origins) | {"learner_options"} == set(RunConfig.field_names())
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_config(tmp_path / "printed.yaml")
    expected = RunConfig(
        ways=10,
        shots=5,
        seed=7,
        lr=0.05,
        momentum=0.5,
        learner_options={"scale": 2.0, "extra": {"a": [1, 2], "b": {"c": 3}}},
    )
    assert printed == apply_recipe(expected)
    # passed back with --config it prints the same configuration, every value now from the file
    code, again, err = cli(capsys, data_root, "run", "--config", str(tmp_path / "printed.yaml"), "--print-config")
    assert code == 0, err

    def values(text: str) -> list[str]:
        return [line.split("  # ")[0] for line in text.splitlines() if not line.startswith("#")]

    assert values(again) == values(out) == printed.to_yaml().splitlines()
    assert "# default" not in again and "# recipe" not in again and "# learner_options: config file\n" in again


def test_run_flags_are_the_fields_flags_with_their_help_and_defaults(capsys) -> None:
    from fewshot_sla.config import help_text, knobs
    from fewshot_sla.registry import ALL_REGISTRIES

    names = {kind: ", ".join(registry.names()) for kind, registry in ALL_REGISTRIES.items()}
    try:
        main(["run", "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    text = "".join(capsys.readouterr().out.split())  # help wraps lines, within words too
    for name, knob in knobs().items():
        if knob.flag is None:
            assert f"[--{name.replace('_', '-')}" not in text, name
            continue
        assert f"[{knob.flag}" in text, name
        shown = help_text(name).format_map(names)  # the default too, e.g. "test ways (default 5)"
        assert "".join(shown.split()) in text, name


def test_library_notes_and_warnings_reach_the_console_once_through_logging(
    tmp_path: Path, capsys: pytest.CaptureFixture, small_synthetic: int
) -> None:
    """The library logs (``fewshot_sla.*`` loggers); the CLI shows each record as one ``fewshot-sla:`` line."""
    import logging

    assert main(["--data-root", str(tmp_path), "data", "info", "synthetic"]) == 0
    err = capsys.readouterr().err.splitlines()
    generated = [line for line in err if "generating the synthetic dataset" in line]
    assert generated == [
        f"fewshot-sla: generating the synthetic dataset into {tmp_path / 'synthetic.h5'} (one-off, a few seconds)"
    ]
    logging.getLogger("fewshot_sla.engine.callbacks").warning("the solver stopped short")
    assert capsys.readouterr().err == "fewshot-sla: warning: the solver stopped short\n"
