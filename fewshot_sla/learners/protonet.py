"""Prototypical networks (Snell et al. 2017): classify queries by distance to class-mean embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.registry import LEARNERS


def class_means(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """[B,S,D] features, [B,S] labels -> [B,ways,D] per-class means (every class must occur in the support)."""
    onehot = F.one_hot(labels, ways).to(features.dtype)  # [B,S,ways]
    return onehot.transpose(1, 2) @ features / onehot.sum(dim=1).unsqueeze(-1)


def squared_distances(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """[B,Q,D], [B,W,D] -> [B,Q,W] squared Euclidean distances, via |q|^2 - 2 q.p + |p|^2 (no [B,Q,W,D])."""
    cross = query @ prototypes.transpose(1, 2)
    return query.pow(2).sum(-1, keepdim=True) - 2 * cross + prototypes.pow(2).sum(-1).unsqueeze(1)


@LEARNERS.register("protonet")
class ProtoNet(EmbeddingLearner):
    """ProtoNet: logits are negative squared Euclidean distances from each query to each class prototype.

    ``scaled=True`` is MetaOptNet's variant: distances divided by the feature size and multiplied by a
    learnable scale (initialised to 1).
    """

    def __init__(self, backbone: nn.Module, scaled: bool = False) -> None:
        super().__init__(backbone)
        self.scaled = scaled
        self.scale = nn.Parameter(torch.ones(())) if scaled else None

    @full_precision
    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways]."""
        prototypes = class_means(support_features, support_labels, ways)
        logits = -squared_distances(query_features, prototypes)
        if self.scale is not None:
            logits = logits * (self.scale / query_features.shape[-1])
        return logits
