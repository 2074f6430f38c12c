"""What integrity and durability cost: the checksum check on every store load, and fsync on every checkpoint.

- ``load``: loading every split of a prepared store with its content digests checked (the default) against the
  same loads with the check skipped, interleaved over ``--rounds`` (the file is in the page cache after the first
  load, so this is the check's cost against a fast load: an upper bound of its share).
- ``checkpoint``: writing a training checkpoint of a Conv-4 and of a ResNet-12 model (weights and SGD momentum) the
  suite's way (temporary file, fsync of the file and its folder, rename) against a bare ``torch.save``.

Prints medians, ranges and the paired ratio per case (checked / unchecked, durable / bare).

    python benchmarks/bench_integrity.py --store .data/tinyimagenet.h5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fewshot_sla.data.store import DatasetStore
from fewshot_sla.engine.checkpoint import save_checkpoint


def _time(action) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _report(name: str, label_a: str, a: list[float], label_b: str, b: list[float]) -> None:
    ratios = [x / y for x, y in zip(a, b)]
    print(
        f"{name}: {label_a} median {statistics.median(a):.3f} s (min {min(a):.3f}, max {max(a):.3f}); "
        f"{label_b} median {statistics.median(b):.3f} s (min {min(b):.3f}, max {max(b):.3f}); "
        f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def bench_load(path: Path, rounds: int) -> None:
    checked = DatasetStore(path)
    if not checked.checked:
        raise SystemExit(f"{path} has no checksums; rebuild it with 'fewshot-sla data prepare ... --force'")
    unchecked = DatasetStore(path)
    unchecked.attrs = {k: v for k, v in unchecked.attrs.items() if not k.startswith("digest_")}
    images = sum(int(s["images"]) for s in checked.summary()["splits"].values())

    def load(store: DatasetStore) -> None:
        for name in store.split_names:
            store.split(name)

    load(checked)  # into the page cache
    with_check, without = [], []
    for _ in range(rounds):
        with_check.append(_time(lambda: load(checked)))
        without.append(_time(lambda: load(unchecked)))
    _report(f"load of {path.name} ({images} images, every split)", "checked", with_check, "unchecked", without)


def bench_checkpoint(rounds: int) -> None:
    from fewshot_sla.backbones.conv4 import Conv4
    from fewshot_sla.backbones.resnet12 import ResNet12

    for name, model, side in (("Conv-4", Conv4(), 32), ("ResNet-12", ResNet12(), 84)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, side, side)).sum().backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 2
        durable, bare = [], []
        with tempfile.TemporaryDirectory() as folder:
            for i in range(rounds):
                durable.append(_time(lambda: save_checkpoint(Path(folder) / "last.pt", state)))  # noqa: B023
                bare.append(_time(lambda: torch.save(state, Path(folder) / f"bare{i}.pt")))  # noqa: B023
        _report(f"checkpoint write ({name} + momentum, {size / 2**20:.1f} MiB)", "durable", durable, "bare", bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="a prepared store (.h5) with checksums")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_load(args.store, args.rounds)
    bench_checkpoint(args.rounds)


if __name__ == "__main__":
    main()
