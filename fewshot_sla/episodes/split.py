"""What episodes need of a split (``SplitLike``; ``fewshot_sla.data.store.Split`` is one), and of images left on
disk (``RowReader``; ``fewshot_sla.data.disk_images.DiskImages`` is one): the episodes' contract with the data layer."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import torch


class RowReader(Protocol):
    """Images left on disk (``fewshot_sla.data.disk_images.DiskImages``): rows read on demand onto ``device``."""

    shape: torch.Size  # [N, H, W, 3]
    device: torch.device

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 ``[len(rows), H, W, 3]`` on ``device``."""
        ...

    def submit(self, read: Callable[[], torch.Tensor]) -> Future[torch.Tensor]:
        """Run ``read`` in the background."""
        ...


class SplitLike(Protocol):
    """What episodes need of a split (``fewshot_sla.data.store.Split`` is one)."""

    name: str
    labels: torch.Tensor  # int64 [N], indexing class_names
    class_names: list[str]
    image_ids: list[str]

    @property
    def images(self) -> torch.Tensor | RowReader:
        """uint8 ``[N, H, W, 3]``, in memory or on disk."""
        ...
