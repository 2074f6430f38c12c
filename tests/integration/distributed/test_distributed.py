"""Several processes (torchrun, gloo on the CPU) against one: same parameters, same per-episode results, one writer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_sla.cli import main

# No batch statistics (conv4 without BatchNorm), no augmentation: 2 processes must equal 1 up to rounding.
RIDGE = [
    "--method",
    "metaoptnet-ridge",
    "--meta-batch",
    "4",
    "--train-episodes",
    "80",
    "--val-every",
    "40",
    "--val-episodes",
    "10",
    "--eval-episodes",
    "24",
    "--device",
    "cpu",
    "--quiet",
    "--backbone-option",
    "hidden=8",
    "--backbone-option",
    "batch_norm=false",
]
# Second-order MAML keeps BatchNorm: it normalises each episode on its own, so the split of episodes is exact too.
MAML = [
    "--method",
    "maml",
    "--meta-batch",
    "2",
    "--train-episodes",
    "16",
    "--val-every",
    "16",
    "--val-episodes",
    "4",
    "--eval-episodes",
    "4",
    "--device",
    "cpu",
    "--quiet",
    "--backbone-option",
    "hidden=4",
    "--learner-option",
    "train_steps=2",
    "--learner-option",
    "test_steps=2",
    "--train-queries",
    "3",
]


def torchrun_command(data_root: Path, *args: str, processes: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "fewshot_sla",
        "--data-root",
        str(data_root),
        *args,
    ]


def torchrun(data_root: Path, *args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(data_root, *args, processes=processes),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_process(data_root: Path, *args: str) -> int:
    """``fewshot-sla`` in this process with one thread, as each torchrun process has (rounding then agrees)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["--data-root", str(data_root), *args])
    finally:
        torch.set_num_threads(threads)


def our_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("fewshot-sla: error:")]


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_parameters(a: Path, b: Path) -> None:
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-5, atol=1e-5, msg=key)


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.fixture(scope="module")
def single(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert one_process(data_root, "run", *RIDGE, "--out", str(out)) == 0
    return out


def test_two_processes_train_the_parameters_of_one_and_only_process_0_writes(data_root, single, tmp_path) -> None:
    out = tmp_path / "run"
    proc = torchrun(data_root, "run", *RIDGE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_parameters(single, out)  # 20 steps of 2 x 2 episodes against 20 steps of 4
    assert files(out) == files(single)  # one writer: no second copy of anything, no temporary file left
    ours = json.loads((out / "results.json").read_text())
    theirs = json.loads((single / "results.json").read_text())
    assert ours["memory"]["processes"] == 2 and theirs["memory"]["processes"] == 1
    for kind, summary in theirs["evaluation"]["accuracy"].items():
        assert ours["evaluation"]["accuracy"][kind]["mean"] == pytest.approx(summary["mean"])
    assert proc.stdout.count("results: ") == 1  # the summary table is printed once, by process 0


def test_evaluation_is_sharded_with_the_one_process_per_episode_results(data_root, single, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(single, one)
    shutil.copytree(single, two)
    assert one_process(data_root, "eval", str(one), "--eval-episodes", "30", "--quiet") == 0
    proc = torchrun(data_root, "eval", str(two), "--eval-episodes", "30", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((one / "results.json").read_text())["evaluation"]
    assert json.loads((two / "results.json").read_text())["evaluation"]["episode_set"] == evaluation["episode_set"]
    with np.load(one / evaluation["per_episode_file"]) as a, np.load(two / evaluation["per_episode_file"]) as b:
        assert set(a.files) == set(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])  # in episode order, identical


def test_a_run_resumes_with_another_number_of_processes(data_root, single, tmp_path) -> None:
    out = tmp_path / "run"
    assert one_process(data_root, "run", *RIDGE, "--out", str(out), "--max-steps", "9") == 0
    proc = torchrun(data_root, "run", *RIDGE, "--out", str(out), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_parameters(single, out)


# The pretraining regime with SLA's joint labels: RIDGE's run with 10 steps of 8 images instead of 4 episodes.
PRETRAIN = ["--method", "pretrain", "--objective", "sla", *RIDGE[2:]]
PRETRAIN[PRETRAIN.index("--meta-batch") + 1] = "8"


def test_pretraining_trains_the_same_over_two_processes(data_root, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert one_process(data_root, "run", *PRETRAIN, "--out", str(one)) == 0
    proc = torchrun(data_root, "run", *PRETRAIN, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_parameters(one, two)  # each process classifies 4 of the 8 images of every step


def test_second_order_maml_trains_the_same_over_two_processes(data_root, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert one_process(data_root, "run", *MAML, "--out", str(one)) == 0
    proc = torchrun(data_root, "run", *MAML, "--out", str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_parameters(one, two)


@pytest.mark.parametrize(
    ("flags", "processes", "expected"),
    [
        (
            ["--meta-batch", "3"],
            2,
            "2 processes cannot share a meta-batch of 3 episodes evenly; use a process count in [1, 3]",
        ),
        (["--dist-backend", "nccl"], 2, "--dist-backend nccl needs GPUs, but this run is on the CPU"),
        (
            [],
            (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) + 1,
            "CPU core(s) for them; use --nproc-per-node",
        ),
    ],
    ids=["uneven-meta-batch", "nccl-on-cpu", "more-processes-than-cores"],
)
def test_bad_launches_end_in_one_line_and_write_nothing(data_root, tmp_path, flags, processes, expected) -> None:
    out = tmp_path / "run"
    proc = torchrun(data_root, "run", *RIDGE, "--out", str(out), *flags, processes=processes)
    assert proc.returncode != 0
    errors = our_errors(proc.stderr)
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_a_process_that_dies_ends_the_run_in_one_line_and_it_resumes(data_root, single, tmp_path) -> None:
    out = tmp_path / "run"
    args = [*RIDGE, "--train-episodes", "100000", "--val-every", "20", "--out", str(out)]
    command = torchrun_command(data_root, "run", *args)
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    victims = [pid for pid in _children(launcher.pid) if _environ(pid).get("RANK") == "1"]
    assert victims, "no rank-1 process found"
    os.kill(victims[0], signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    errors = our_errors(err)
    assert len(errors) <= 1 and all("lost contact with another process" in e for e in errors), err[-3000:]
    assert not list(out.rglob("*.tmp"))  # no half-written checkpoint
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert step >= 5
    # The folder resumes (here in one process) from its last checkpoint.
    assert main(["--data-root", str(data_root), "run", *args, "--resume", "--max-steps", str(step + 2)]) == 0


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
