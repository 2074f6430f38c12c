"""Nearest centroid on L2-normalised embeddings (SimpleShot, Wang et al. 2019: its "L2N" head).

Per episode, the support and query embeddings are L2-normalised, each class's centroid is the mean of its
normalised support embeddings (not normalised again), and a query's logits are ``-scale * |q - c|^2``, its negative
squared Euclidean distances to the centroids. SimpleShot's "CL2N" variant also subtracts the mean embedding of the
base (training) classes first, which an episode does not have; it is not offered. Meta-Baseline's (Chen et al.
2021) test-time head compares by cosine similarity with the centroids of the unnormalised embeddings, which can
rank classes differently from this head when the centroids' norms differ.

No parameters of its own, differentiable: meta-trained, it is a ProtoNet on normalised embeddings (whose logits lie
in [-4 * scale, 0], so ``scale`` acts as a fixed softmax temperature; the arg-max does not depend on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.learners.protonet import class_means, squared_distances
from fewshot_sla.registry import LEARNERS


@LEARNERS.register("nearest-centroid")
class NearestCentroid(EmbeddingLearner):
    """SimpleShot's nearest-centroid head: logits ``-scale * |q - c|^2`` between the L2-normalised query and the
    class means of the L2-normalised support embeddings.

    Options: ``normalize`` (True; false gives ProtoNet's head), ``scale`` (1.0, a fixed logit scale > 0).
    """

    def __init__(self, backbone: nn.Module, normalize: bool = True, scale: float = 1.0) -> None:
        super().__init__(backbone)
        if not isinstance(normalize, bool):
            raise UserError(f"nearest-centroid needs normalize to be true or false, got {normalize!r}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise UserError(f"nearest-centroid needs scale > 0 (a fixed logit scale, 1 by default), got {scale!r}")
        self.normalize = normalize
        self.scale = float(scale)

    def settings(self) -> dict[str, object]:
        """What the head computes (recorded in results.json)."""
        return {"normalize": self.normalize, "scale": self.scale}

    @full_precision
    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways]."""
        if self.normalize:
            support_features = F.normalize(support_features, dim=-1)
            query_features = F.normalize(query_features, dim=-1)
        centroids = class_means(support_features, support_labels, ways)
        return -self.scale * squared_distances(query_features, centroids)
