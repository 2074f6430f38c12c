"""Which learning-rate schedule a short run should follow, chosen by validation accuracy (never test).

A recipe's milestones are fractions of a span of episodes. Rule ``compress``: the span is the run's own budget,
so a 300-episode run goes through every decay of a 20,000-episode schedule (ProtoNet ends at 1/512 of its LR).
Rule ``anchor``: the span is the published budget (``lr_schedule_episodes``), so a short run follows the first
part of the published schedule (and a run at the published budget is the published run under either rule).

For each setting and seed this trains one run per rule and reads its best validation accuracy (the headline
prediction kind, on the run's fixed validation episodes) from results.json; the test episodes are evaluated but
not read. It prints a Markdown table: the mean over seeds per rule and the paired difference per seed.

    python benchmarks/lr_schedule_study.py --data-root .data --out benchmarks/results/lr_schedule.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from study_runs import train_run

# name, published schedule span (episodes), flags of the short run
SETTINGS = [
    ("ProtoNet, synthetic, 300 episodes (the default job)", 20000, ["--method", "protonet"]),
    (
        "ProtoNet, Tiny ImageNet 32px, 600 episodes (CPU grid)",
        20000,
        [
            "--method",
            "protonet",
            "--dataset",
            "tinyimagenet",
            "--image-size",
            "32",
            "--train-ways",
            "5",
            "--train-episodes",
            "600",
        ],
    ),
    ("MetaOptNet-RR, synthetic, 240 episodes", 480000, ["--method", "metaoptnet-ridge"]),
    (
        "MetaOptNet-RR, Tiny ImageNet 32px, 600 episodes (CPU grid)",
        480000,
        [
            "--method",
            "metaoptnet-ridge",
            "--dataset",
            "tinyimagenet",
            "--image-size",
            "32",
            "--meta-batch",
            "2",
            "--train-episodes",
            "600",
        ],
    ),
    ("MetaOptNet-SVM, synthetic, 240 episodes", 480000, ["--method", "metaoptnet-svm"]),
]
COMMON = ["--device", "cpu", "--quiet", "--val-episodes", "500", "--eval-episodes", "20", "--fit-memory", "off"]


def best_validation(flags: list[str], data_root: str | None, out: Path) -> float:
    return float(train_run(flags + COMMON, data_root, out)["train"]["best_val_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="holds the synthetic and tinyimagenet stores")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    lines = ["| setting | compress (val %) | anchor (val %) | anchor - compress per seed |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, span, flags) in enumerate(SETTINGS):
            if args.only and index not in args.only:
                continue
            scores: dict[str, list[float]] = {"compress": [], "anchor": []}
            for seed in args.seeds:
                for rule in scores:
                    extra = ["--seed", str(seed)]
                    if rule == "anchor":
                        extra += ["--set", f"lr_schedule_episodes={span}"]
                    scores[rule].append(
                        best_validation(flags + extra, args.data_root, Path(tmp) / f"{index}-{seed}-{rule}")
                    )
            diffs = " ".join(f"{a - c:+.2f}" for a, c in zip(scores["anchor"], scores["compress"]))
            line = (
                f"| {name} | {statistics.mean(scores['compress']):.2f} | {statistics.mean(scores['anchor']):.2f} | "
                f"{diffs} |"
            )
            print(line, flush=True)
            lines.append(line)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
