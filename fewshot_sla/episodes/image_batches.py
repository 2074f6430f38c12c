"""Shuffled mini-batches of labelled images over every class of a split (``ImageBatchSampler``), the batches of the
pretraining regime (whole-batch classification, as SLA's reference code and RFS train), in the shape the training
loop already moves, splits over processes and micro-batches, augments and checkpoints: an ``EpisodeBatch`` of B
one-image "episodes" with no support, each query labelled with its class's canonical index (classes sorted by name)
among all ``ways`` classes of the split.

The images are visited epoch by epoch, each epoch a fresh random permutation of the split's canonical positions
(sampling without replacement, as a shuffled ``DataLoader``); a batch that crosses an epoch boundary takes the rest
of one epoch and the start of the next, so no image is dropped or repeated within an epoch. Epoch ``e``'s permutation
is drawn from a generator seeded by ``(seed, e)`` alone, so the sampler's whole state is the number of images it has
handed out (``state_dict``): a resumed run continues with exactly the images an uninterrupted one would see, and a
seed names the same batches in every store built from the same source.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from fewshot_sla.episodes.batch import EpisodeBatch
from fewshot_sla.episodes.canonical import CanonicalOrder
from fewshot_sla.episodes.rows import take_rows
from fewshot_sla.episodes.spec import whole_number
from fewshot_sla.episodes.split import SplitLike


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit seed of epoch ``epoch``'s permutation."""
    digest = hashlib.sha256(f"image-batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ImageBatchSampler:
    """Shuffled batches of B labelled images from every class of ``split`` (see the module docstring)."""

    def __init__(self, split: SplitLike, *, seed: int) -> None:
        self.split = split
        self.seed = whole_number("seed", seed, 0)
        order = CanonicalOrder.of_split(split)
        self.ways = len(order.class_names)
        self.size = len(order.rows)
        if self.size == 0:
            raise ValueError(f"split '{split.name}' has no images")
        device = split.images.device
        self._rows = torch.as_tensor(order.rows, device=device)
        self._labels = torch.as_tensor(np.repeat(np.arange(self.ways), order.class_sizes), device=device)
        self.position = 0  # images handed out so far
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.int64, device=device)

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint keeps: the number of images handed out."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state["position"]`` images."""
        self.position = whole_number("sampler position", state["position"], 0)

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the split's canonical positions."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._permutation = torch.randperm(self.size, generator=generator).to(self._rows.device)
            self._epoch = epoch
        return self._permutation

    def positions(self, batch_size: int) -> torch.Tensor:
        """The canonical positions of the next ``batch_size`` images, int64 ``[B]``; advances the sampler."""
        b = whole_number("batch size", batch_size, 1)
        parts, start = [], self.position
        while b > 0:
            epoch, offset = divmod(start, self.size)
            part = self.permutation(epoch)[offset : offset + b]
            parts.append(part)
            b -= len(part)
            start += len(part)
        self.position = start
        return torch.cat(parts)

    def sample(self, batch_size: int) -> EpisodeBatch:
        """The next ``batch_size`` images as B one-image episodes (no support), labelled among all classes."""
        positions = self.positions(batch_size)
        rows = self._rows.take(positions)
        images = take_rows(self.split.images, rows)  # [B, H, W, C]
        b, device = len(rows), images.device
        query = images.permute(0, 3, 1, 2).unsqueeze(1)  # [B, 1, C, H, W], a channels-last view
        empty = torch.empty(b, 0, dtype=torch.int64, device=device)
        return EpisodeBatch(
            support=query[:, :0],
            support_labels=empty,
            query=query,
            query_labels=self._labels.take(positions).unsqueeze(1).to(device),
            ways=self.ways,
            support_index=empty,
            query_index=rows.unsqueeze(1).to(device),
        )
