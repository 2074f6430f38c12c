"""Feature-cached evaluation for ``EmbeddingLearner``s: embed every test image (and transformed copy) once.

An ``EmbeddingLearner``'s logits depend on the images only through per-image embeddings, so the embeddings
``learner.embed(t_j(x_i))`` of every split row ``i`` an episode set uses, for each copy ``j`` the objective's
predictions need (``objective.prediction_copies``), are computed once. Each batch of episodes then gathers its
rows' embeddings, copies sample-major as the objective expects, and calls
``objective.predict_copies(learner.head, ...)``: the same prediction code as uncached evaluation, on stored
embeddings instead of fresh backbone passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from fewshot_sla.episodes import EpisodeSpec, RowReader, read_ahead
from fewshot_sla.learners.base import EmbeddingLearner
from fewshot_sla.objectives import CopiedEpisode, Objective

EMBED_CHUNK = 256  # images per backbone call while filling the cache


class ImagesOf:
    """Split images (in memory or on disk) and the function making them model-ready: ``blocks`` of split rows
    -> the float images ``[1, n, C, H, W]`` of each block, the next block read ahead from disk."""

    def __init__(self, split_images: torch.Tensor | RowReader, prepare: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.split_images = split_images
        self.prepare = prepare

    def blocks(self, blocks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The model-ready images of each block of rows, in turn."""
        for picked in read_ahead(self.split_images, blocks):  # [n, H, W, C] uint8
            yield self.prepare(picked.permute(0, 3, 1, 2).unsqueeze(0))


class FeatureCache:
    """Embeddings ``[copies, rows, D]`` of the split rows an episode set uses, under its first ``copies`` copies.

    ``objective.transform.ops[j]`` makes copy ``j``; the learner must be in evaluation mode (the embeddings
    are computed once, so they must not depend on the batch they were computed in).
    """

    def __init__(
        self,
        learner: EmbeddingLearner,
        objective: Objective,
        images_of: ImagesOf,
        rows: torch.Tensor,
        chunk: int = EMBED_CHUNK,
    ) -> None:
        if not isinstance(learner, EmbeddingLearner):
            raise TypeError(f"feature caching needs an EmbeddingLearner, got {type(learner).__name__}")
        if learner.training:
            raise ValueError("feature caching needs the learner in evaluation mode (learner.eval())")
        self.copies = objective.prediction_copies
        used = torch.unique(rows.flatten())
        self.slot = torch.full((int(used.max()) + 1,), -1, dtype=torch.long, device=rows.device)
        self.slot[used] = torch.arange(len(used), device=rows.device)
        ops = objective.transform.ops[: self.copies]
        parts: list[list[torch.Tensor]] = [[] for _ in ops]
        for images in images_of.blocks([used[start : start + chunk] for start in range(0, len(used), chunk)]):
            for j, op in enumerate(ops):  # each image is read once for all its copies
                parts[j].append(learner.embed(op(images))[0])
        self.table = torch.stack([torch.cat(p) for p in parts])  # [copies, rows, D]

    @property
    def feature_dim(self) -> int:
        """The embedding size D."""
        return int(self.table.shape[-1])

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """Split rows ``[B, R]`` -> their embeddings with copies, sample-major ``[B, R*copies, D]``."""
        slots = self.slot[rows.to(self.slot.device)]
        if bool((slots < 0).any()):
            raise KeyError("the feature cache holds no embedding for some requested split row")
        picked = self.table[:, slots]  # [copies, B, R, D]
        b, r = rows.shape
        return picked.permute(1, 2, 0, 3).reshape(b, r * self.copies, -1)

    def episode(self, rows: torch.Tensor, spec: EpisodeSpec) -> CopiedEpisode:
        """Split rows of B episodes ``[B, N, K+Q]`` (label-major) -> the episodes as cached embeddings."""
        b, n, k, q = rows.shape[0], spec.ways, spec.shots, spec.queries
        labels = torch.arange(n, device=self.slot.device).view(1, n, 1)
        return CopiedEpisode(
            support=self.features(rows[:, :, :k].reshape(b, n * k)),
            support_labels=labels.expand(b, n, k).reshape(b, n * k),
            query=self.features(rows[:, :, k:].reshape(b, n * q)),
            query_labels=labels.expand(b, n, q).reshape(b, n * q),
            ways=n,
            m=self.copies,
        )
