"""Out-of-core episodes: training episodes per second read straight from the HDF5 store, against the same
sampler on the split in memory and against the raw read speed of the same rows with a cold page cache.

For each size (``--size``: ``mini``, the 38,400 training images of mini-ImageNet, 0.8 GB; ``tiered``, the
448,695 of tieredImageNet, 9.5 GB; 84x84 random pixels) the script writes a store split the way
``data prepare`` does (one image per chunk), then measures, ``--rounds`` times in alternation:

- ``in memory``: ``EpisodeSampler.sample`` on the split loaded into RAM (warm);
- ``out of core``: the same sampler, seed and meta-batches on the split left on disk (``DiskImages``: sorted
  ``preadv`` reads in ``--threads`` threads, the next meta-batch read in the background), starting from a cold cache;
- ``raw read``: the same rows' bytes, each meta-batch's distinct rows read with ``os.preadv`` in file order
  (adjacent rows merged) from a cold cache, nothing else done, in 1, 4 and 16 threads. The fastest is the raw
  limit. ``h5py indexing``: the first meta-batches' rows through h5py's fancy indexing (``images[rows]``), cold,
  which is what the direct reads replace.

The page cache of the store file is dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; it
drops the file's clean cached pages), and ``mincore`` then confirms how much of the file is still cached (printed).
The training loop's own work (the model) is left out, so these are the data path's limits; the sampler's
read-ahead overlaps a meta-batch's reads with the caller's work on the previous one.

    python benchmarks/bench_out_of_core.py --size mini tiered --dir /var/tmp/ooc
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import mmap
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

from fewshot_sla.data.disk_images import READ_THREADS, DiskImages
from fewshot_sla.data.store import Split, append_rows, create_split
from fewshot_sla.episodes import EpisodeSampler, EpisodeSpec

# classes, images per class (None: tieredImageNet's total); tiny: a smoke test of the script
SIZES = {"mini": (64, 600), "tiered": (351, None), "tiny": (10, 40)}
TIERED_TRAIN = 448_695
IMAGE = 84
SPEC = EpisodeSpec(5, 1, 15)
META_BATCH = 8
H5PY_BATCHES = 3  # h5py's fancy indexing is slow: it reads only the first meta-batches
RAW_THREADS = (1, 4, 16)  # the raw read's thread counts; the fastest is the raw limit


def write_split(path: Path, classes: int, per_class: int | None, chunk_rows: int | None = None) -> int:
    """A store with one ``train`` split of random pixels, written in blocks as the importers do (one image per
    chunk, or ``chunk_rows`` images per chunk as older stores have)."""
    total = TIERED_TRAIN if per_class is None else classes * per_class
    labels = np.arange(total) % classes
    rng = np.random.default_rng(0)
    block = 4096
    with h5py.File(path, "w") as h5:
        group = create_split(h5, "train", [f"c{c:03d}" for c in range(classes)], IMAGE)
        if chunk_rows is not None:
            del group["images"]
            shape = (0, IMAGE, IMAGE, 3)
            chunks = (chunk_rows, IMAGE, IMAGE, 3)
            group.create_dataset("images", shape, np.uint8, maxshape=(None, IMAGE, IMAGE, 3), chunks=chunks)
        for start in range(0, total, block):
            n = min(block, total - start)
            pixels = rng.integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)
            append_rows(group, pixels, labels[start : start + n], [f"i{start + i:06d}" for i in range(n)])
    return total


def split_of(path: Path, images: torch.Tensor | DiskImages, device: torch.device) -> Split:
    with h5py.File(path, "r") as h5:
        group = h5["train"]
        return Split(
            "train",
            images,
            torch.from_numpy(group["labels"][()]).to(device),
            [s.decode() for s in group["class_names"][()]],
            [s.decode() for s in group["image_ids"][()]],
        )


def drop_cache(path: Path) -> float:
    """Drop the file's pages from the page cache; the fraction still cached afterwards (``mincore``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return cached_fraction(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def cached_fraction(fd: int, size: int) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = ctypes.create_string_buffer(pages)
    try:
        if libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return float(np.frombuffer(vector.raw, dtype=np.uint8).__and__(1).mean())
    finally:
        libc.munmap(address, size)


def episodes_per_s(sampler: EpisodeSampler, steps: int, meta_batch: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        batch = sampler.sample(meta_batch)
    if batch.query.is_cuda:
        torch.cuda.synchronize()
    return steps * meta_batch / (time.perf_counter() - start)


def recording(take: Callable[[torch.Tensor], torch.Tensor], rows_read: list[np.ndarray]) -> Callable:
    """``take`` that also records the rows it was asked for."""

    def recorded(rows: torch.Tensor) -> torch.Tensor:
        rows_read.append(rows.numpy().copy())
        return take(rows)

    return recorded


def raw_read(path: Path, offsets: np.ndarray, batches: list[np.ndarray], row_bytes: int, threads: int) -> float:
    """Episodes/s of reading each meta-batch's distinct rows with preadv in file order, merged runs."""
    fd = os.open(path, os.O_RDONLY)
    pool = ThreadPoolExecutor(threads)
    episodes = 0

    def read(chunk: np.ndarray, out: np.ndarray) -> None:
        flat, i = out.reshape(len(out), row_bytes), 0
        while i < len(chunk):
            j = i + 1
            while j < len(chunk) and chunk[j] == chunk[j - 1] + row_bytes:
                j += 1
            view, done = memoryview(flat[i:j]).cast("B"), 0
            while done < len(view):
                done += os.preadv(fd, [view[done:]], int(chunk[i]) + done)
            i = j

    start = time.perf_counter()
    for rows in batches:
        wanted = np.sort(offsets[np.unique(rows)])
        out = np.empty((len(wanted), row_bytes), dtype=np.uint8)
        bounds = np.linspace(0, len(wanted), threads + 1).astype(int)
        for future in [pool.submit(read, wanted[a:b], out[a:b]) for a, b in itertools.pairwise(bounds)]:
            future.result()
        episodes += META_BATCH
    elapsed = time.perf_counter() - start
    pool.shutdown()
    os.close(fd)
    return episodes / elapsed


def h5py_read(path: Path, batches: list[np.ndarray]) -> float:
    """Episodes/s of reading each meta-batch's distinct rows through h5py's fancy indexing (what the hand-written
    reads replace), from a cold cache."""
    with h5py.File(path, "r") as h5:
        images = h5["train"]["images"]
        start = time.perf_counter()
        for rows in batches:
            images[np.unique(rows)]
        return len(batches) * META_BATCH / (time.perf_counter() - start)


def measure(size: str, folder: Path, rounds: int, steps: int, threads: int, device: torch.device) -> None:
    classes, per_class = SIZES[size]
    path = folder / f"ooc-{size}.h5"
    start = time.perf_counter()
    total = write_split(path, classes, per_class)
    print(
        f"\n{size}: {total} images of {IMAGE}x{IMAGE} ({path.stat().st_size / 2**30:.2f} GiB on disk), "
        f"written in {time.perf_counter() - start:.0f} s; {SPEC.tag} episodes, meta-batch {META_BATCH}, {steps} steps"
    )
    disk_images = DiskImages(path, "train", device, "rebuild", threads=threads)
    memory = torch.empty(disk_images.shape, dtype=torch.uint8)
    with h5py.File(path, "r") as h5:
        h5["train"]["images"].read_direct(memory.numpy())
    in_memory_split, disk_split = split_of(path, memory.to(device), device), split_of(path, disk_images, device)
    same = EpisodeSampler(in_memory_split, SPEC, seed=1), EpisodeSampler(disk_split, SPEC, seed=1)
    identical = all(torch.equal(same[0].sample(b).query, same[1].sample(b).query) for b in (8, 8, 3, 8))
    print(f"  on {device}: the out-of-core episodes equal the in-memory ones: {'yes' if identical else 'NO'}")
    row_bytes = IMAGE * IMAGE * 3
    raw_names = {n: f"raw, {n} thread{'s' if n > 1 else ''}" for n in RAW_THREADS}
    names = ["in memory", "out of core", *raw_names.values(), "h5py indexing"]
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        seed = 100 + r
        results["in memory"].append(episodes_per_s(EpisodeSampler(in_memory_split, SPEC, seed=seed), steps, META_BATCH))
        left = drop_cache(path)
        batches: list[np.ndarray] = []  # the rows each read of the out-of-core sampler asked for
        reader = DiskImages(path, "train", device, "rebuild", threads=threads)
        reader.take = recording(reader.take, batches)  # type: ignore[method-assign]
        disk_split.images = reader
        results["out of core"].append(episodes_per_s(EpisodeSampler(disk_split, SPEC, seed=seed), steps, META_BATCH))
        reader.close()  # waits for the read-ahead still in flight
        for n, name in raw_names.items():
            left = max(left, drop_cache(path))
            results[name].append(raw_read(path, disk_images.offsets, batches, row_bytes, n))
        left = max(left, drop_cache(path))
        results["h5py indexing"].append(h5py_read(path, batches[:H5PY_BATCHES]))
        print(
            f"  round {r + 1}: "
            + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items())
            + f" episodes/s (file cached after each drop: at most {100 * left:.2f}%)"
        )
    median = {k: statistics.median(v) for k, v in results.items()}
    raw = max(median[name] for name in raw_names.values())
    mb = META_BATCH * SPEC.ways * SPEC.per_class * row_bytes / 2**20
    print(f"  medians over {rounds} rounds (episodes/s; one meta-batch reads {mb:.1f} MiB):")
    for k, v in median.items():
        print(f"    {k:>16}: {v:10,.0f}   ({v * row_bytes * SPEC.ways * SPEC.per_class / 2**20:,.0f} MiB/s)")
    print(
        f"  out of core / raw limit: {median['out of core'] / raw:.2f}; "
        f"out of core / in memory: {median['out of core'] / median['in memory']:.3f}"
    )
    disk_images.close()
    path.unlink()


def load_times(folder: Path, rounds: int) -> None:
    """Seconds to load the whole mini-size split into memory, cold and warm: one image per chunk against the
    32 MB chunks of older stores."""
    old_rows = (32 << 20) // (IMAGE * IMAGE * 3)
    layouts = {"1 image per chunk": (folder / "load-new.h5", None)}
    layouts[f"{old_rows} images per chunk (32 MB)"] = (folder / "load-old.h5", old_rows)
    for path, rows in layouts.values():
        write_split(path, *SIZES["mini"], chunk_rows=rows)
    paths = {name: path for name, (path, _) in layouts.items()}
    times: dict[str, list[float]] = {f"{name}, {state}": [] for name in paths for state in ("cold", "warm")}
    for _ in range(rounds):
        for name, path in paths.items():
            drop_cache(path)
            for state in ("cold", "warm"):
                start = time.perf_counter()
                with h5py.File(path, "r") as h5:
                    images = h5["train"]["images"]
                    images.read_direct(np.empty(images.shape, np.uint8))
                times[f"{name}, {state}"].append(time.perf_counter() - start)
    print(f"\nloading the whole mini-size split (0.76 GiB), median of {rounds} rounds:")
    for name, values in times.items():
        print(f"  {name:>40}: {statistics.median(values):.2f} s")
    for path in paths.values():
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["mini", "tiered"])
    parser.add_argument("--dir", type=Path, help="where to write the stores (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=READ_THREADS, help="reading threads of DiskImages")
    parser.add_argument("--device", default="cpu", help="where the episodes land (cuda: pinned reads, then copied)")
    parser.add_argument("--load", action="store_true", help="also time whole-split loads against the chunk size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; stores under {folder}")
        for size in args.size:
            measure(size, Path(folder), args.rounds, args.steps, args.threads, torch.device(args.device))
        if args.load:
            load_times(Path(folder), args.rounds)


if __name__ == "__main__":
    main()
