"""Running a grid's cells: skip finished ones, resume interrupted ones, survive failing ones.

Each cell runs as its own ``fewshot-sla run --config CELL.yaml --out RUNS_DIR/<cell>`` process (with
``--resume`` when the folder holds an unfinished run), so a crash in one cell cannot take the others down
and the run command's own resume logic is reused as it is. Under ``RUNS_DIR``:

    <cell>/           the run folder (``results.json`` inside marks the cell finished)
    _cells/<cell>.yaml  the configuration the cell was started with
    _logs/<cell>.log    the cell's console output (its last error line is reported)
    _slurm/             submitit's job files (``--executor slurm`` only)

Executors: ``LocalExecutor`` (one cell after another, or N processes at once) and ``SlurmExecutor``
(one submitit job per cell, submitted as one job array; submitit is imported only when it is used).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

from fewshot_sla.atomic import write_text_atomic
from fewshot_sla.config.grid import Grid
from fewshot_sla.data.catalog import open_store
from fewshot_sla.engine.memory import CONCURRENT_RUNS_VAR
from fewshot_sla.errors import UserError, command, setting
from fewshot_sla.preemption import PREEMPTION_SIGNALS, Preempted
from fewshot_sla.results import RunPaths

log = logging.getLogger(__name__)

CELLS_DIR = "_cells"
LOGS_DIR = "_logs"
SLURM_DIR = "_slurm"
LOCK_FILE = ".leaderboard.lock"
EXIT_INTERRUPTED = 130
# Exit codes of a cell that stopped and saved its state: Ctrl-C, or a preemption signal (128 + signal number).
SAVED_STOP_CODES = (EXIT_INTERRUPTED, *(128 + s for s in PREEMPTION_SIGNALS))


@dataclass(frozen=True)
class CellTask:
    """Everything needed to run one cell in a fresh process (picklable, paths absolute)."""

    name: str
    run_dir: Path
    config_file: Path
    log_file: Path
    resume: bool
    data_root: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The ``fewshot-sla run`` command line of this cell."""
        root = ["--data-root", self.data_root] if self.data_root else []
        return [
            sys.executable,
            "-m",
            "fewshot_sla",
            *root,
            "run",
            "--config",
            str(self.config_file),
            "--out",
            str(self.run_dir),
            "--quiet",
            *(["--resume"] if self.resume else []),
        ]


@dataclass(frozen=True)
class CellOutcome:
    """How a cell ended: ``finished``, ``failed`` (with its error line) or ``interrupted``."""

    name: str
    status: str
    seconds: float
    error: str | None = None
    log_file: Path | None = None


CellRunner = Callable[[CellTask], CellOutcome]


def run_cell(task: CellTask) -> CellOutcome:
    """Run one cell as a ``fewshot-sla run`` process, its output going to the cell's log file.

    In a Slurm job of several tasks (``slurm: {nodes: n, tasks_per_node: g}``), every task runs this: each starts
    one process of the cell's distributed run, with the rendezvous that submitit's ``TorchDistributedEnvironment``
    derives from the job (process 0 writes the run and ``<cell>.log``; process r logs to ``<cell>.rank<r>.log``).
    """
    env = {**os.environ, **task.env}
    log_file = task.log_file
    processes = slurm_processes()
    if processes is not None:
        env.update(processes)
        if processes["RANK"] != "0":
            log_file = log_file.with_name(f"{log_file.stem}.rank{processes['RANK']}{log_file.suffix}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "ab") as log:
        log.write(f"$ {' '.join(task.argv())}\n".encode())
        log.flush()
        try:
            child = subprocess.Popen(
                task.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        except OSError as err:
            return CellOutcome(task.name, "failed", time.perf_counter() - start, f"cannot start: {err}", log_file)
        with _running(child):
            code = child.wait()
    seconds = time.perf_counter() - start
    if processes is not None and processes["RANK"] != "0":  # process 0 writes results.json and reports the cell
        status = "finished" if code == 0 else "interrupted" if code in SAVED_STOP_CODES else "failed"
        return CellOutcome(task.name, status, seconds, None if code == 0 else last_error_line(log_file), log_file)
    if code == 0 and RunPaths(task.run_dir).results.is_file():
        return CellOutcome(task.name, "finished", seconds, None, task.log_file)
    if code in SAVED_STOP_CODES:
        return CellOutcome(task.name, "interrupted", seconds, "interrupted (state saved)", task.log_file)
    reason = last_error_line(task.log_file) or f"exit code {code} without results.json"
    return CellOutcome(task.name, "failed", seconds, reason, task.log_file)


_CHILDREN: set[subprocess.Popen] = set()  # the cells' processes running now (threads of a local grid add theirs)
_CHILDREN_LOCK = threading.Lock()


@contextlib.contextmanager
def _running(child: subprocess.Popen) -> Iterator[None]:
    """Track ``child`` while it runs. If this process is stopped (a preemption signal, Ctrl-C, submitit's exit
    after a requeue), the cell is asked to save and stop with SIGTERM and waited for, never killed outright."""
    with _CHILDREN_LOCK:
        _CHILDREN.add(child)
    try:
        yield
    except BaseException:
        stop_cells(signal.SIGTERM)
        raise
    finally:
        with _CHILDREN_LOCK:
            _CHILDREN.discard(child)


def stop_cells(signum: int) -> None:
    """Send ``signum`` to every running cell (each saves its state at its current step and exits) and wait for
    them to exit."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
    for child in children:
        with contextlib.suppress(Preempted, KeyboardInterrupt):  # a second signal must not orphan a cell
            child.wait()


class RequeueableCell:
    """A cell as a submitit job that Slurm may preempt: submitit calls ``checkpoint`` on the preemption signal
    (SIGUSR2 by default); the running cell saves its state, and the job is requeued to resume it."""

    def __init__(self, runner: CellRunner = run_cell) -> None:
        self.runner = runner

    def __call__(self, task: CellTask) -> CellOutcome:
        if cell_state(task.run_dir) == "finished":  # it finished just as the preemption signal came
            return CellOutcome(task.name, "finished", 0.0, None, task.log_file)
        return self.runner(task)

    def checkpoint(self, task: CellTask) -> Any:
        """Stop the running cell (it saves its state) and return the submission that resumes it."""
        from submitit.helpers import DelayedSubmission

        stop_cells(signal.SIGTERM)
        return DelayedSubmission(self, replace(task, resume=cell_state(task.run_dir) == "resume"))


def slurm_processes() -> dict[str, str] | None:
    """The torch.distributed environment of this task when it runs in a submitit job of several tasks (from
    ``submitit.helpers.TorchDistributedEnvironment``), else None."""
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return None
    try:
        job = submitit.JobEnvironment()
        if job.num_tasks <= 1:
            return None
        dist = TorchDistributedEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None
    return {
        "MASTER_ADDR": str(dist.master_addr),
        "MASTER_PORT": str(dist.master_port),
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size),
    }


def last_error_line(log_file: Path) -> str | None:
    """The latest attempt's ``fewshot-sla: error:`` line in a cell log, else its last non-empty line (a
    traceback's exception); attempts are appended to one log, each starting with its ``$ command`` line."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    lines = lines[starts[-1] + 1 :] if starts else lines
    errors = [line for line in lines if line.startswith("fewshot-sla: error:")]
    if errors:
        return errors[-1].removeprefix("fewshot-sla: error:").strip()
    return lines[-1] if lines else None


def cell_state(run_dir: Path) -> str:
    """``finished`` (results.json present), ``resume`` (an unfinished run is there) or ``new``."""
    paths = RunPaths(run_dir)
    if paths.results.is_file():
        return "finished"
    return "resume" if paths.config.is_file() else "new"


@dataclass(frozen=True)
class GridPlan:
    """What a grid run will do: the cells already finished, and a task for every other cell."""

    runs_dir: Path
    data_root: str | None
    finished: list[str]
    tasks: list[CellTask]


def plan_grid(grid: Grid, runs_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> GridPlan:
    """Sort the grid's cells into finished ones and tasks (new or resumed), without writing anything."""
    runs = runs_folder(runs_dir)
    root = data_root if data_root is not None else grid.data_root
    root_text = str(Path(root).expanduser().resolve()) if root is not None else None
    finished, tasks = [], []
    for cell in grid.cells:
        run_dir = runs / cell.name
        state = cell_state(run_dir)
        if state == "finished":
            finished.append(cell.name)
            continue
        tasks.append(
            CellTask(
                cell.name,
                run_dir,
                runs / CELLS_DIR / f"{cell.name}.yaml",
                runs / LOGS_DIR / f"{cell.name}.log",
                state == "resume",
                root_text,
            )
        )
    return GridPlan(runs, root_text, finished, tasks)


def check_stores(grid: Grid, plan: GridPlan) -> None:
    """Open the store of every dataset a pending cell needs, before anything runs: a missing store is one
    UserError naming the prepare command, and a generated set (synthetic) is built here once, not by every
    parallel cell at the same time."""
    cells = {cell.name: cell for cell in grid.cells}
    for dataset in sorted({cells[t.name].values["dataset"] for t in plan.tasks}):
        try:
            open_store(dataset, plan.data_root)
        except UserError as err:
            raise UserError(f"grid {grid.name}: {err}") from None


def runs_folder(runs_dir: str | os.PathLike) -> Path:
    """``runs_dir`` as an absolute path; an existing file there is a UserError."""
    runs = Path(runs_dir).resolve()
    if runs.exists() and not runs.is_dir():
        raise UserError(f"{setting('runs_dir')} {runs} is a file; choose a folder")
    return runs


def write_cell_configs(grid: Grid, plan: GridPlan) -> None:
    """Write the configuration file of every pending cell (atomically)."""
    cells = {cell.name: cell for cell in grid.cells}
    for task in plan.tasks:
        write_text_atomic(task.config_file, cells[task.name].to_yaml(plan.runs_dir))


class Executor(Protocol):
    """Runs tasks, calling ``report`` as each one ends, and returns every outcome."""

    def run(self, tasks: Sequence[CellTask], report: Callable[[CellOutcome], None]) -> list[CellOutcome]:
        """Run every task; never raise for a failing cell."""
        ...


class LocalExecutor:
    """Cells on this machine: one after another, or ``jobs`` processes at once."""

    def __init__(self, jobs: int = 1, runner: CellRunner = run_cell) -> None:
        if jobs < 1:
            raise UserError(f"{setting('jobs')} must be a positive integer, got {jobs}")
        self.jobs = jobs
        self.runner = runner

    def run(self, tasks: Sequence[CellTask], report: Callable[[CellOutcome], None]) -> list[CellOutcome]:
        """Run the tasks; on Ctrl-C, start no new cell and let the running ones save their state."""
        tasks = [self._with_threads(t) for t in tasks]
        outcomes: list[CellOutcome] = []
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = {pool.submit(self._guarded, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                outcomes.append(future.result())
                report(outcomes[-1])
        except (KeyboardInterrupt, Preempted) as stop:
            if isinstance(stop, Preempted):  # SIGTERM reached this process only: pass it on to the cells
                stop_cells(stop.signum)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return outcomes

    def _guarded(self, task: CellTask) -> CellOutcome:
        """The runner's outcome; an exception inside the runner itself becomes a failed cell."""
        start = time.perf_counter()
        try:
            return self.runner(task)
        except Exception as err:
            return CellOutcome(
                task.name, "failed", time.perf_counter() - start, f"{type(err).__name__}: {err}", task.log_file
            )

    def _with_threads(self, task: CellTask) -> CellTask:
        """Split the CPU cores between parallel cells (unless the user set OMP_NUM_THREADS), and tell each cell
        how many runs share the machine (its memory budget is a share of it)."""
        if self.jobs == 1:
            return task
        if "OMP_NUM_THREADS" in os.environ:
            return replace(task, env={**task.env, CONCURRENT_RUNS_VAR: str(self.jobs)})
        threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return replace(task, env={**task.env, "OMP_NUM_THREADS": threads, CONCURRENT_RUNS_VAR: str(self.jobs)})


class SlurmExecutor:
    """One submitit job per cell, submitted as one job array, waited for until every job has ended.

    ``parameters`` are submitit's (``timeout_min``, ``gpus_per_node``, ``slurm_partition``, ...); ``jobs``
    caps how many array tasks run at once. ``cluster="local"`` runs the same jobs as local processes.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        parameters: dict[str, Any] | None = None,
        jobs: int | None = None,
        cluster: str = "slurm",
        runner: CellRunner = run_cell,
    ) -> None:
        submitit = import_submitit()
        try:
            self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"cannot use the submitit '{cluster}' executor here: {_one_line(err)}") from None
        params = {"name": "fewshot-sla", **(parameters or {})}
        if jobs is not None:
            params["slurm_array_parallelism"] = jobs
        try:
            self.executor.update_parameters(**params)
        except (NameError, ValueError, TypeError, AssertionError) as err:
            raise UserError(
                f"bad slurm parameters in the grid: {_one_line(err)}; fix the grid's 'slurm:' block"
            ) from None
        self.runner = runner

    def run(self, tasks: Sequence[CellTask], report: Callable[[CellOutcome], None]) -> list[CellOutcome]:
        """Submit every task as one array, then collect the outcomes as the jobs end."""
        if not tasks:
            return []
        with self.executor.batch():
            jobs = [self.executor.submit(RequeueableCell(self.runner), task) for task in tasks]
        log.info(
            "submitted %d job(s): %s%s (job files in %s)",
            len(jobs),
            ", ".join(j.job_id for j in jobs[:3]),
            " ..." if len(jobs) > 3 else "",
            self.executor.folder,
        )
        outcomes = []
        try:
            for job, task in zip(jobs, tasks):
                start = time.perf_counter()
                try:
                    outcome = job.results()[0]  # a job of several tasks: process 0's outcome is the cell's
                except Exception as err:
                    outcome = CellOutcome(
                        task.name,
                        "failed",
                        time.perf_counter() - start,
                        f"slurm job {job.job_id}: {_last_line(err)}",
                        task.log_file,
                    )
                outcomes.append(outcome)
                report(outcome)
        except KeyboardInterrupt:
            # Cancel what is still queued or running, so that a rerun never races a live job on one folder.
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)
            raise
        return outcomes


def import_submitit() -> Any:
    """The submitit module, or a UserError saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "the slurm executor needs submitit; install it with "
            "\"pip install 'fewshot-sla[slurm]'\" (or 'pip install submitit')"
        ) from None
    return submitit


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def runs_dir_lock(runs_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``runs_dir`` so that two grid runs never work on the same cells at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(
                f"another '{command('leaderboard run')}' is working in {runs_dir}; wait for it to end "
                f"or choose another {setting('runs_dir')}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class GridReport:
    """The end of a grid run: what was skipped, what finished, what failed (with error lines)."""

    skipped: list[str]
    outcomes: list[CellOutcome]
    interrupted: bool = False
    stopped_by: int | None = None  # the preemption signal that stopped the grid (None: Ctrl-C, or not stopped)

    @property
    def failed(self) -> list[CellOutcome]:
        """Cells that failed or were interrupted."""
        return [o for o in self.outcomes if o.status != "finished"]

    def summary(self) -> str:
        """A few lines: counts, then one line per failed cell with its error and log file."""
        done = sum(o.status == "finished" for o in self.outcomes)
        lines = [
            f"{done} cell(s) finished, {len(self.skipped)} skipped (already finished), "
            f"{len(self.failed)} failed or interrupted"
        ]
        lines += [f"  FAILED {o.name}: {o.error} (log: {o.log_file})" for o in self.failed if o.status == "failed"]
        lines += [
            f"  INTERRUPTED {o.name} (rerun the same command to resume it)"
            for o in self.failed
            if o.status == "interrupted"
        ]
        if self.interrupted:
            how = f"stopped by {signal.Signals(self.stopped_by).name}" if self.stopped_by else "interrupted"
            lines.append(f"{how}: rerun the same command to resume the unfinished cells")
        return "\n".join(lines)


def _run_in_waves(
    grid: Grid, plan: GridPlan, executor: Executor, report: Callable[[CellOutcome], None]
) -> list[CellOutcome]:
    """Run the tasks, each cell after the cell it starts from (``Cell.source``): in waves, each one every task whose
    source is finished; a cell whose source did not finish fails without running."""
    source = {cell.name: cell.source for cell in grid.cells}
    finished = set(plan.finished)
    remaining, outcomes = list(plan.tasks), []
    while remaining:
        waiting = {task.name for task in remaining}
        wave = [task for task in remaining if source[task.name] not in waiting]
        remaining = [task for task in remaining if source[task.name] in waiting]
        runnable = [task for task in wave if source[task.name] is None or source[task.name] in finished]
        for task in wave:
            if task not in runnable:
                why = f"not run: the cell it starts from, {source[task.name]}, did not finish"
                outcomes.append(CellOutcome(task.name, "failed", 0.0, why))
                report(outcomes[-1])
        ran = executor.run(runnable, report)
        outcomes += ran
        finished |= {outcome.name for outcome in ran if outcome.status == "finished"}
    return outcomes


def run_grid(
    grid: Grid,
    runs_dir: str | os.PathLike,
    executor: Executor,
    data_root: str | os.PathLike | None = None,
    stream: TextIO | None = None,
) -> GridReport:
    """Run every unfinished cell of ``grid`` under ``runs_dir`` with ``executor``; failures are collected."""
    out = stream if stream is not None else sys.stderr
    with runs_dir_lock(runs_folder(runs_dir)):
        plan = plan_grid(grid, runs_dir, data_root)
        write_cell_configs(grid, plan)
        total = len(plan.tasks)
        out.write(
            f"grid {grid.name}: {len(grid.cells)} cells, {len(plan.finished)} finished, "
            f"{sum(t.resume for t in plan.tasks)} to resume, {sum(not t.resume for t in plan.tasks)} to start, "
            f"in {plan.runs_dir} (each cell's output: {plan.runs_dir / LOGS_DIR}/<cell>.log)\n"
        )
        done: list[CellOutcome] = []

        def report(outcome: CellOutcome) -> None:
            done.append(outcome)
            tail = f": {outcome.error}" if outcome.error else ""
            out.write(f"[{len(done)}/{total}] {outcome.status} {outcome.name} ({outcome.seconds:.0f} s){tail}\n")
            out.flush()

        try:
            outcomes = _run_in_waves(grid, plan, executor, report)
        except KeyboardInterrupt:
            return GridReport(plan.finished, done, interrupted=True)
        except Preempted as stop:
            return GridReport(plan.finished, done, interrupted=True, stopped_by=stop.signum)
    return GridReport(plan.finished, outcomes)
