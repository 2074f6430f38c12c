"""``fewshot-sla compare``: the paired per-episode comparison of two runs on one episode set."""

from __future__ import annotations

import argparse
import json

from fewshot_sla.cli.data import help_from_registries
from fewshot_sla.errors import render
from fewshot_sla.prediction_kinds import kind_label, kind_table


def register(subparsers: argparse._SubParsersAction) -> None:
    cmp = subparsers.add_parser(
        "compare",
        help="paired comparison of two runs on the same test episodes",
        description="Per-episode paired comparison (mean difference with 95% CI, paired "
        "t-test and Wilcoxon signed-rank test) of two runs evaluated on the "
        "same episode set of the same dataset store (or, with --across-stores, of two stores of one dataset). "
        "By default every prediction kind the runs share is compared; runs that share none (SLA against a "
        "baseline) pair each run's headline kind (SLA+AG with plain).",
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
    cmp.add_argument(
        "--across-stores",
        action="store_true",
        help="pair runs tested on different stores of the dataset by the images the episodes name (their pixels "
        "as each store holds them, e.g. another resize filter): the difference is that of model and store together",
    )
    cmp.add_argument("--json", action="store_true", help="print JSON")
    cmp.set_defaults(handler=compare_command)


def compare_command(args: argparse.Namespace) -> int:
    """``fewshot-sla compare``."""
    from fewshot_sla.engine.compare import compare_runs

    comparison = compare_runs(
        args.run_a,
        args.run_b,
        kind=args.kind,
        kind_a=args.kind_a,
        kind_b=args.kind_b,
        episode_set=args.episode_set,
        across_stores=args.across_stores,
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
