"""``fewshot-sla eval``: re-test a finished run's best checkpoint on another fixed episode set, into the run's
results, a copy of them (``--out``), or the console only (a read-only run)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_sla.cli.launch import (
    add_data_memory_flag,
    add_malloc_flag,
    add_process_flags,
    add_threads_flag,
    join_processes,
    reuse_memory_on_cpu,
    set_threads,
)
from fewshot_sla.cli.report import format_results
from fewshot_sla.errors import UserError

if TYPE_CHECKING:
    from fewshot_sla.engine.distributed import Processes
    from fewshot_sla.results import EvaluationRecord, ResultsFile


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="re-test a finished run's best checkpoint",
        description="Evaluate the best checkpoint of a finished run on a fixed episode set "
        "and add the result to its results.json.",
    )
    ev.add_argument("run_dir", metavar="RUN_DIR")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--episodes-file", metavar="FILE", help="episode set file (.npz)")
    which.add_argument("--eval-episodes", type=int, metavar="N", help="number of test episodes (seed-0 set)")
    ev.add_argument(
        "--dataset",
        metavar="NAME",
        help="test on another prepared dataset's test split (cross-domain; its fixed episode sets, images resized "
        "to the run's size)",
    )
    ev.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N (default: the run's)")
    ev.add_argument(
        "--feature-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cache embeddings (default: the run's setting)",
    )
    ev.add_argument(
        "--out",
        metavar="DIR",
        help="write the evaluation into DIR (a copy of the run's results.json with it added, for a run you cannot "
        "or do not want to write to) instead of the run's folder; a read-only run without --out is evaluated and "
        "printed, nothing written",
    )
    ev.add_argument(
        "--eval-head",
        metavar="NAME",
        help="a pretraining run (--method pretrain) tested with another evaluation head: nearest-centroid, "
        "logistic-regression or protonet; with --out DIR (the run's results describe its own head)",
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_process_flags(ev)
    add_data_memory_flag(ev)
    add_malloc_flag(ev)
    add_threads_flag(ev)
    ev.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    """``fewshot-sla eval``."""
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise UserError(f"--eval-episodes must be a positive integer, got {args.eval_episodes}")
    set_threads(args)
    import torch

    on_gpu = torch.cuda.is_available() and not (args.device or "").startswith("cpu")
    reuse_memory_on_cpu("cuda" if on_gpu else "cpu", args)
    from fewshot_sla.engine.distributed import shutdown

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    save = out is not None or _writable(run_dir)
    processes = join_processes(args, args.device or "auto")
    finished = False
    try:
        results = _evaluate_agreed(args, processes, out, save)
        finished = True
    finally:
        shutdown(together=finished)
    if not processes.writer:
        return 0
    from fewshot_sla.finished_run import typed_results

    run = typed_results(results)
    block = run.evaluations[-1]  # the one evaluate_run just added
    if save:
        print(format_results(run, out or run_dir, block))
    else:
        print(format_results(run, run_dir, block).rsplit("\n", 1)[0])  # all but the results.json line
    notes = evaluation_notes(run, block)
    if out is not None:
        notes.append(f"written to {out / 'results.json'}, with the run's earlier evaluations; {run_dir} is untouched")
    elif not save:
        notes.append(f"{run_dir} is read-only, so this evaluation was printed, not saved; pass --out DIR to save it")
    for note in notes:
        sys.stderr.write(f"fewshot-sla: note: {note}\n")
    return 0


def _make_folder(path: Path) -> None:
    """Create ``eval --out``'s folder; a path through a file or an unwritable place is one line."""
    from fewshot_sla.io_errors import write_error

    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, path, "the --out folder") from None


def _writable(run_dir: Path) -> bool:
    """Whether ``eval`` can record an evaluation in ``run_dir`` (its results, and the lock file beside it)."""
    results = run_dir / "results.json"
    return (
        os.access(run_dir, os.W_OK | os.X_OK)
        and os.access(run_dir.parent, os.W_OK | os.X_OK)
        and (not results.exists() or os.access(results, os.W_OK))
    )


def evaluation_notes(run: ResultsFile, block: EvaluationRecord) -> list[str]:
    """What to say about an evaluation on a set other than the run's own: where it went, and a spec that differs
    from the one the run was set up for."""
    notes = []
    s, main, train = block.episode_set, run.evaluation.episode_set, run.train
    if s.dataset != run.dataset:
        notes.append(f"cross-domain: trained on {run.dataset}, tested on {s.dataset}")
    if (s.ways, s.shots) != (run.ways, run.shots):
        notes.append(
            f"this episode set is {s.ways}-way {s.shots}-shot; the run was set up for {run.ways}-way "
            f"{run.shots}-shot ("
            + (
                f"pretrained on batches of its {train.ways} training classes"
                if train.shots == 0  # the pretraining regime
                else f"trained on {train.ways}-way {train.shots}-shot episodes"
            )
            + ")"
        )
    if s.hash != main.hash:
        notes.append(
            f"added to the evaluations in results.json; the main evaluation stays the run's own test set "
            f"({main.file}, hash {main.hash[:12]})"
        )
    return notes


def _evaluate_agreed(args: argparse.Namespace, processes: Processes, out: Path | None, save: bool) -> dict[str, Any]:
    """``evaluate_run`` in every process, failures agreed on (``Processes.agree``)."""
    from fewshot_sla.engine.plan import run_folder_lock
    from fewshot_sla.engine.run_evaluation import evaluate_run

    results = None
    run_dir = Path(args.run_dir)
    target = out or run_dir
    try:
        if out is not None and processes.writer and run_dir.is_dir():
            _make_folder(out)
        locked = processes.writer and save and run_dir.is_dir()
        with run_folder_lock(target) if locked else contextlib.nullcontext():
            results = evaluate_run(
                args.run_dir,
                data_root=args.data_root,
                episodes_file=args.episodes_file,
                eval_episodes=args.eval_episodes,
                dataset=args.dataset,
                device=args.device,
                use_cache=args.feature_cache,
                progress=not args.quiet,
                processes=processes,
                data_memory_gb=args.data_memory,
                out_dir=out,
                save=save,
                eval_head=args.eval_head,
            )
    except UserError as err:
        processes.agree(err)
    processes.agree(None)
    assert results is not None
    return results
