"""Scaling benchmark: memory and time of a training step against the micro-batch and activation checkpointing,
and training throughput with several processes (torch.distributed, gloo on the CPU).

Cases (``--case``):
- ``paper``: the paper grid's MetaOptNet-SVM + rotation SLA step on ResNet-12 at 84x84: 8 episodes x 5 ways x
  (15 shots + 6 queries) x 4 rotations = 3,360 images. For each (micro-batch K, checkpointing) it measures one
  micro-batch in a fresh process (its forward and backward, the optimizer step after the last one) and reports
  the step time as 8/K micro-batches; ``--full-step`` also times one whole step with the first option that fits.
- ``protonet30``: the published 30-way 1-shot 15-query ProtoNet step with rotation SLA at 64x64 (1,920 images):
  a few steps with and without checkpointing.
- ``processes``: ``fewshot-sla run`` of MetaOptNet-RR with SLA on the synthetic set (meta-batch 8) in 1 process
  x 1 thread, 1 x 2 threads and 2 processes x 1 thread (torchrun), interleaved over ``--rounds``; training
  episodes per second from each run's results.json (training steps only).

Images are random pixels (memory and time do not depend on their content). Peak memory is Linux's VmHWM of the
measuring process, reset at the start of the measured step, minus its resident size then; the preflight
estimate (``engine/memory/``) is printed beside it. Each measurement runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30

MEASURE = r"""
import json, sys, time, torch
from fewshot_sla.backbones.checkpointing import enable
from fewshot_sla.config import RunConfig
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline, build_model, episode_specs
from fewshot_sla.engine.memory import PeakMeter, profile_step
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.engine.train import accumulate_gradients, make_optimizer
from fewshot_sla.episodes import EpisodeSampler
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
cfg = apply_recipe(RunConfig(**spec["config"]))
device = torch.device(cfg.device)
size, classes, per_class = spec["image_size"], 64, spec["per_class"]
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (classes * per_class, size, size, 3), dtype=torch.uint8, generator=g).to(device)
split = Split("train", images, torch.arange(classes, device=device).repeat_interleave(per_class),
              [f"c{i:02d}" for i in range(classes)], [f"i{i:06d}" for i in range(classes * per_class)])
pipeline = ImagePipeline(size, size)
learner, objective = build_model(cfg, size, device)
sampler = EpisodeSampler(split, episode_specs(cfg)[0], seed=1)
profile = profile_step(learner, objective, sampler, pipeline, cfg.meta_batch, cfg.optimizer, cfg.momentum or 0.0,
                       False)
k, ckpt, micro_batches = spec["micro_batch"], spec["checkpointing"], spec["micro_batches"]
estimate = profile.estimate(k, ckpt)
if ckpt:
    enable(learner.backbone)
params = [p for p in list(learner.parameters()) + list(objective.parameters()) if p.requires_grad]
optimizer = make_optimizer(cfg, params)
learner.train()
times, peaks = [], []
for step in range(spec["warmup"] + spec["steps"]):
    batch = pipeline.episode(sampler.sample(cfg.meta_batch))
    meter = PeakMeter(device)
    meter.start()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for m in range(micro_batches):
        accumulate_gradients(learner, objective, batch.select(slice(m * k, (m + 1) * k)), k, cfg.meta_batch)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if step >= spec["warmup"]:
        times.append(time.perf_counter() - start)
        peaks.append(meter.peak() - meter.baseline)
print(json.dumps({"estimate": estimate, "peak": max(peaks), "seconds": sorted(times)[len(times) // 2]}))
"""


def measure(
    config: dict,
    image_size: int,
    micro_batch: int,
    checkpointing: bool,
    micro_batches: int,
    threads: int,
    steps: int = 1,
    warmup: int = 0,
    per_class: int = 25,
) -> dict:
    """One measurement in a fresh process (so its peak resident memory is its own)."""
    spec = {
        "config": config,
        "image_size": image_size,
        "micro_batch": micro_batch,
        "checkpointing": checkpointing,
        "micro_batches": micro_batches,
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "per_class": per_class,
    }
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / GIB:.1f}"


def paper(args: argparse.Namespace) -> None:
    config = {"method": "metaoptnet-svm", "backbone": "resnet12", "dataset": "miniimagenet", "device": args.device}
    size = 84
    if args.tiny:  # the same code paths in seconds: a narrow ResNet-12 at 16x16
        config["backbone_options"], size = {"channels": [4, 4, 8, 8]}, 16
    meta_batch = 8
    print(
        f"paper step: MetaOptNet-SVM + rotation SLA, ResNet-12 at {size}x{size}, {meta_batch} episodes of "
        f"5 x (15 + 6) x 4 images; {args.device}, {args.threads} thread(s); one micro-batch measured per row, "
        f"step time = {meta_batch}/K x it"
    )
    print(
        f"{'K':>3} {'ckpt':>5} {'estimate GB':>12} {'measured GB':>12} {'est/meas':>9} {'micro-batch s':>14} "
        f"{'step s':>8} {'x no-ckpt':>10}"
    )
    plain_time: dict[int, float] = {}
    for k, ckpt in args.options:
        row = measure(config, size, k, ckpt, 1, args.threads, per_class=30)
        if "error" in row:
            print(f"{k:>3} {ckpt!s:>5}  failed: {row['error']}")
            continue
        step = row["seconds"] * meta_batch / k
        if not ckpt:
            plain_time[k] = step
        ratio = f"{step / plain_time[k]:.2f}" if ckpt and k in plain_time else "-"
        print(
            f"{k:>3} {ckpt!s:>5} {gb(row['estimate']):>12} {gb(row['peak']):>12} "
            f"{row['estimate'] / row['peak']:>9.2f} {row['seconds']:>14.1f} {step:>8.1f} {ratio:>10}"
        )
    if args.full_step:
        k, ckpt = args.options[0]
        row = measure(config, size, k, ckpt, meta_batch // k, args.threads, per_class=30)
        print(f"one whole step, K={k}, checkpointing {ckpt}: {row}")


def protonet30(args: argparse.Namespace) -> None:
    config = {
        "method": "protonet",
        "dataset": "miniimagenet",
        "train_ways": 30,
        "train_queries": 15,
        "device": args.device,
    }
    print(
        f"30-way 1-shot 15-query ProtoNet + rotation SLA, Conv-4 at 64x64 (1,920 images a step); "
        f"{args.threads} thread(s), median of {args.steps} steps after 1 warm-up"
    )
    print(f"{'ckpt':>5} {'estimate GB':>12} {'measured GB':>12} {'est/meas':>9} {'step s':>8} {'x no-ckpt':>10}")
    base = None
    for ckpt in (False, True):
        row = measure(config, 64, 1, ckpt, 1, args.threads, steps=args.steps, warmup=1)
        if "error" in row:
            print(f"{ckpt!s:>5}  failed: {row['error']}")
            continue
        base = base or row["seconds"]
        print(
            f"{ckpt!s:>5} {gb(row['estimate']):>12} {gb(row['peak']):>12} {row['estimate'] / row['peak']:>9.2f} "
            f"{row['seconds']:>8.2f} {row['seconds'] / base:>10.2f}"
        )


def processes(args: argparse.Namespace) -> None:
    episodes = 16 if args.tiny else args.episodes
    flags = [
        "--method",
        "metaoptnet-ridge",
        "--train-episodes",
        str(episodes),
        "--val-every",
        str(episodes),
        "--val-episodes",
        "20",
        "--eval-episodes",
        "20",
        "--device",
        args.device,
        "--quiet",
        "--fit-memory",
        "off",
    ]
    if args.tiny:
        flags += ["--backbone-option", "hidden=8"]
    layouts = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        data = ["--data-root", args.data_root] if args.data_root else []
        for round_ in range(1 if args.tiny else args.rounds):
            for name, (nproc, threads) in layouts.items():
                out = Path(tmp) / f"{round_}-{nproc}-{threads}"
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                launch = (
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                    if nproc > 1
                    else [sys.executable]
                )
                command = [*launch, "-m", "fewshot_sla", *data, "run", *flags, "--out", str(out)]
                proc = subprocess.run(command, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
                rates[name].append(json.loads((out / "results.json").read_text())["train"]["episodes_per_s"])
    base = statistics.median(rates["1 process x 1 thread"])
    print(
        f"MetaOptNet-RR + rotation SLA on the synthetic set, meta-batch 8 (5-way 5-shot 6-query), {episodes} "
        f"training episodes a run, {args.device}, {args.rounds} interleaved rounds; training episodes/s "
        "(median, min-max)"
    )
    for name, values in rates.items():
        print(
            f"  {name:<24} {statistics.median(values):7.2f}  ({min(values):.2f}-{max(values):.2f})  "
            f"{statistics.median(values) / base:.2f}x 1 x 1"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("paper", "protonet30", "processes"), required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the measuring process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (processes: several processes share the GPU)")
    parser.add_argument("--tiny", action="store_true", help="the same code paths on tiny models, in seconds")
    parser.add_argument(
        "--options",
        default="1:off,1:on,2:on",
        help="paper: comma-separated K:off|on (micro-batch, checkpointing) to measure",
    )
    parser.add_argument("--full-step", action="store_true", help="paper: also time one whole step (first option)")
    parser.add_argument("--steps", type=int, default=3, help="protonet30: timed steps per setting")
    parser.add_argument("--rounds", type=int, default=3, help="processes: interleaved rounds")
    parser.add_argument("--episodes", type=int, default=160, help="processes: training episodes per run")
    parser.add_argument("--data-root", help="processes: data root holding the synthetic store")
    args = parser.parse_args()
    args.options = [(int(k), flag == "on") for k, flag in (o.split(":") for o in args.options.split(","))]
    start = time.perf_counter()
    {"paper": paper, "protonet30": protonet30, "processes": processes}[args.case](args)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
