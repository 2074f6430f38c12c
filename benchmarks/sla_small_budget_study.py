"""Where SLA loses at small budgets (issue 10, item 5): variants of the SLA run, chosen on validation, then tested.

For each setting this trains the baseline and every SLA variant with the same seed and budget, reads each run's
best validation accuracy (its headline kind, on the run's fixed validation episodes) to pick a variant, and only
then reads the test set: each variant's SLA+AG accuracy and its paired difference against the baseline on the
same test episodes (``fewshot-sla compare``, 95% CI). It prints a Markdown table; the variant marked * is the one
validation chose. When that variant changes a learner option (an inner learning rate, lambda), the baseline is
trained once more with the same option, so that the chosen SLA run is also compared with a baseline given the
same tuning (the last rows).

    python benchmarks/sla_small_budget_study.py --data-root .data --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_runs import train_run

TINY_1SHOT = ["--dataset", "tinyimagenet", "--image-size", "32", "--shots", "1", "--train-episodes", "600"]
SETTINGS = {
    "maml-fo, synthetic, 5-way 1-shot, 1200 episodes": {
        "flags": ["--method", "maml-fo", "--train-episodes", "1200", "--val-every", "300", "--val-episodes", "200"],
        "variants": {
            "SLA (rotation, M=4), inner lr 0.01, 5 steps": [],
            "inner lr 0.05": ["--learner-option", "inner_lr=0.05"],
            "10 inner steps": ["--learner-option", "train_steps=10"],
            "rotation2 (M=2)": ["--transform", "rotation2"],
            "SLA+SD": ["--objective", "sla+sd"],
        },
    },
    "MetaOptNet-RR, Tiny ImageNet 32px, 5-way 1-shot, 600 episodes": {
        "flags": ["--method", "metaoptnet-ridge", "--meta-batch", "2", "--val-every", "150", "--val-episodes", "100"]
        + TINY_1SHOT,
        "variants": {
            "SLA (rotation, M=4), lambda 50": [],
            "lambda 200 (4x, for 4x the classes)": ["--learner-option", "lam=200"],
            "lambda 12.5": ["--learner-option", "lam=12.5"],
            "rotation2 (M=2)": ["--transform", "rotation2"],
            "SLA+SD": ["--objective", "sla+sd"],
        },
    },
}
COMMON = ["--device", "cpu", "--quiet", "--eval-episodes", "500", "--fit-memory", "off", "--threads", "1"]


def train(flags: list[str], data_root: str | None, out: Path) -> dict:
    return train_run(flags + COMMON, data_root, out)


def paired(sla: Path, baseline: Path) -> dict:
    command = [sys.executable, "-m", "fewshot_sla", "compare", str(sla), str(baseline), "--kind-a", "ag"]
    command += ["--kind-b", "plain", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)["comparisons"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="holds the synthetic and tinyimagenet stores")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = [
        "| setting | variant | best val % | test SLA+AG % | SLA+AG - baseline (paired, 95% CI) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        for index, (name, setting) in enumerate(SETTINGS.items()):
            base_flags = setting["flags"] + ["--seed", str(args.seed)]
            folder = Path(tmp) / str(index)
            jobs = {
                "baseline": pool.submit(
                    train,
                    base_flags + ["--objective", "baseline", "--transform", "none"],
                    args.data_root,
                    folder / "baseline",
                )
            }
            for k, (variant, extra) in enumerate(setting["variants"].items()):
                jobs[variant] = pool.submit(train, base_flags + extra, args.data_root, folder / f"v{k}")
            results = {variant: job.result() for variant, job in jobs.items()}
            base = results.pop("baseline")
            chosen = max(results, key=lambda v: results[v]["train"]["best_val_accuracy"])
            lines.append(
                f"| {name} | baseline | {base['train']['best_val_accuracy']:.2f} | "
                f"{base['evaluation']['accuracy']['plain']['mean']:.2f} (plain) | |"
            )
            for k, (variant, result) in enumerate(results.items()):
                diff = paired(folder / f"v{k}", folder / "baseline")
                mark = " *" if variant == chosen else ""
                lines.append(
                    f"| {name} | {variant}{mark} | {result['train']['best_val_accuracy']:.2f} | "
                    f"{result['evaluation']['accuracy']['ag']['mean']:.2f} | "
                    f"{diff['mean_diff']:+.2f} +- {diff['ci95']:.2f} |"
                )
            if "--learner-option" in setting["variants"][chosen]:
                options = [f for f in setting["variants"][chosen] if f != "--learner-option"]
                tuned = train(
                    base_flags + ["--objective", "baseline", "--transform", "none"] + setting["variants"][chosen],
                    args.data_root,
                    folder / "baseline-tuned",
                )
                chosen_folder = folder / f"v{list(results).index(chosen)}"
                diff = paired(chosen_folder, folder / "baseline-tuned")
                lines.append(
                    f"| {name} | baseline with {', '.join(options)} | {tuned['train']['best_val_accuracy']:.2f} | "
                    f"{tuned['evaluation']['accuracy']['plain']['mean']:.2f} (plain) | "
                    f"chosen SLA variant minus it: {diff['mean_diff']:+.2f} +- {diff['ci95']:.2f} |"
                )
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
