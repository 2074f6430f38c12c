"""Meta-training speed: episodes per second of the engine's training step for every method, with and without
rotation SLA, at several meta-batch sizes (and AMP off/on), side by side in one run.

Each cell times ``Trainer.step`` (sampling, augmentation/normalisation on the device, objective loss, backward,
optimizer step) after warm-up steps and reports the median step time; a method's cells run interleaved, one step
of each per round, so that drifts in machine speed hit them alike (the step-memory column on a GPU is what a step
allocates on top of the resident model and optimizer). Printed ratios check the targets: an
SLA step (M = 4) costs at most 4.4x the baseline step; meta-batch 8 is at least as fast per episode as
meta-batch 1; our MAML step is at least as fast as learn2learn's ``MAML.clone()/adapt()`` loop on the same
tasks and model (when learn2learn imports).

    python benchmarks/bench_training.py                          # CPU, conv4 at 32x32 on the synthetic set
    python benchmarks/bench_training.py --device cuda --backbone resnet12 --image-size 84 --amp both
    python benchmarks/bench_training.py --device cpu --tiny      # seconds: every code path, tiny sizes

On a CPU shared with other jobs, pass ``--threads 1``: with more threads than free cores, torch's OpenMP
workers spin-wait and small steps slow down by orders of magnitude, which makes every ratio meaningless.
On the CPU the script keeps freed memory for reuse as ``fewshot-sla run`` does (``fewshot_sla.cpu_memory``);
``--glibc-default-malloc`` measures without it, and a few warm-up steps let glibc's heap settle first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fewshot_sla.config import RunConfig
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.cpu_memory import reuse_freed_memory
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline, build_model, resolve_device
from fewshot_sla.engine.train import Trainer

METHODS = ("protonet", "metaoptnet-svm", "metaoptnet-ridge", "maml", "maml-fo")
VARIANTS = (("baseline", "none"), ("sla", "rotation"))


def random_split(name: str, classes: int, per_class: int, size: int, device: torch.device) -> Split:
    """A split of random images (timings do not depend on pixel values)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, size, size, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return Split(
        name,
        images.to(device),
        labels.to(device),
        [f"{name}{c:03d}" for c in range(classes)],
        [f"{name}/{i:05d}" for i in range(classes * per_class)],
    )


def load_splits(args: argparse.Namespace, device: torch.device) -> tuple[Split, Split, int]:
    """Train and validation splits on ``device`` and their image size."""
    if args.data == "random":
        size, per_class = (16, 10) if args.tiny else (32, 150)
        return (
            random_split("train", 64, per_class, size, device),
            random_split("val", 16, per_class, size, device),
            size,
        )
    store = open_store("synthetic", args.data_root)
    return store.split("train", device=device), store.split("val", device=device), store.image_size


def make_trainer(
    args: argparse.Namespace,
    method: str,
    objective: str,
    transform: str,
    meta_batch: int,
    amp: bool,
    splits: tuple[Split, Split, int],
    device: torch.device,
    run_dir: Path,
) -> Trainer:
    """A Trainer for one benchmark cell (the engine's own training step, no validation)."""
    train, val, store_size = splits
    image_size = args.image_size or store_size
    backbone_options = {"hidden": args.hidden} if args.backbone == "conv4" else {}
    cfg = apply_recipe(
        RunConfig(
            method=method,
            backbone=args.backbone,
            backbone_options=backbone_options,
            transform=transform,
            objective=objective,
            ways=args.ways,
            shots=args.shots,
            queries=args.queries,
            train_ways=args.ways,
            train_shots=args.shots,
            train_queries=args.queries,
            meta_batch=meta_batch,
            train_episodes=10**6,
            val_episodes=1,
            amp=amp,
            device=str(device),
            augment=False,
            image_size=image_size,
        )
    )
    learner, obj = build_model(cfg, image_size, device)
    return Trainer(
        cfg, run_dir, learner, obj, train, val, ImagePipeline(image_size, store_size), device, progress=False
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[Any, tuple[Callable[[], None], int]],
    device: torch.device,
    warmup: int,
    seconds: float,
    min_steps: int,
    max_steps: int,
) -> dict[Any, tuple[float, float | None]]:
    """Time several step functions in rounds, one call of each per round, so that a machine whose speed drifts
    (other jobs, clock changes) slows every cell alike. ``steps`` maps a key to (step, episodes per step).

    Returns, per key, episodes per second from the median step time and, on a GPU, the most memory (GiB) a step
    allocated on top of what was allocated before it (activations, gradients, solver buffers), or None. Rounds
    go on until there are ``min_steps`` of them and ``seconds`` of timed calls per cell, at most ``max_steps``.
    """
    for step, _ in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    times: dict[Any, list[float]] = {key: [] for key in steps}
    peaks: dict[Any, float] = {key: 0.0 for key in steps}
    rounds = 0
    while rounds < max_steps and (rounds < min_steps or sum(map(sum, times.values())) < seconds * len(steps)):
        for key, (step, _) in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[key] = max(peaks[key], (torch.cuda.max_memory_allocated(device) - before) / 2**30)
        rounds += 1
    return {
        key: (episodes / statistics.median(times[key]), peaks[key] if device.type == "cuda" else None)
        for key, (_, episodes) in steps.items()
    }


def learn2learn_maml_step(
    args: argparse.Namespace, trainer: Trainer, device: torch.device, meta_batch: int
) -> Callable[[], None] | None:
    """A meta-training step of learn2learn's MAML.clone()/adapt() loop on our sampler's tasks with the same
    backbone and head shape, second order, 5 inner steps at lr 0.01; None when learn2learn does not import."""
    try:
        import learn2learn as l2l
    except Exception:
        return None
    from fewshot_sla.registry import BACKBONES

    torch.manual_seed(0)
    image_size = trainer.pipeline.image_size
    backbone = BACKBONES.create(args.backbone, **({"hidden": args.hidden} if args.backbone == "conv4" else {}))
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.feature_dim(image_size), args.ways)).to(device)
    maml = l2l.algorithms.MAML(model, lr=0.01, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step() -> None:
        episode = trainer.pipeline.episode(trainer.sampler.sample(meta_batch))
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for support, s_labels, query, q_labels in zip(
            episode.support, episode.support_labels, episode.query, episode.query_labels
        ):
            learner = maml.clone()
            for _ in range(5):
                learner.adapt(F.cross_entropy(learner(support), s_labels))
            total = total + F.cross_entropy(learner(query), q_labels)
        (total / meta_batch).backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--hidden", type=int, default=64, help="conv4 filters")
    parser.add_argument("--image-size", type=int, default=None, help="resize to this size (default: the store's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--meta-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--amp", choices=("off", "on", "both"), default="off")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5, help="queries per class (5: the synthetic recipe's)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per cell (at least --min-steps)")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per cell")
    parser.add_argument(
        "--glibc-default-malloc",
        action="store_true",
        help="on the CPU, leave glibc's allocator as it is (fresh pages for every large tensor)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--data", choices=("synthetic", "random"), default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smoke mode: conv4 with 4 filters, 16x16 data resized to 20x20, 2-way 1-shot 1-query, "
        "meta-batch 1 and 2, "
        "one timed step per cell, random data, one CPU thread",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.threads = 1
        args.backbone, args.hidden, args.image_size = "conv4", 4, 20  # 16x16 data resized, as gpu_check resizes
        args.ways, args.shots, args.queries = 2, 1, 1
        args.meta_batches, args.seconds, args.min_steps, args.max_steps = [1, 2], 0.0, 1, 1
        args.warmup, args.data = 0, "random"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    reused = device.type == "cpu" and not args.glibc_default_malloc and reuse_freed_memory()
    torch.manual_seed(0)
    amps = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    splits = load_splits(args, device)
    size = args.image_size or splits[2]
    print(
        f"device {device}, backbone {args.backbone}{f' ({args.hidden} filters)' if args.backbone == 'conv4' else ''} "
        f"at {size}x{size}, {args.ways}-way {args.shots}-shot {args.queries}-query training episodes, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        f"{', freed memory reused' if reused else ''}"
    )
    header = f"{'method':<17} {'objective':<14} {'B':>2} {'amp':>4} {'episodes/s':>11} {'ms/episode':>11}"
    header += "  step GiB" if device.type == "cuda" else ""
    print(header)
    rates: dict[tuple[str, str, int, bool], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            cells = {
                (method, objective, b, amp): (transform, b)
                for objective, transform in VARIANTS
                for b in args.meta_batches
                for amp in amps
            }
            trainers = {
                key: make_trainer(args, method, key[1], transform, b, key[3], splits, device, Path(tmp))
                for key, (transform, b) in cells.items()
            }
            measured = time_interleaved(
                {key: (trainer.step, key[2]) for key, trainer in trainers.items()},
                device,
                args.warmup,
                args.seconds,
                args.min_steps,
                args.max_steps,
            )
            for key, (rate, peak) in measured.items():
                rates[key] = rate
                _, objective, b, amp = key
                line = (
                    f"{method:<17} {objective + '/' + cells[key][0]:<14} {b:>2} {'on' if amp else 'off':>4} "
                    f"{rate:11.2f} {1000 / rate:11.1f}"
                )
                print(line + (f"  {peak:8.2f}" if peak is not None else ""), flush=True)
            del trainers
        print("\nratios (targets: SLA cost <= 4.4x baseline; meta-batch max >= meta-batch 1 per episode)")
        b_lo, b_hi = min(args.meta_batches), max(args.meta_batches)
        for method in args.methods:
            for amp in amps:
                for b in args.meta_batches:
                    cost = rates[method, "baseline", b, amp] / rates[method, "sla", b, amp]
                    print(
                        f"  {method:<17} amp {'on ' if amp else 'off'} B={b:<2} SLA/baseline step cost "
                        f"{cost:5.2f}x {'ok' if cost <= 4.4 else 'ABOVE 4.4x'}"
                    )
                for objective, _ in VARIANTS:
                    speedup = rates[method, objective, b_hi, amp] / rates[method, objective, b_lo, amp]
                    print(
                        f"  {method:<17} amp {'on ' if amp else 'off'} {objective:<8} B={b_hi} vs B={b_lo} "
                        f"episodes/s {speedup:5.2f}x {'ok' if speedup >= 1 else 'BELOW 1x'}"
                    )
        if "maml" in args.methods:
            b = b_hi
            trainer = make_trainer(args, "maml", "baseline", "none", b, False, splits, device, Path(tmp))
            theirs = learn2learn_maml_step(args, trainer, device, b)
            if theirs is None:
                print("\nlearn2learn not importable: MAML comparison skipped (see DEVELOPERS.md to install it)")
            else:
                measured = time_interleaved(
                    {"ours": (trainer.step, b), "learn2learn": (theirs, b)},
                    device,
                    args.warmup,
                    args.seconds,
                    args.min_steps,
                    args.max_steps,
                )
                ours, l2l = measured["ours"][0], measured["learn2learn"][0]
                print(
                    f"\nMAML B={b}, baseline: ours {ours:.2f} episodes/s, learn2learn clone()/adapt() "
                    f"{l2l:.2f} episodes/s: {ours / l2l:.2f}x {'ok' if ours >= l2l else 'SLOWER'}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
