"""Running grids: skip finished cells, resume unfinished ones, survive failing ones, local and Slurm executors."""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import pytest

from fewshot_sla.cli import main
from fewshot_sla.config import load_config
from fewshot_sla.config.grid import Grid, load_grid
from fewshot_sla.errors import UserError
from fewshot_sla.leaderboard.executors import (
    CELLS_DIR,
    CellOutcome,
    CellTask,
    LocalExecutor,
    SlurmExecutor,
    last_error_line,
    run_grid,
)
from fewshot_sla.results import RunPaths, load_results

GRID = """\
name: small
datasets: [synthetic]
methods: [protonet]
backbones: conv4
variants:
  - {transform: none, objective: baseline}
  - {transform: rotation, objective: sla}
shots: [1, 5]
settings: {train_episodes: 10}
"""


@pytest.fixture
def grid(tmp_path: Path) -> Grid:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return load_grid(path)


def finish(run_dir: Path) -> None:
    """What a finished run leaves behind, as far as the executors look: config.yaml and results.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    RunPaths(run_dir).config.write_text("method: protonet\n")
    RunPaths(run_dir).results.write_text("{}\n")


class FakeRunner:
    """Records the tasks it gets; fails the cells whose name contains one of ``fail``, raises for ``crash``."""

    def __init__(self, fail: tuple[str, ...] = (), crash: tuple[str, ...] = (), delay: float = 0.0) -> None:
        self.fail, self.crash, self.delay = fail, crash, delay
        self.tasks: list[CellTask] = []
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, task: CellTask) -> CellOutcome:
        with self.lock:
            self.tasks.append(task)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.delay)
            if any(key in task.name for key in self.crash):
                raise RuntimeError("runner crashed")
            if any(key in task.name for key in self.fail):
                return CellOutcome(task.name, "failed", 0.0, "bad cell: shots too large", task.log_file)
            finish(task.run_dir)
            return CellOutcome(task.name, "finished", 0.0, None, task.log_file)
        finally:
            with self.lock:
                self.running -= 1


def test_finished_cells_are_skipped_and_unfinished_ones_resumed(grid: Grid, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done, interrupted, *fresh = [c.name for c in grid.cells]
    finish(runs / done)
    (runs / interrupted).mkdir(parents=True)
    RunPaths(runs / interrupted).config.write_text("method: protonet\n")  # started, no results.json yet
    runner = FakeRunner()
    report = run_grid(grid, runs, LocalExecutor(runner=runner), stream=io.StringIO())
    assert report.skipped == [done]
    assert {t.name: t.resume for t in runner.tasks} == {interrupted: True, **{name: False for name in fresh}}
    assert [o.status for o in report.outcomes] == ["finished"] * 3 and not report.failed
    assert all("--resume" in t.argv() for t in runner.tasks if t.resume)
    assert all("--resume" not in t.argv() for t in runner.tasks if not t.resume)
    again = FakeRunner()
    report = run_grid(grid, runs, LocalExecutor(runner=again), stream=io.StringIO())
    assert again.tasks == [] and len(report.skipped) == 4


def test_cell_folders_and_configs_are_deterministic(grid: Grid, tmp_path: Path) -> None:
    runner = FakeRunner()
    run_grid(grid, tmp_path / "runs", LocalExecutor(runner=runner), stream=io.StringIO())
    for cell in grid.cells:
        task = next(t for t in runner.tasks if t.name == cell.name)
        assert task.run_dir == (tmp_path / "runs" / cell.name).resolve()
        assert task.config_file == (tmp_path / "runs" / CELLS_DIR / f"{cell.name}.yaml").resolve()
        assert load_config(task.config_file) == cell.config
        argv = task.argv()
        assert argv[argv.index("--config") + 1] == str(task.config_file)
        assert argv[argv.index("--out") + 1] == str(task.run_dir)


def test_a_failing_cell_does_not_stop_the_others(grid: Grid, tmp_path: Path) -> None:
    runner = FakeRunner(fail=("5w1s-rotation",), crash=("5w5s-none",))
    stream = io.StringIO()
    report = run_grid(grid, tmp_path / "runs", LocalExecutor(runner=runner), stream=stream)
    assert len(runner.tasks) == 4
    statuses = {o.name.split("-")[3] + "-" + o.name.split("-")[4]: o.status for o in report.outcomes}
    assert statuses == {
        "5w1s-none": "finished",
        "5w5s-none": "failed",
        "5w1s-rotation": "failed",
        "5w5s-rotation": "finished",
    }
    summary = report.summary()
    assert "2 cell(s) finished, 0 skipped (already finished), 2 failed" in summary
    assert "bad cell: shots too large" in summary and "RuntimeError: runner crashed" in summary
    assert "[4/4]" in stream.getvalue()


def test_parallel_cells_share_the_cores(grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = FakeRunner(delay=0.3)
    report = run_grid(grid, tmp_path / "runs", LocalExecutor(jobs=2, runner=runner), stream=io.StringIO())
    assert len(report.outcomes) == 4 and not report.failed
    assert runner.most_at_once == 2
    assert all(t.env.get("OMP_NUM_THREADS") for t in runner.tasks)


def test_last_error_line_prefers_the_cli_error(tmp_path: Path) -> None:
    log = tmp_path / "cell.log"
    log.write_text("$ python -m fewshot_sla run\nsome output\nfewshot-sla: error: test episodes: need 20 images\n")
    assert last_error_line(log) == "test episodes: need 20 images"
    log.write_text("$ cmd\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n")
    assert last_error_line(log) == "RuntimeError: CUDA out of memory"
    log.write_text("$ cmd\nfewshot-sla: error: an old attempt's error\n$ cmd --resume\nKeyError: 'x'\n")
    assert last_error_line(log) == "KeyError: 'x'"
    log.write_text("$ cmd\n")
    assert last_error_line(log) is None


def test_jobs_must_be_positive() -> None:
    with pytest.raises(UserError, match=r"^jobs must be a positive integer"):
        LocalExecutor(jobs=0)


def _slurm_fake_runner(task: CellTask) -> CellOutcome:
    """Runs inside a submitit job process (pickled by value): fails rotation cells, finishes the others."""
    if "-rotation-" in task.name:
        return CellOutcome(task.name, "failed", 0.0, "bad cell in a job", task.log_file)
    finish(task.run_dir)
    return CellOutcome(task.name, "finished", 0.0, None, task.log_file)


def test_slurm_executor_submits_one_job_per_pending_cell(grid: Grid, tmp_path: Path) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'fewshot-sla[slurm]')")
    import cloudpickle

    runs = tmp_path / "runs"
    finish(runs / grid.cells[0].name)
    executor = SlurmExecutor(
        tmp_path / "jobs",
        {"timeout_min": 5, "slurm_partition": "gpu"},
        jobs=2,
        cluster="local",
        runner=_slurm_fake_runner,
    )
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        report = run_grid(grid, runs, executor, stream=io.StringIO())
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert report.skipped == [grid.cells[0].name]
    assert {o.name for o in report.outcomes} == {c.name for c in grid.cells[1:]}
    assert sorted(o.status for o in report.outcomes) == ["failed", "failed", "finished"]
    assert all(o.error == "bad cell in a job" for o in report.failed)
    results = sorted(p.name for p in (tmp_path / "jobs").glob("*_result.pkl"))
    assert len(results) == 3  # one job per pending cell
    assert RunPaths(runs / grid.cells[1].name).results.is_file()


def test_slurm_parameters_and_missing_submitit_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'fewshot-sla[slurm]')")
    with pytest.raises(UserError, match="bad slurm parameters in the grid") as info:
        SlurmExecutor(tmp_path / "jobs", {"slurm_partitoin": "gpu"}, cluster="local")
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(UserError, match=r"pip install 'fewshot-sla\[slurm\]'"):
        SlurmExecutor(tmp_path / "jobs", {}, cluster="local")


REAL_GRID = """\
datasets: [synthetic]
methods: [protonet]
backbones: conv4
variants: [{transform: none, objective: baseline}]
shots: SHOTS
settings: {train_episodes: 4, val_every: 2, val_episodes: 4, eval_episodes: 10, queries: 5, image_size: 16,
           device: cpu, backbone_options: {hidden: 8}}
"""


def test_a_real_failing_cell_is_reported_with_its_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real `fewshot-sla run` process that fails (more shots than the synthetic classes hold)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(REAL_GRID.replace("SHOTS", "200"))
    runs = tmp_path / "runs"
    assert main(["--data-root", str(tmp_path / "data"), "leaderboard", "run", str(grid), "--runs-dir", str(runs)]) == 1
    err = capsys.readouterr().err
    assert "0 cell(s) finished, 0 skipped (already finished), 1 failed" in err
    (failed,) = [line for line in err.splitlines() if line.startswith("  FAILED")]
    assert "-5w200s-" in failed and "200 shots" in failed and "log:" in failed and "Traceback" not in err
    assert [p.name for p in runs.iterdir() if not p.name.startswith((".", "_"))] == []


@pytest.mark.slow
def test_one_real_cell_is_resumed_and_finished_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny real synthetic cell, interrupted after 2 of its 4 training episodes, then finished by the grid run."""
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(REAL_GRID.replace("SHOTS", "1"))
    (cell,) = load_grid(grid_file).cells
    runs, data = tmp_path / "runs", tmp_path / "data"
    config = tmp_path / "cell.yaml"
    config.write_text(cell.to_yaml(tmp_path))
    assert (
        main(
            [
                "--data-root",
                str(data),
                "run",
                "--config",
                str(config),
                "--out",
                str(runs / cell.name),
                "--max-steps",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert not RunPaths(runs / cell.name).results.is_file()
    argv = ["--data-root", str(data), "leaderboard", "run", str(grid_file), "--runs-dir", str(runs)]
    assert main(argv) == 0
    assert "1 to resume, 0 to start" in capsys.readouterr().err
    assert "--resume" in (runs / "_logs" / f"{cell.name}.log").read_text()
    result = load_results(runs / cell.name)
    assert result.data["train"]["episodes"] == 4 and result.evaluation["episodes"] == 10
    assert main(argv) == 0
    assert "0 cell(s) finished, 1 skipped" in capsys.readouterr().err
    assert main(["leaderboard", "build", str(runs), "--out", str(tmp_path / "board")]) == 0
    assert "synthetic" in (tmp_path / "board" / "leaderboard.md").read_text()


def test_a_slurm_job_of_two_tasks_runs_the_cell_as_one_distributed_run(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's local executor starts two tasks (as Slurm would on a node); each runs one process of the cell."""
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'fewshot-sla[slurm]')")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_PORT", "29731")  # else submitit draws one from the job id
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        REAL_GRID.replace("SHOTS", "1")
        .replace("methods: [protonet]", "methods: [metaoptnet-ridge]")
        .replace("device: cpu,", "device: cpu, meta_batch: 2,")
    )
    grid = load_grid(grid_file)
    executor = SlurmExecutor(tmp_path / "jobs", {"timeout_min": 5, "tasks_per_node": 2}, cluster="local")
    report = run_grid(grid, tmp_path / "runs", executor, data_root=data_root, stream=io.StringIO())
    assert [o.status for o in report.outcomes] == ["finished"], report.summary()
    (cell,) = grid.cells
    results = load_results(tmp_path / "runs" / cell.name)
    assert results.data["memory"]["processes"] == 2
    logs = sorted(p.name for p in (tmp_path / "runs" / "_logs").iterdir())
    assert logs == [f"{cell.name}.log", f"{cell.name}.rank1.log"]


CHAIN = """\
name: chain
datasets: [synthetic]
methods:
  - pretrain
  - method: nearest-centroid
    init_from: {method: pretrain}
backbones: conv4
variants:
  - {transform: none, objective: baseline}
  - {transform: rotation, objective: sla}
shots: [1]
settings: {train_episodes: 10}
"""


def test_a_cell_started_from_another_runs_after_it_with_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(CHAIN)
    cells = {(c.config.method, c.config.objective): c for c in load_grid(path).cells}
    runner = FakeRunner()
    runs = tmp_path / "runs"
    report = run_grid(load_grid(path), runs, LocalExecutor(jobs=2, runner=runner), stream=io.StringIO())
    assert not report.failed
    order = [task.name for task in runner.tasks]
    for objective in ("baseline", "sla"):
        source, started = cells[("pretrain", objective)], cells[("nearest-centroid", objective)]
        assert started.source == source.name and order.index(source.name) < order.index(started.name)
        assert load_config(runs / CELLS_DIR / f"{started.name}.yaml").init_from == str(runs.resolve() / source.name)
        assert load_config(runs / CELLS_DIR / f"{source.name}.yaml").init_from is None


def test_a_cell_whose_source_fails_is_not_run(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(CHAIN)
    grid = load_grid(path)
    failing = next(c for c in grid.cells if c.config.method == "pretrain" and c.config.objective == "sla")
    runner = FakeRunner(fail=(failing.name,))
    report = run_grid(grid, tmp_path / "runs", LocalExecutor(runner=runner), stream=io.StringIO())
    dependent = next(c for c in grid.cells if c.source == failing.name)
    assert dependent.name not in [task.name for task in runner.tasks]
    assert {o.name: o.error for o in report.failed} == {
        failing.name: "bad cell: shots too large",
        dependent.name: f"not run: the cell it starts from, {failing.name}, did not finish",
    }
    assert len(runner.tasks) == 3  # the other chain ran
