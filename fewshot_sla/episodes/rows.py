"""Images taken from a split, in memory or on disk (``RowReader``): the one place that happens.

``take_rows`` reads rows, ``gather_episodes`` makes an ``EpisodeBatch`` of episodes' split rows in one gather,
``read_ahead`` reads the next block of rows from disk in the background, ``episode_batches`` gives the episodes of
fixed rows batch by batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from concurrent.futures import Future

import torch

from fewshot_sla.episodes.batch import EpisodeBatch
from fewshot_sla.episodes.spec import EpisodeSpec, whole_number
from fewshot_sla.episodes.split import RowReader


def _wide_rows(images: torch.Tensor) -> torch.Tensor:
    """Each image as one row of the widest integer type that tiles it: ``index_select`` copies such rows
    several times faster than the 4-D uint8 tensor (about as fast as a plain memory copy)."""
    flat = images.reshape(images.shape[0], -1)
    for dtype in (torch.int64, torch.int32):
        width = dtype.itemsize // images.element_size()
        if width > 1 and flat.shape[1] % width == 0 and flat.storage_offset() % width == 0 and flat.stride(1) == 1:
            return flat.view(dtype)
    return flat


def take_rows(images: torch.Tensor | RowReader, rows: torch.Tensor) -> torch.Tensor:
    """The split images of ``rows`` ``[R]``, uint8 ``[R, H, W, C]`` on the images' device, from memory or disk."""
    if not isinstance(images, torch.Tensor):
        return images.take(rows)
    picked = _wide_rows(images).index_select(0, rows.to(images.device))
    return picked.view(images.dtype).view(len(rows), *images.shape[1:])


def flat_rows(rows: torch.Tensor, spec: EpisodeSpec) -> torch.Tensor:
    """Split rows ``[B, N, K+Q]`` in the order ``gather_episodes`` reads them: every support row, then every query."""
    k = spec.shots
    return torch.cat((rows[:, :, :k].reshape(len(rows), -1), rows[:, :, k:].reshape(len(rows), -1)), dim=1).view(-1)


def gather_episodes(
    images: torch.Tensor | RowReader, rows: torch.Tensor, spec: EpisodeSpec, picked: torch.Tensor | None = None
) -> EpisodeBatch:
    """An EpisodeBatch from split ``images`` ``[N, H, W, C]`` and split rows ``[B, ways, K+Q]``, in one gather
    (or from ``picked``, those rows' images already read, e.g. in the background)."""
    if len(images.shape) != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, C] with C = 1 or 3, got {list(images.shape)}")
    b, n, k, q = rows.shape[0], spec.ways, spec.shots, spec.queries
    if tuple(rows.shape) != (b, n, k + q):
        raise ValueError(f"rows must be [B, {n}, {k + q}], got {list(rows.shape)}")
    rows = rows.to(images.device)
    support_index = rows[:, :, :k].reshape(b, n * k)
    query_index = rows[:, :, k:].reshape(b, n * q)
    h, w, c = images.shape[1:4]
    if picked is None:
        picked = take_rows(images, flat_rows(rows, spec))
    picked = picked.view(b, n * (k + q), h, w, c).permute(0, 1, 4, 2, 3)
    label = torch.arange(n, device=images.device).view(1, n, 1)
    return EpisodeBatch(
        support=picked[:, : n * k],
        support_labels=label.expand(b, n, k).reshape(b, n * k),
        query=picked[:, n * k :],
        query_labels=label.expand(b, n, q).reshape(b, n * q),
        ways=n,
        support_index=support_index,
        query_index=query_index,
    )


def read_ahead(images: torch.Tensor | RowReader, blocks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``take_rows`` of each block of split rows in turn; from disk, the next block is read in the background
    while the caller works on the current one."""
    if isinstance(images, torch.Tensor):
        for block in blocks:
            yield take_rows(images, block)
        return
    pending: Future[torch.Tensor] | None = None
    for block in blocks:
        upcoming = images.submit(functools.partial(images.take, block))
        if pending is not None:
            yield pending.result()
        pending = upcoming
    if pending is not None:
        yield pending.result()


def episode_batches(
    images: torch.Tensor | RowReader, rows: torch.Tensor, spec: EpisodeSpec, batch_size: int
) -> Iterator[EpisodeBatch]:
    """The episodes of split rows ``[count, N, K+Q]`` in order, ``batch_size`` at a time (the last may be
    smaller), the next batch read ahead from disk."""
    step = whole_number("batch size", batch_size, 1)
    chunks = [rows[start : start + step] for start in range(0, rows.shape[0], step)]
    for chunk, picked in zip(chunks, read_ahead(images, [flat_rows(c, spec) for c in chunks]), strict=True):
        yield gather_episodes(images, chunk, spec, picked)
