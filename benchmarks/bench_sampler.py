"""Episode-batch assembly speed, single process on this CPU: fewshot-sla's batched sampler side by side with
(a) a plain contiguous copy of the same number of bytes (the physical limit), (b) the per-image Dataset +
DataLoader + collate pattern most libraries use, and (c) learn2learn's TaskDataset (when importable).

Default workload: 5-way 5-shot 15-query episodes of 84x84 uint8 images from an in-memory store the size of
mini-ImageNet's train split (64 classes x 600 random images). Every method produces the same thing: support
and query image tensors ``[.., 3, H, W]`` uint8 with labels 0..N-1. Run from the repository root:

    python benchmarks/bench_sampler.py                      # learn2learn column skipped when absent
    PYTHONPATH=. .venv-l2l/bin/python benchmarks/bench_sampler.py   # with learn2learn (see DEVELOPERS.md)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from fewshot_sla.episodes import EpisodeSampler, EpisodeSpec


class InMemorySplit:
    """A store split as ``fewshot_sla.data.store.Split`` holds it."""

    def __init__(self, classes: int, per_class: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.name = "train"
        self.images = torch.empty((classes * per_class, size, size, 3), dtype=torch.uint8).random_(0, 256, generator=g)
        self.labels = torch.arange(classes).repeat_interleave(per_class)
        self.class_names = [f"class{c:03d}" for c in range(classes)]
        self.image_ids = [f"{c:03d}_{i:04d}" for c in range(classes) for i in range(per_class)]


class ImageDataset(Dataset):
    """The per-image dataset of the usual pattern: item i is (image i, its label)."""

    def __init__(self, split: InMemorySplit) -> None:
        self.images, self.labels = split.images, split.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


class EpisodeBatchSampler:
    """Yields one episode's dataset indices per batch (all supports label-major, then all queries)."""

    def __init__(self, labels: list[int], spec: EpisodeSpec, seed: int) -> None:
        self.by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.by_class.setdefault(label, []).append(i)
        self.classes = sorted(self.by_class)
        self.spec, self.rng = spec, random.Random(seed)

    def __iter__(self):
        s = self.spec
        while True:
            picks = [self.rng.sample(self.by_class[c], s.per_class) for c in self.rng.sample(self.classes, s.ways)]
            yield [i for p in picks for i in p[: s.shots]] + [i for p in picks for i in p[s.shots :]]


def rate(step: Callable[[], int], seconds: float) -> float:
    """Episodes per CPU second of ``step`` (which returns how many episodes it made), run for ``seconds`` of CPU.

    CPU time of this process (user + system, one thread) rather than wall time, so that other work on a
    shared machine does not count against whichever method happens to run beside it.
    """
    step()  # warm-up
    done, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        done += step()
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8, help="episodes per sampler call (MetaOptNet uses 8)")
    parser.add_argument("--seconds", type=float, default=1.5, help="CPU seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per method (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = EpisodeSpec(args.ways, args.shots, args.queries)
    split = InMemorySplit(args.classes, args.per_class, args.size, seed=0)
    n, k, q, b = spec.ways, spec.shots, spec.queries, args.batch
    rows = n * spec.per_class
    image_bytes = args.size * args.size * 3
    print(
        f"{args.classes} classes x {args.per_class} images of {args.size}x{args.size} "
        f"({split.images.numel() / 2**20:.0f} MiB in memory); {spec.tag} episodes "
        f"({rows * image_bytes / 2**20:.2f} MiB each); torch {torch.__version__}, {args.threads} thread(s)"
    )

    flat = split.images.view(-1)
    copy_bytes = b * rows * image_bytes
    if copy_bytes >= flat.numel():
        parser.error("the store is smaller than one batch of episodes; raise --classes/--per-class or lower --batch")
    target = torch.empty(copy_bytes, dtype=torch.uint8)
    copy_rng = random.Random(0)

    def memcopy() -> int:  # the same bytes as B episodes, from a random place in the store
        start = copy_rng.randrange(0, flat.numel() - copy_bytes) // image_bytes * image_bytes
        target.copy_(flat[start : start + copy_bytes])
        return b

    ours = EpisodeSampler(split, spec, seed=0)
    ours_single = EpisodeSampler(split, spec, seed=0)
    labels = torch.arange(n)

    episode_indices = EpisodeBatchSampler(split.labels.tolist(), spec, seed=0)
    loader_iter = iter(DataLoader(ImageDataset(split), batch_sampler=episode_indices, num_workers=0))

    def dataloader() -> int:
        x, _ = next(loader_iter)
        images = x.view(1, rows, args.size, args.size, 3).permute(0, 1, 4, 2, 3)
        support, query = images[:, : n * k], images[:, n * k :]
        support_labels, query_labels = labels.repeat_interleave(k), labels.repeat_interleave(q)
        assert support.shape[1] == len(support_labels) and query.shape[1] == len(query_labels)
        return 1

    methods: list[tuple[str, Callable[[], int]]] = [
        ("(a) memory copy of the same bytes", memcopy),
        (f"fewshot-sla EpisodeSampler, B={b}", lambda: (ours.sample(b), b)[1]),
        ("fewshot-sla EpisodeSampler, B=1", lambda: (ours_single.sample(1), 1)[1]),
        ("(b) per-image DataLoader + collate", dataloader),
    ]
    try:
        import learn2learn as l2l
    except ImportError:
        l2l = None
        print("note: learn2learn is not importable here; column (c) skipped (see DEVELOPERS.md to install it)")
    if l2l is not None:
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(split.labels.tolist()):
            by_class.setdefault(label, []).append(i)
        meta = l2l.data.MetaDataset(ImageDataset(split), labels_to_indices=by_class)
        T = l2l.data.transforms
        taskset = l2l.data.TaskDataset(
            meta,
            task_transforms=[
                T.NWays(meta, n=n),
                T.KShots(meta, k=spec.per_class),
                T.LoadData(meta),
                T.RemapLabels(meta),
            ],
            num_tasks=-1,
        )
        random.seed(0)  # learn2learn draws from Python's global random module

        def learn2learn() -> int:
            x, y = taskset.sample()
            order = torch.argsort(y, stable=True).view(n, spec.per_class)  # group by label, then split
            support, query = x[order[:, :k].reshape(-1)], x[order[:, k:].reshape(-1)]
            assert support.shape[0] == n * k and query.shape[0] == n * q
            return 1

        methods.append((f"(c) learn2learn {l2l.__version__} TaskDataset", learn2learn))

    results: dict[str, list[float]] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every method alike
        for name, step in methods:
            results[name].append(rate(step, args.seconds))
    median = {name: statistics.median(r) for name, r in results.items()}
    copy_rate = median["(a) memory copy of the same bytes"]
    best_ours = max(v for name, v in median.items() if name.startswith("fewshot-sla"))
    print(f"\n{'method':<42}{'episodes/s':>12}{'ms/episode':>12}{'GB/s':>8}{'of (a)':>9}{'ours is':>10}")
    for name, value in median.items():
        speedup = "" if name.startswith("fewshot-sla") else f"{best_ours / value:.2f}x"
        print(
            f"{name:<42}{value:>12.0f}{1000 / value:>12.3f}{value * rows * image_bytes / 1e9:>8.2f}"
            f"{value / copy_rate:>9.2f}{speedup:>10}"
        )
    print(
        f"\n'ours is' = best fewshot-sla rate / that method's rate; medians of {args.repeats} runs of "
        f"{args.seconds:g} CPU s each. Targets: >= 0.5 of (a), >= 1.5x (b), >= 5x (c)."
    )


if __name__ == "__main__":
    main()
