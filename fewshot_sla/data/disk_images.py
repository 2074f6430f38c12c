"""A split's images left on disk: rows read from the HDF5 store on demand, for splits larger than memory.

The store's image datasets have no filters (no compression, shuffle or checksum), so each image is a plain
``H*W*3`` run of bytes inside a chunk whose file offset HDF5 reports once (``chunk_iter``). ``take`` then reads
the asked rows with ``os.preadv`` in file order, merging rows that lie next to each other in the file into one
read, split over a few threads (``preadv`` releases the GIL, and several reads in flight keep an SSD busy).
The bytes are exactly what ``h5py`` would return; the tests compare the two. ``submit`` runs a read in a background
thread (the samplers read the next meta-batch there while the model works on the current one).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import io_error

READ_THREADS = 16  # reads in flight per ``take`` (benchmarks/bench_out_of_core.py)


def row_offsets(dataset: h5py.Dataset) -> np.ndarray:
    """File offset in bytes of every image (row) of an unfiltered, chunked or contiguous image dataset."""
    rows, row_bytes = dataset.shape[0], int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
    if dataset.compression or dataset.shuffle or dataset.fletcher32 or dataset.scaleoffset is not None:
        raise ValueError("the image dataset is filtered (compressed), so its rows cannot be read directly")
    if dataset.chunks is None:
        start = dataset.id.get_offset()
        if start is None and rows:
            raise ValueError("the image dataset has no storage allocated")
        return (start or 0) + row_bytes * np.arange(rows, dtype=np.int64)
    if tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
        raise ValueError("the image dataset's chunks split images, so its rows cannot be read directly")
    per_chunk = dataset.chunks[0]
    chunk_start = np.full((rows + per_chunk - 1) // per_chunk, -1, dtype=np.int64)

    def record(info: h5py.h5d.StoreInfo) -> None:
        chunk_start[info.chunk_offset[0] // per_chunk] = info.byte_offset

    if rows:
        dataset.id.chunk_iter(record)
    if (chunk_start < 0).any():
        raise ValueError("some chunks of the image dataset were never written")
    within = np.arange(rows, dtype=np.int64)
    return chunk_start[within // per_chunk] + (within % per_chunk) * row_bytes


class DiskImages:
    """The images ``[N, H, W, 3]`` uint8 of one store split, read on demand; ``take`` returns them on ``device``.

    ``rebuild`` is the command that rebuilds the store, for the error a damaged or truncated file gives.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str,
        device: torch.device,
        rebuild: str,
        *,
        threads: int = READ_THREADS,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.rebuild = rebuild
        with h5py.File(self.path, "r") as h5:
            dataset = h5[split]["images"]
            self.shape = torch.Size(dataset.shape)
            try:
                self.offsets = row_offsets(dataset)
            except ValueError as err:
                why = f"store {self.path} cannot be read out of core: {err}; rebuild it with '{rebuild}'"
                raise UserError(why) from None
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._order = np.argsort(self.offsets, kind="stable")  # rows in file order
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(len(self._order))
        self._threads = max(1, threads)
        self._readers = ThreadPoolExecutor(self._threads, thread_name_prefix="fewshot-sla-read")
        self._background = ThreadPoolExecutor(1, thread_name_prefix="fewshot-sla-prefetch")
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)  # pread needs no file position: one fd serves all
        except OSError as err:
            raise io_error(err, self.path, "read the store") from None

    def __len__(self) -> int:
        return int(self.shape[0])

    def close(self) -> None:
        """Stop the reading threads and close the file."""
        self._background.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self._background.shutdown(wait=False)
            self._readers.shutdown(wait=False)
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None

    def _read_runs(self, out: np.ndarray, offsets: np.ndarray, first: int, last: int) -> None:
        """Fill ``out[first:last]`` with the rows at ``offsets[first:last]`` (ascending), merging adjacent ones."""
        fd = self._fd
        assert fd is not None, "the store was closed"
        flat = out.reshape(len(out), self.row_bytes)
        i = first
        while i < last:
            j = i + 1
            while j < last and offsets[j] == offsets[j - 1] + self.row_bytes:
                j += 1
            view, done, start = memoryview(flat[i:j].data).cast("B"), 0, int(offsets[i])
            while done < len(view):
                try:
                    got = os.preadv(fd, [view[done:]], start + done)
                except OSError as err:
                    raise io_error(err, self.path, "read the store") from None
                if got == 0:
                    raise UserError(f"store {self.path} is truncated; rebuild it with '{self.rebuild}'")
                done += got
            i = j

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of split ``rows`` (any order, repeats allowed), uint8 ``[len(rows), H, W, 3]`` on ``device``."""
        wanted = rows.detach().cpu().numpy().reshape(-1).astype(np.int64)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise IndexError(f"row index out of range for a split of {len(self)} images")
        ranks, inverse = np.unique(self._rank[wanted], return_inverse=True)  # distinct rows, in file order
        offsets = self.offsets[self._order[ranks]]
        pinned = self.device.type == "cuda" and torch.cuda.is_available()
        block = torch.empty((len(ranks), *self.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        out = block.numpy()
        bounds = np.linspace(0, len(ranks), min(self._threads, max(1, len(ranks))) + 1).astype(np.int64)
        parts = [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]
        if len(parts) == 1:
            self._read_runs(out, offsets, *parts[0])
        else:
            for future in [self._readers.submit(self._read_runs, out, offsets, a, b) for a, b in parts]:
                future.result()
        moved = block.to(self.device, non_blocking=pinned)  # the distinct rows only, then reordered there
        if len(ranks) == len(wanted) and (inverse == np.arange(len(wanted))).all():
            return moved
        return moved.index_select(0, torch.from_numpy(inverse.reshape(-1)).to(self.device))

    def submit(self, read: Callable[[], torch.Tensor]) -> Future[torch.Tensor]:
        """Run ``read`` in the background (one of the reading threads)."""
        return self._background.submit(read)
