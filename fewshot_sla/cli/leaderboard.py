"""``fewshot-sla leaderboard run GRID`` (run a grid of cells, resumably) and ``leaderboard build RUNS_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_sla.errors import UserError

EXIT_CELL_FAILED = 1
EXIT_INTERRUPTED = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``leaderboard`` sub-command with its ``run`` and ``build`` actions."""
    board = subparsers.add_parser(
        "leaderboard",
        help="run benchmark grids and build leaderboards",
        description="Run a grid of benchmark cells and build leaderboard tables and plots.",
    )
    actions = board.add_subparsers(dest="action", metavar="ACTION", parser_class=type(board))
    actions.required = True

    run = actions.add_parser(
        "run",
        help="run every unfinished cell of a grid file",
        description="Run the cells of a grid file (benchmarks/grids/*.yaml) that have no finished result: "
        "finished cells are skipped, interrupted ones resumed, and a failing cell does not stop the "
        "others (failures are listed at the end; the exit code is then 1).",
    )
    run.add_argument("grid", metavar="GRID", help="grid file (YAML)")
    run.add_argument("--runs-dir", metavar="DIR", help="folder of the cells' run folders (default runs/<grid name>)")
    run.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="local processes (default) or one Slurm job per cell through submitit",
    )
    run.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="cells at once (local: parallel processes, default 1; slurm: array tasks at once)",
    )
    run.add_argument("--dry-run", action="store_true", help="list the cells and what would happen to each; run nothing")
    run.set_defaults(handler=run_command)

    build = actions.add_parser(
        "build",
        help="write leaderboard tables and plots from finished runs",
        description="Read every results.json below RUNS_DIR and write leaderboard.md, leaderboard.csv, "
        "paired_differences.csv and PNG plots into --out, with published numbers beside the measured, and "
        "reproduction.md/.csv/.png: each row that matches a published one (method, backbone and its options, "
        "dataset, ways, shots) with the difference, its 95% CI and a verdict (reproduced, above, below).",
    )
    build.add_argument("runs_dir", metavar="RUNS_DIR")
    build.add_argument("--out", metavar="DIR", required=True, help="output folder")
    which = build.add_mutually_exclusive_group()
    which.add_argument(
        "--published",
        metavar="FILE.csv",
        help="published-number table (default: the one shipped with the package)",
    )
    which.add_argument("--no-published", action="store_true", help="leave published numbers out")
    build.set_defaults(handler=build_command)


def run_command(args: argparse.Namespace) -> int:
    """``fewshot-sla leaderboard run``."""
    from fewshot_sla.config.grid import load_grid
    from fewshot_sla.leaderboard.executors import (
        SLURM_DIR,
        Executor,
        LocalExecutor,
        SlurmExecutor,
        check_stores,
        plan_grid,
        run_grid,
    )

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    grid = load_grid(args.grid)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path("runs") / grid.name
    plan = plan_grid(grid, runs_dir, args.data_root)
    if args.dry_run:
        pending = {t.name: "resume" if t.resume else "start" for t in plan.tasks}
        for cell in grid.cells:
            print(f"{pending.get(cell.name, 'finished'):>8}  {cell.name}")
        print(f"{len(grid.cells)} cells: {len(plan.finished)} finished, {len(plan.tasks)} to run, in {plan.runs_dir}")
        return 0
    check_stores(grid, plan)
    executor: Executor
    if args.executor == "slurm":
        executor = SlurmExecutor(plan.runs_dir / SLURM_DIR, grid.slurm, jobs=args.jobs)
    else:
        executor = LocalExecutor(jobs=args.jobs or 1)
    report = run_grid(grid, runs_dir, executor, args.data_root)
    sys.stderr.write(report.summary() + "\n")
    if report.interrupted:
        return 128 + report.stopped_by if report.stopped_by else EXIT_INTERRUPTED
    if report.failed:
        return EXIT_CELL_FAILED
    print(
        f"all {len(grid.cells)} cells finished; build the leaderboard with "
        f"'fewshot-sla leaderboard build {runs_dir} --out {runs_dir}/leaderboard'"
    )
    return 0


def build_command(args: argparse.Namespace) -> int:
    """``fewshot-sla leaderboard build``."""
    from fewshot_sla.leaderboard.build import build_leaderboard
    from fewshot_sla.leaderboard.published import DEFAULT_PUBLISHED, load_published

    published = []
    if args.published:
        published = load_published(args.published)
    elif not args.no_published:
        published = load_published(DEFAULT_PUBLISHED)
    report = build_leaderboard(args.runs_dir, args.out, published)
    for path, reason in report.skipped:
        sys.stderr.write(f"fewshot-sla: skipped {path}: {reason}\n")
    print(f"{report.runs} run(s): {report.accuracy_rows} accuracy row(s), {report.paired_rows} paired row(s)")
    if report.verdicts:
        counts = ", ".join(f"{n} {verdict}" for verdict, n in report.verdicts.items())
        print(f"compared with published numbers: {counts} (reproduction.md)")
    for file in report.files:
        print(f"  {file}")
    return 0
