"""Feature-cached evaluation for ``EmbeddingLearner``s: embed every test image (and transformed copy) once.

The objective's own ``predict`` runs unchanged on a stand-in learner whose "images" are tiny 2x2 tokens:
token ``i`` holds the values ``16*i + p`` (p = 0..11 enumerating its 3x2x2 entries). A transformation that
permutes pixels and channels (rotations, colour permutations) permutes those entries, so the stand-in's
backbone can read back both the image ``i`` and the copy ``j`` that the objective asked for, and return the
cached embedding of ``t_j(x_i)``. The learner's real ``head`` then solves every episode on cached features,
with the same code path (SI/AG aggregation, self-distillation's plain prediction) as uncached evaluation.
Transformations that are not permutations are detected up front and evaluated uncached.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fewshot_sla.learners.base import EmbeddingLearner
from fewshot_sla.sla import Transformation

TOKEN_SIDE = 2
TOKEN_STRIDE = 16  # > the 12 entries of a 3x2x2 token


def _probe() -> torch.Tensor:
    """The token pattern ``p``: 0..11 over a [3, 2, 2] image, float64."""
    return torch.arange(3 * TOKEN_SIDE * TOKEN_SIDE, dtype=torch.float64).reshape(3, TOKEN_SIDE, TOKEN_SIDE)


def copy_patterns(transform: Transformation) -> torch.Tensor | None:
    """The M transformed probe patterns ``[M, 12]``, or None when some copy is not an entry permutation."""
    probe = _probe()
    try:
        copies = transform(probe.reshape(1, 1, 3, TOKEN_SIDE, TOKEN_SIDE))[0]  # [M, 3, 2, 2]
    except Exception:  # a transformation that cannot even run on a 2x2 token cannot be cached
        return None
    patterns = copies.reshape(copies.shape[0], -1)
    if patterns.shape[1] != probe.numel():
        return None
    ordered = torch.sort(patterns, dim=1).values
    if not torch.equal(ordered, probe.reshape(1, -1).expand_as(ordered)):
        return None
    if torch.unique(patterns, dim=0).shape[0] != patterns.shape[0]:
        return None
    return patterns


def token_images(count: int, device: torch.device) -> torch.Tensor:
    """Token images of ``count`` split rows, laid out like a split's images: float64 ``[count, 2, 2, 3]``."""
    base = torch.arange(count, dtype=torch.float64, device=device).view(count, 1, 1, 1) * TOKEN_STRIDE
    return base + _probe().to(device).permute(1, 2, 0).unsqueeze(0)


class ImagesOf:
    """Callable: split rows ``[n]`` -> the model-ready float images ``[1, n, 3, H, W]`` of those rows."""

    def __init__(self, split_images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.split_images = split_images
        self.prepare = prepare

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        picked = self.split_images.index_select(0, rows.to(self.split_images.device))  # [n, H, W, 3] uint8
        return self.prepare(picked.permute(0, 3, 1, 2).unsqueeze(0))


class FeatureTable(nn.Module):
    """Cached embeddings ``learner.embed(t_j(x_i))`` of split rows ``i`` and copies ``j``, filled lazily per copy.

    Called as a backbone on tokens ``[n, 3, 2, 2]`` it returns the embeddings ``[n, D]`` they stand for.
    """

    def __init__(self, learner: EmbeddingLearner, transform: Transformation, patterns: torch.Tensor,
                 images_of: ImagesOf, rows: torch.Tensor, chunk: int = 256) -> None:
        super().__init__()
        self.learner = [learner]  # a list: not registered as a submodule
        self.transform = transform
        self.patterns = patterns
        self.images_of = images_of
        self.rows = torch.unique(rows.flatten())  # the split rows any episode uses
        self.chunk = chunk
        self.slot = torch.full((int(self.rows.max()) + 1,), -1, dtype=torch.long, device=rows.device)
        self.slot[self.rows] = torch.arange(len(self.rows), device=rows.device)
        self.tables: dict[int, torch.Tensor] = {}

    def _table(self, j: int) -> torch.Tensor:
        """Embeddings of every used row under copy ``j``, ``[rows, D]`` (computed on first use)."""
        if j not in self.tables:
            learner, op = self.learner[0], self.transform.ops[j]
            parts = []
            for start in range(0, len(self.rows), self.chunk):
                images = self.images_of(self.rows[start:start + self.chunk])  # [1, n, 3, H, W] float
                parts.append(learner.embed(op(images))[0])
            self.tables[j] = torch.cat(parts)
        return self.tables[j]

    def feature_dim(self) -> int:
        """The embedding size D (embeds the identity copies if not done yet)."""
        return int(self._table(0).shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[n, 3, 2, 2]`` -> the cached embeddings ``[n, D]`` of the images and copies they encode."""
        flat = tokens.reshape(tokens.shape[0], -1)
        index = torch.div(flat.min(dim=1).values, TOKEN_STRIDE, rounding_mode="floor")
        pattern = flat - index.unsqueeze(1) * TOKEN_STRIDE
        match = (pattern.unsqueeze(1) == self.patterns.to(flat.device).unsqueeze(0)).all(-1)  # [n, M]
        if not bool(match.any(1).all()):
            raise RuntimeError("the objective transformed cached-evaluation tokens in an unexpected way")
        copy = match.float().argmax(1)
        slots = self.slot[index.long()]
        out = None
        for j in torch.unique(copy).tolist():
            picked = copy == j
            features = self._table(j)[slots[picked]]
            if out is None:
                out = features.new_empty(tokens.shape[0], features.shape[1])
            out[picked] = features
        assert out is not None
        return out


class CachedLearner(EmbeddingLearner):
    """A stand-in for an EmbeddingLearner whose backbone is a FeatureTable; ``head`` is the real learner's."""

    def __init__(self, learner: EmbeddingLearner, table: FeatureTable) -> None:
        super().__init__(table)
        self.real = [learner]
        self.train(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, R, 3, 2, 2]`` -> cached embeddings ``[B, R, D]``."""
        b, r = images.shape[:2]
        return self.backbone(images.reshape(b * r, *images.shape[2:])).reshape(b, r, -1)

    def head(self, support_features: torch.Tensor, support_labels: torch.Tensor, query_features: torch.Tensor,
             ways: int) -> torch.Tensor:
        """The real learner's head."""
        return self.real[0].head(support_features, support_labels, query_features, ways)
