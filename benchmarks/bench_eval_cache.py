"""Evaluation speed with and without the feature cache: N cached episodes against M uncached ones, same model,
same fixed episode set (the M episodes are the first M of the N), side by side in one run.

Target: 10,000 cached episodes take less time than 600 uncached ones (default sizes). The script also checks
that both paths give the same per-episode accuracies on the shared episodes.

    python benchmarks/bench_eval_cache.py                       # CPU, conv4 at 32x32, synthetic test split
    python benchmarks/bench_eval_cache.py --device cuda --backbone resnet12 --image-size 84 --amp
    python benchmarks/bench_eval_cache.py --device cpu --tiny   # seconds: the same code paths, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
import torch

from fewshot_sla.config import RunConfig
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.cpu_memory import reuse_freed_memory
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline, build_model, resolve_device
from fewshot_sla.engine.evaluate import evaluate
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec


def random_split(classes: int, per_class: int, size: int, device: torch.device) -> Split:
    """A test split of random images (timings do not depend on pixel values)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, size, size, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return Split(
        "test",
        images.to(device),
        labels.to(device),
        [f"c{c:03d}" for c in range(classes)],
        [f"test/{i:05d}" for i in range(classes * per_class)],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="protonet", help="an EmbeddingLearner (protonet, metaoptnet-*)")
    parser.add_argument("--objective", default="sla")
    parser.add_argument("--transform", default="rotation")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--hidden", type=int, default=64, help="conv4 filters")
    parser.add_argument("--image-size", type=int, default=None, help="resize to this size (default: the store's)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--cached", type=int, default=10000, help="cached episodes")
    parser.add_argument("--uncached", type=int, default=600, help="uncached episodes")
    parser.add_argument("--batch", type=int, default=20, help="episodes per uncached batch")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 on a shared CPU)")
    parser.add_argument("--data", choices=("synthetic", "random"), default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="smoke mode: conv4 with 4 filters, 16x16 random images resized to 20x20, 40 vs 10 episodes, 1 thread",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.threads = 1
        args.backbone, args.hidden, args.data, args.image_size = "conv4", 4, "random", 20  # resized, as on GPUs
        args.cached, args.uncached, args.queries = 40, 10, 5
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as fewshot-sla eval does
    if args.data == "random":
        split = random_split(20, 20 if args.tiny else 150, 16 if args.tiny else 32, device)
        store_size = split.images.shape[1]
    else:
        store = open_store("synthetic", args.data_root)
        split, store_size = store.split("test", device=device), store.image_size
    image_size = args.image_size or store_size
    cfg = apply_recipe(
        RunConfig(
            method=args.method,
            backbone=args.backbone,
            transform=args.transform,
            objective=args.objective,
            backbone_options={"hidden": args.hidden} if args.backbone == "conv4" else {},
            device=str(device),
            image_size=image_size,
        )
    )
    learner, objective = build_model(cfg, image_size, device)
    pipeline = ImagePipeline(image_size, store_size)
    spec = EpisodeSpec(args.ways, args.shots, args.queries)
    order = CanonicalOrder.of_split(split)
    many = EpisodeSet.make(order, dataset="bench", split="test", spec=spec, count=args.cached, seed=0)
    few = EpisodeSet.make(order, dataset="bench", split="test", spec=spec, count=args.uncached, seed=0)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext

    def run(episode_set: EpisodeSet, cache: bool):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = evaluate(
            learner,
            objective,
            episode_set,
            split,
            "bench",
            pipeline,
            batch_size=args.batch,
            use_cache=cache,
            autocast=autocast,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return result, time.perf_counter() - start

    print(
        f"device {device}, {args.method} / {args.backbone}"
        f"{f' ({args.hidden} filters)' if args.backbone == 'conv4' else ''} at {image_size}x{image_size}, "
        f"{args.objective}/{args.transform}, {args.ways}-way {args.shots}-shot {args.queries}-query, "
        f"test split {len(split.image_ids)} images, amp {'on' if args.amp else 'off'}"
    )
    run(EpisodeSet.make(order, dataset="bench", split="test", spec=spec, count=2, seed=1), False)  # warm-up
    uncached, t_uncached = run(few, False)
    cached, t_cached = run(many, True)
    assert cached.cached and not uncached.cached
    same = all(
        np.array_equal(cached.accuracies[k][: args.uncached], uncached.accuracies[k]) for k in uncached.accuracies
    )
    print(f"{'path':<9} {'episodes':>9} {'seconds':>9} {'episodes/s':>11}")
    print(f"{'uncached':<9} {args.uncached:>9} {t_uncached:9.2f} {args.uncached / t_uncached:11.1f}")
    print(f"{'cached':<9} {args.cached:>9} {t_cached:9.2f} {args.cached / t_cached:11.1f}")
    print(
        f"per-episode speed-up {(args.cached / t_cached) / (args.uncached / t_uncached):.1f}x; "
        f"{args.cached} cached episodes take {t_cached / t_uncached:.2f}x the time of {args.uncached} uncached "
        f"({'ok' if t_cached < t_uncached else 'SLOWER'}: target below 1x)"
    )
    print(f"identical per-episode accuracies on the {args.uncached} shared episodes: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
