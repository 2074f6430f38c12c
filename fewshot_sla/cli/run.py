"""``fewshot-sla run`` (meta-train and test), ``fewshot-sla eval`` (re-test a run), ``fewshot-sla compare``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin

import yaml

from fewshot_sla.cli.data import HelpTexts, help_from_registries, listed_help, positive_integer
from fewshot_sla.config import RunConfig, base_type, check_values, help_text, knobs, read_config_values
from fewshot_sla.cpu_memory import reuse_freed_memory
from fewshot_sla.errors import UserError, render
from fewshot_sla.prediction_kinds import kind_label, kind_table
from fewshot_sla.yaml_file import parse_yaml

if TYPE_CHECKING:
    from fewshot_sla.engine.distributed import Processes
    from fewshot_sla.results import EvaluationRecord, ResultsFile

# Every configuration flag of `run` is rendered from the RunConfig field that declares it (its Knob in config.py:
# flag, metavar, help, default): a switch for a boolean, KEY=VALUE items for a mapping, names for a list, else one
# value of the field's type. Absent flags leave the configuration file's (or the recipe's) value. A help text's
# {learners}, {objectives}, ... become the registered names, plug-ins' included, when help is shown (``listed_help``).


def _add_config_flags(parser: argparse.ArgumentParser, texts: HelpTexts) -> None:
    """The flags of every configuration field that has one, in file order."""
    for key, knob in knobs().items():
        if knob.flag is None:
            continue
        kind = base_type(key)
        options: dict[str, Any] = {"dest": key, "metavar": knob.metavar, "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is dict:
            options["action"] = "append"  # KEY=VALUE items (config_from_args parses them)
        elif get_origin(kind) is list:
            options["action"] = _Names
        else:
            options["type"] = kind if kind in (int, float) else str  # a Literal's values are text
        action = parser.add_argument(knob.flag, **options)
        listed_help(texts, action, help_text(key).replace("%", "%%"))


class _Names(argparse.Action):
    """``--log A,B --log C``: the names in order, each once (a list field such as the config's ``log``)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        names = list(getattr(namespace, self.dest, None) or [])
        for name in str(values).split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
        setattr(namespace, self.dest, names)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``eval`` and ``compare`` sub-commands."""
    run = subparsers.add_parser(
        "run",
        help="meta-train a learner and test it on fixed episodes",
        description="Meta-train a learner with SLA (or a comparison objective), then test its best checkpoint on "
        "a fixed episode set and report accuracy with 95% confidence intervals.",
        add_help=False,
    )
    _add_config_flags(run, help_from_registries(run))
    run.add_argument("--config", metavar="FILE.yaml", help="configuration file; flags override its values")
    run.add_argument(
        "--set",
        dest="set_values",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="any configuration field (see --print-config), VALUE in YAML syntax; repeatable; "
        "overrides --config and the other flags, e.g. --set momentum=0.5 --set lr_milestones=[0.5]",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help="run folder (default runs/<dataset>-<method>-<N>w<K>s-<transform>-<objective>-<seed>)",
    )
    run.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop after N optimizer steps in all, saving a checkpoint (continue with --resume)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the run's resolved configuration (recipe filled in) as YAML, each value's origin (default, "
        "recipe, config file or flag) in a comment, and exit; it can be saved and passed back with --config",
    )
    run.add_argument(
        "--fit-memory",
        metavar="auto|check|off",
        default="auto",
        help="before training, estimate one step's memory: auto (default) picks the micro-batch and "
        "checkpointing that fit the budget, check refuses a run that does not fit, off skips it",
    )
    run.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="memory one process may use for a training step (default: 90%% of a GPU's free memory; "
        "on a CPU the smaller of 90%% of the available RAM and a third of the machine's)",
    )
    _add_data_memory_flag(run)
    _add_process_flags(run)
    _add_malloc_flag(run)
    _add_threads_flag(run)
    run.set_defaults(handler=run_command)

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
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_process_flags(ev)
    _add_data_memory_flag(ev)
    _add_malloc_flag(ev)
    _add_threads_flag(ev)
    ev.set_defaults(handler=eval_command)

    cmp = subparsers.add_parser(
        "compare",
        help="paired comparison of two runs on the same test episodes",
        description="Per-episode paired comparison (mean difference with 95% CI, paired "
        "t-test and Wilcoxon signed-rank test) of two runs evaluated on the "
        "same episode set of the same dataset store. By default every prediction kind the runs share is "
        "compared; runs that share none (SLA against a baseline) pair each run's headline kind (SLA+AG with plain).",
        add_help=False,
    )
    texts = help_from_registries(cmp)
    cmp.add_argument("run_a", metavar="RUN_A")
    cmp.add_argument("run_b", metavar="RUN_B")
    kind = cmp.add_argument("--kind", help="prediction kind to compare in both runs")
    texts[kind] = lambda: f"prediction kind to compare in both runs: {', '.join(kind_table())}"
    cmp.add_argument(
        "--kind-a", help="prediction kind of RUN_A, e.g. ag (default: RUN_A's headline kind when only --kind-b is set)"
    )
    cmp.add_argument(
        "--kind-b",
        help="prediction kind of RUN_B, e.g. plain (default: RUN_B's headline kind when only --kind-a is set)",
    )
    cmp.add_argument("--episode-set", metavar="HASH", help="hash (prefix) of the episode set to use")
    cmp.add_argument("--json", action="store_true", help="print JSON")
    cmp.set_defaults(handler=compare_command)


def _add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dist-backend",
        metavar="auto|gloo|nccl",
        default="auto",
        help="under torchrun: the torch.distributed backend (auto: nccl with one GPU per process, else gloo)",
    )


def _join(args: argparse.Namespace, device: str) -> Processes:
    """This process's place in a torchrun/Slurm launch, joined to the others (one process: nothing to join)."""
    from fewshot_sla.engine.distributed import check_process_count, from_environment, initialize, process_device

    processes = from_environment()
    if processes.active:
        try:
            dev = process_device(processes, device)
            backend = check_process_count(processes, dev, args.dist_backend)
        except UserError as err:  # every process finds the same problem: report it once
            raise UserError(str(err), shared=True) from None
        initialize(processes, dev, backend)
    return processes


def _add_data_memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-memory",
        type=float,
        metavar="GB",
        help="memory the dataset splits may take in one process; a split that does not fit (smallest are kept "
        "first) stays on disk and its episodes are read from the store, the same episodes (default: half the "
        "GPU's free memory, or on a CPU half the available RAM; 0 reads every split from disk)",
    )


def _add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="on the CPU, keep glibc's default allocator, which returns freed memory to the OS (by "
        "default a CPU run keeps it for reuse: faster steps, the peak memory held until exit)",
    )


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=positive_integer,
        metavar="N",
        help="CPU threads of torch's operations in this process, in each process under torchrun (default: "
        "torch's own choice: OMP_NUM_THREADS when set, which torchrun sets to 1 for several processes per "
        "machine, else one per core)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's intra-op thread count in this process; without it torch's own choice stands."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _reuse_memory_on_cpu(device_type: str, args: argparse.Namespace) -> None:
    """The CLI's one process-wide setting: keep freed memory for reuse on CPU runs (see ``cpu_memory``)."""
    if device_type == "cpu" and not args.default_malloc:
        reuse_freed_memory()


def _parse_options(items: list[str], flag: str) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got '{item}'")
        try:
            options[key.strip()] = parse_yaml(text)
        except yaml.YAMLError:
            raise UserError(f"{flag} {item}: the value is not valid YAML; quote it") from None
    return options


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """The configuration (defaults < --config file < flags) and the values the user set explicitly."""
    given, _ = read_config_values(args.config) if args.config else ({}, {})
    for key in RunConfig.field_names():
        if hasattr(args, key):
            value = getattr(args, key)
            if get_origin(base_type(key)) is dict:  # KEY=VALUE items
                value = {**given.get(key, {}), **_parse_options(value, str(knobs()[key].flag))}
            given[key] = value
    settings = _parse_options(args.set_values, "--set")
    for key in settings:
        if key not in RunConfig.model_fields:
            raise UserError(f"--set {key}=...: unknown key '{key}'; valid keys: {', '.join(RunConfig.field_names())}")
    given.update(check_values(settings, "command line: --set") if settings else {})
    return RunConfig.from_mapping(given, "command line"), given


def _annotated_config(cfg: RunConfig, given: dict[str, Any], args: argparse.Namespace) -> str:
    """``--print-config``: the resolved configuration as YAML, each value's origin in a comment: ``recipe`` (filled
    in by it), ``flag`` (a flag or ``--set``), ``config file`` (``--config``) or ``default`` (the field's)."""
    from fewshot_sla.engine.recipes import apply_recipe, recipe_record

    resolved = apply_recipe(cfg)
    flags = {key for key in RunConfig.field_names() if hasattr(args, key)}
    flags |= {item.partition("=")[0].strip() for item in args.set_values}

    def origin(key: str) -> str:
        if getattr(resolved, key) != getattr(cfg, key):
            return "recipe"
        return "flag" if key in flags else "config file" if key in given else "default"

    header = (
        f"fewshot-sla run configuration (recipe {recipe_record(cfg)['name']}); after each value its origin: "
        "default, recipe, config file or flag"
    )
    return resolved.to_yaml({key: origin(key) for key in RunConfig.field_names()}, header)


def run_command(args: argparse.Namespace) -> int:
    """``fewshot-sla run``."""
    from fewshot_sla.engine.execute import execute_run
    from fewshot_sla.engine.loggers import check_loggers
    from fewshot_sla.engine.plan import plan_run, run_directory, run_folder_lock

    cfg, given = config_from_args(args)
    if args.print_config:
        print(_annotated_config(cfg, given, args), end="")
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be a positive integer, got {args.max_steps}")
    _set_threads(args)
    from fewshot_sla.engine.distributed import shutdown

    processes = _join(args, cfg.device)
    try:
        with contextlib.ExitStack() as held:
            plan = None
            try:
                check_loggers(cfg.log)  # before anything is done (on --resume the stored ones, after the plan)
                if processes.writer:  # one writer per run folder, from the check of the folder to the last write
                    held.enter_context(run_folder_lock(run_directory(cfg, args.out)))
                plan = plan_run(
                    cfg,
                    overrides=given,
                    out=args.out,
                    data_root=args.data_root,
                    resume=args.resume,
                    overwrite=args.overwrite,
                    processes=processes,
                    fit_memory=args.fit_memory,
                    memory_budget_gb=args.memory_budget,
                    data_memory_gb=args.data_memory,
                )
                check_loggers(plan.cfg.log)
            except UserError as err:
                processes.agree(err)
            processes.agree(None)
            assert plan is not None
            _reuse_memory_on_cpu(plan.device.type, args)
            if processes.writer and not args.quiet:
                sys.stderr.write(f"fewshot-sla: {render(plan.memory.summary())}\n")
                if plan.data_note:
                    sys.stderr.write(f"fewshot-sla: {render(plan.data_note)}\n")
            report = execute_run(plan, max_steps=args.max_steps, progress=not args.quiet)
    finally:
        shutdown()
    if not processes.writer:
        return 0 if report.status != "interrupted" else 130
    resume = f"fewshot-sla run --resume --out {report.run_dir}"
    if report.status == "max-steps":
        sys.stderr.write(f"fewshot-sla: stopped after step {report.step} (--max-steps); continue with '{resume}'\n")
        return 0
    if report.status == "interrupted":
        sys.stderr.write(f"fewshot-sla: interrupted; state saved at step {report.step}; continue with '{resume}'\n")
        return 130
    assert report.results is not None
    from fewshot_sla.finished_run import typed_results

    run = typed_results(report.results)  # the transformation as a label (older runs recorded the configured one)
    if "dataset" not in given and not args.resume and run.dataset == "synthetic":
        print(
            "note: no --dataset given, so this used the embedded synthetic set; for real data run "
            "'fewshot-sla data prepare DATASET --source PATH' and pass --dataset DATASET"
        )
    print(format_results(run, report.run_dir))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """``fewshot-sla eval``."""
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise UserError(f"--eval-episodes must be a positive integer, got {args.eval_episodes}")
    _set_threads(args)
    import torch

    on_gpu = torch.cuda.is_available() and not (args.device or "").startswith("cpu")
    _reuse_memory_on_cpu("cuda" if on_gpu else "cpu", args)
    from fewshot_sla.engine.distributed import shutdown

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else None
    save = out is not None or _writable(run_dir)
    processes = _join(args, args.device or "auto")
    try:
        results = _evaluate_agreed(args, processes, out, save)
    finally:
        shutdown()
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
            f"{run.shots}-shot (trained on {train.ways}-way {train.shots}-shot episodes)"
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
            )
    except UserError as err:
        processes.agree(err)
    processes.agree(None)
    assert results is not None
    return results


def compare_command(args: argparse.Namespace) -> int:
    """``fewshot-sla compare``."""
    from fewshot_sla.engine.compare import compare_runs

    comparison = compare_runs(
        args.run_a, args.run_b, kind=args.kind, kind_a=args.kind_a, kind_b=args.kind_b, episode_set=args.episode_set
    )
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2))
        return 0
    n = comparison.pairs[0].stats.n
    lines = [
        f"A: {comparison.run_a.path}",
        f"B: {comparison.run_b.path}",
        *([f"note: {render(comparison.note)}"] if comparison.note else []),
        f"{n} paired test episodes (episode set {comparison.episode_set_hash[:12]})",
        f"  {'A':<8} {'B':<8} {'acc A %':>8} {'acc B %':>8} {'A-B %':>7} {'95% CI':>8} {'p (t)':>9} "
        f"{'p (Wilcoxon)':>12}  wins/losses/ties",
    ]
    for pair in comparison.pairs:
        c = pair.stats  # differences as fractions: shown in percent, as in --json
        lines.append(
            f"  {kind_label(pair.kind_a):<8} {kind_label(pair.kind_b):<8} {pair.mean_a:8.2f} "
            f"{pair.mean_b:8.2f} {100.0 * c.mean_diff:+7.2f} {'+- ' + format(100.0 * c.ci95, '.2f'):>8} "
            f"{c.p_ttest:9.2g} {c.p_wilcoxon:12.2g}  {c.wins}/{c.losses}/{c.ties}"
        )
    print("\n".join(lines))
    return 0


def format_results(run: ResultsFile, run_dir: Path, block: EvaluationRecord | None = None) -> str:
    """The small end-of-run table of an evaluation block (default: the main one): accuracy with 95% CIs per
    prediction kind (none for a single episode), plus context lines."""
    ev, train = block or run.evaluation, run.train
    s = ev.episode_set
    lines = [
        f"{run.method} / {run.backbone} on {run.dataset}: {s.ways}-way {s.shots}-shot, "
        f"transform {run.transform}, objective {run.objective}, seed {run.seed}",
    ]
    rate = train.episodes_per_s
    lines.append(
        f"trained {train.episodes} episodes in {train.time_s:.1f} s"
        + (f" ({rate:.1f} episodes/s)" if rate else "")
        + f", best validation at episode {train.best_episodes}"
    )
    target = f" of {s.dataset}" if s.dataset != run.dataset else ""
    lines.append(
        f"tested on {ev.episodes} episodes{target} ({s.file}, hash {s.hash[:12]}"
        f"{', cached embeddings' if ev.cached else ''}) in {ev.time_s:.1f} s"
    )

    def interval(half_width: float | None) -> str:
        return "-" if half_width is None else "+- " + format(half_width, ".2f")

    lines.append(f"  {'prediction':<11} {'accuracy':>9}  {'95% CI':>8}  {'95% CI (t)':>10}")
    for kind, acc in ev.accuracy.items():
        lines.append(f"  {kind_label(kind):<11} {acc.mean:8.2f}%  {interval(acc.ci95):>8}  {interval(acc.ci95_t):>10}")
    lines.append(f"  {'chance':<11} {100.0 / s.ways:8.2f}%")
    lines.append(f"results: {run_dir / 'results.json'}")
    return "\n".join(lines)
