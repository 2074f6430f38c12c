"""``EpisodeBatch``: B episodes' support and query images, labels and split rows, label-major."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EpisodeBatch:
    """B episodes: ``support`` uint8 ``[B, N*K, C, H, W]``, ``query`` uint8 ``[B, N*Q, C, H, W]``, labels in 0..N-1.

    Rows are label-major (support row n*K+k and query row n*Q+q have label n). The image tensors are
    channels-last views of one gathered block (use ``reshape``, not ``view``, to merge their image dims);
    ``support_index``/``query_index`` give each row's row in the split (e.g. for feature caches).
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    ways: int
    support_index: torch.Tensor
    query_index: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of episodes B."""
        return self.support.shape[0]

    def select(self, episodes: slice) -> EpisodeBatch:
        """Some of the episodes (a slice along the batch dimension), as views."""
        return EpisodeBatch(
            self.support[episodes],
            self.support_labels[episodes],
            self.query[episodes],
            self.query_labels[episodes],
            self.ways,
            self.support_index[episodes],
            self.query_index[episodes],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        """The same episodes with every tensor on ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return EpisodeBatch(
            move(self.support),
            move(self.support_labels),
            move(self.query),
            move(self.query_labels),
            self.ways,
            move(self.support_index),
            move(self.query_index),
        )
