"""Meta-Baseline's meta stage (Chen et al., ICCV 2021, "Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot
Learning"): logits ``tau * cos(q, c_k)``, the cosine similarity of each query embedding to each class centroid (the
mean of the class's support embeddings, not normalised first), times a learnable temperature ``tau`` (10 at start,
as the paper's code). Meta-trained from a pretrained backbone (``--init-from`` a ``pretrain`` run), it is the
second stage of Meta-Baseline; its recipe is the paper's meta stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.learners.protonet import class_means
from fewshot_sla.registry import LEARNERS


@LEARNERS.register("meta-baseline")
class MetaBaseline(EmbeddingLearner):
    """Cosine similarity to the class centroids times a learnable temperature. Option: ``temperature`` (its start)."""

    def __init__(self, backbone: nn.Module, temperature: float = 10.0) -> None:
        super().__init__(backbone)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise UserError(f"meta-baseline needs temperature > 0 (its start, 10 by default), got {temperature!r}")
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    @full_precision
    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways]."""
        centroids = class_means(support_features, support_labels, ways)
        cosine = F.normalize(query_features, dim=-1) @ F.normalize(centroids, dim=-1).transpose(1, 2)
        return self.temperature * cosine
