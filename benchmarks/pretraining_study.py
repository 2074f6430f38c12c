"""Pretraining against episodic training, each with and without SLA, at equal training compute (issue 22, item 6).

For each dataset this trains four Conv-4 runs with one seed (``--seed``, 0 by default): the pretraining regime
(``--method pretrain``: a linear classifier over every training class, nearest-centroid test head) and episodic
ProtoNet, each with the plain objective and with SLA (rotations, M=4). Compute is equalised by the training images
seen (the originals; SLA's four copies cost four backbone passes each in both regimes, so runs with the same
objective also make the same number of backbone passes): ``EPOCHS`` passes over the training split, i.e. ``EPOCHS *
images`` pretraining "episodes" (one image each) and that many images' worth of ProtoNet episodes (N-way (K +
Q)-image episodes of its recipe). Each regime keeps its own recipe as the suite resolves it (optimiser, learning
rate, batch or episode shape; the schedules are anchored to the published budgets, so neither decays its learning
rate at this budget), with augmentation off for all four. The checkpoint tested is the one of best validation
accuracy (200 fixed validation episodes, four validations per run); all four runs are tested on the same 1000 fixed
5-way 1-shot test episodes, and the differences are paired on them (``fewshot-sla compare``, 95% CI). It prints a
Markdown table.

    python benchmarks/pretraining_study.py --data-root .data [--runs runs/pretraining-study] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from study_runs import train_run

EPOCHS = 2
DATASETS = {  # name: (flags, training images, ProtoNet recipe's images per training episode)
    "tinyimagenet": (["--image-size", "32"], 64 * 300, 30 * (1 + 15)),  # 30-way 1-shot 15-query (Snell et al.)
    "omniglot-lake": ([], 806 * 20, 60 * (1 + 5)),  # 60-way 1-shot 5-query (Snell et al.'s Omniglot)
}
COMMON = ["--ways", "5", "--shots", "1", "--backbone", "conv4", "--no-augment", "--device", "cpu", "--quiet"]
COMMON += ["--val-episodes", "200", "--eval-episodes", "1000", "--fit-memory", "off"]
OBJECTIVES = {"plain": ["--transform", "none", "--objective", "baseline"], "SLA": ["--objective", "sla"]}


def runs_of(dataset: str, seed: int) -> dict[str, list[str]]:
    """The four runs of a dataset with ``seed``: name -> flags."""
    extra, images, per_episode = DATASETS[dataset]
    budget = EPOCHS * images
    episodes = budget // per_episode
    regimes = {
        "pretrain": ["--method", "pretrain", "--train-episodes", str(budget), "--val-every", str(budget // 4)],
        "protonet": ["--method", "protonet", "--train-episodes", str(episodes), "--val-every", str(episodes // 4)],
    }
    return {
        f"{regime} {objective}": [
            "--dataset",
            dataset,
            *extra,
            *COMMON,
            "--seed",
            str(seed),
            *flags,
            *OBJECTIVES[objective],
        ]
        for regime, flags in regimes.items()
        for objective in OBJECTIVES
    }


def paired(data_root: str, a: Path, b: Path) -> dict[str, Any]:
    """``fewshot-sla compare A B --json``'s first comparison (the headline kinds)."""
    command = [sys.executable, "-m", "fewshot_sla", "--data-root", data_root, "compare", str(a), str(b), "--json"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    comparison: dict[str, Any] = json.loads(out)["comparisons"][-1]
    return comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--runs", default="runs/pretraining-study", help="where the runs go (finished ones are kept)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (the test episodes are the same for all)")
    args = parser.parse_args()
    rows = ["| dataset | run | training steps | train time s | test % (kind) | 95% CI |", "|---|---|---|---|---|---|"]
    pairs = ["| dataset | A - B | paired difference, 95% CI | wins/losses/ties |", "|---|---|---|---|"]
    for dataset in DATASETS:
        folders = {}
        for name, flags in runs_of(dataset, args.seed).items():
            out = Path(args.runs) / dataset / name.replace(" ", "-")
            folders[name] = out
            started = time.perf_counter()
            results = (
                json.loads((out / "results.json").read_text())
                if (out / "results.json").is_file()
                else train_run(flags, args.data_root, out)
            )
            print(f"{dataset} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            ev = results["evaluation"]
            acc = ev["accuracy"][ev["headline"]]
            train = results["train"]
            rows.append(
                f"| {dataset} | {name} | {train['steps']} | {train['time_s']:.0f} | "
                f"{acc['mean']:.2f} ({ev['headline']}) | +- {acc['ci95']:.2f} |"
            )
        for a, b in [
            ("pretrain SLA", "pretrain plain"),
            ("protonet SLA", "protonet plain"),
            ("pretrain plain", "protonet plain"),
            ("pretrain SLA", "protonet SLA"),
        ]:
            c = paired(args.data_root, folders[a], folders[b])
            pairs.append(
                f"| {dataset} | {a} ({c['kind_a']}) - {b} ({c['kind_b']}) | {c['mean_diff']:+.2f} +- {c['ci95']:.2f} | "
                f"{c['wins']}/{c['losses']}/{c['ties']} |"
            )
    print("\n".join(rows))
    print()
    print("\n".join(pairs))


if __name__ == "__main__":
    main()
