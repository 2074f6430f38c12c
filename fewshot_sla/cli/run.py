"""``fewshot-sla run``: meta-train and test one run, its configuration from flags, a file and the recipe."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any, get_origin

import yaml

from fewshot_sla.cli.data import HelpTexts, help_from_registries, listed_help
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
from fewshot_sla.config import RunConfig, base_type, check_values, help_text, knobs, read_config_values
from fewshot_sla.errors import UserError, render
from fewshot_sla.yaml_file import parse_yaml

if TYPE_CHECKING:
    pass

# Every configuration flag of `run` is rendered from the RunConfig field that declares it (its Knob in
# config/run_config.py: flag, metavar, help, default): a switch for a boolean, KEY=VALUE items for a mapping, names
# for a list, else one value of the field's type. Absent flags leave the configuration file's (or the recipe's)
# value. A help text's {learners}, {objectives}, ... become the registered names, plug-ins' included, when help is
# shown (``listed_help``).


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
        "--extend",
        metavar="RUN_DIR",
        help="train the finished run RUN_DIR for longer, to --train-episodes, into the new folder --out (ends as a "
        "run trained that long at once would; RUN_DIR is kept)",
    )
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
    add_data_memory_flag(run)
    add_process_flags(run)
    add_malloc_flag(run)
    add_threads_flag(run)
    run.set_defaults(handler=run_command)


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
    from fewshot_sla.config.recipes import apply_recipe, recipe_record

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
    set_threads(args)
    from fewshot_sla.engine.distributed import shutdown

    processes = join_processes(args, cfg.device)
    finished = False
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
                    extend_from=args.extend,
                )
                check_loggers(plan.cfg.log)
            except UserError as err:
                processes.agree(err)
            processes.agree(None)
            assert plan is not None
            reuse_memory_on_cpu(plan.device.type, args)
            continued = args.resume or args.extend  # the dataset is the stored run's
            if processes.writer and "dataset" not in given and not continued and plan.cfg.dataset == "synthetic":
                size = plan.store.path.stat().st_size / 1e6
                print(
                    f"note: no --dataset given, so this run uses the embedded synthetic set (generated once into "
                    f"{plan.store.path}, {size:.0f} MB); for real data run 'fewshot-sla data prepare DATASET --source "
                    "PATH' and pass --dataset DATASET",
                    flush=True,
                )
            if processes.writer and not args.quiet:
                sys.stderr.write(f"fewshot-sla: {render(plan.memory.summary())}\n")
                if plan.data_note:
                    sys.stderr.write(f"fewshot-sla: {render(plan.data_note)}\n")
            report = execute_run(plan, max_steps=args.max_steps, progress=not args.quiet)
        finished = True
    finally:
        shutdown(together=finished)
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
    print(format_results(run, report.run_dir))
    return 0
