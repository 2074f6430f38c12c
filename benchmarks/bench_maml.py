"""MAML episodes one after the other (``episodes="loop"``) against ``torch.func.vmap`` over them
(``episodes="vmap"``), on this machine: meta-training steps (forward + meta-gradient) and test-time
adaptations per second, second and first order, all parameters or head only.

Default workload: the MAML recipe's Conv-4 (32 filters), 5-way 1-shot, 15 queries per class, meta-batch 4,
5 inner steps in training and 10 at test, random images. Timings interleave the two modes and report the
median of several repeats; the ratio is vmap time / loop time (above 1: the loop is faster). Run from the
repository root:

    python benchmarks/bench_maml.py                   # 32x32 images
    python benchmarks/bench_maml.py --size 84 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fewshot_sla.registry import BACKBONES, LEARNERS


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """Random meta-batch: support, support labels, query, query labels (label-major rows)."""
    g = torch.Generator().manual_seed(0)
    b, n, k, q, s = args.meta_batch, args.ways, args.shots, args.queries, args.size
    support = torch.randn(b, n * k, 3, s, s, generator=g)
    query = torch.randn(b, n * q, 3, s, s, generator=g)
    labels = torch.arange(n).repeat_interleave(k).expand(b, -1)
    query_labels = torch.arange(n).repeat_interleave(q).expand(b, -1)
    return support, labels, query, query_labels


def seconds(fn: Callable[[], None]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(learner: torch.nn.Module, batch: tuple[torch.Tensor, ...], ways: int) -> None:
    """One meta-training step's forward and meta-gradient."""
    support, labels, query, query_labels = batch
    learner.train()
    logits = learner(support, labels, query, ways)
    F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()


def test_step(learner: torch.nn.Module, batch: tuple[torch.Tensor, ...], ways: int) -> None:
    """One test-time adaptation and prediction, as evaluation runs it."""
    support, labels, query, _ = batch
    learner.eval()
    with torch.no_grad():
        learner(support, labels, query, ways)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args)
    print(
        f"conv4({args.hidden}) {args.size}x{args.size}, {args.ways}-way {args.shots}-shot {args.queries} queries, "
        f"meta-batch {args.meta_batch}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'learner':8} {'adapt':5} {'phase':5} {'loop ms':>9} {'vmap ms':>9} {'vmap/loop':>9}")
    for name in ("maml", "maml-fo"):
        for adapt in ("all", "head"):
            learners = {}
            for mode in ("loop", "vmap"):
                torch.manual_seed(0)
                backbone = BACKBONES.create("conv4", hidden=args.hidden)
                learners[mode] = LEARNERS.create(name, backbone=backbone, adapt=adapt)
                # Set after construction: maml refuses vmap for second order through BatchNorm (its
                # meta-gradients are wrong there), but its speed is still worth knowing.
                learners[mode].episodes = mode
            phases = (("train", train_step),) if name == "maml-fo" else (("train", train_step), ("test", test_step))
            for phase, step in phases:  # maml-fo at test is maml at test
                for learner in learners.values():
                    step(learner, batch, args.ways)  # warm-up
                times: dict[str, list[float]] = {"loop": [], "vmap": []}
                for _ in range(args.repeats):  # interleave so that background load hits both modes alike
                    for mode, learner in learners.items():
                        times[mode].append(seconds(lambda step=step, learner=learner: step(learner, batch, args.ways)))
                loop, vmap = statistics.median(times["loop"]), statistics.median(times["vmap"])
                print(f"{name:8} {adapt:5} {phase:5} {1e3 * loop:9.1f} {1e3 * vmap:9.1f} {vmap / loop:9.2f}")


if __name__ == "__main__":
    main()
