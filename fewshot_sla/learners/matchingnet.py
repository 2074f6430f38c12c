"""Matching Networks (Vinyals et al. 2016) without full-context embeddings: attention over the support set.

For a query x, a(x, x_i) = softmax_i(scale * sim(f(x), f(x_i))) over the support items, and p(c | x) = sum of
a(x, x_i) over the items of class c. The logits are log p(c | x), computed in log space so that they stay finite
(log of the dtype's smallest normal number for a class absent from the support): the engine's cross-entropy is
then the paper's negative log-likelihood, and softmax(logits) = p.

Choices, stated:
- ``distance="cosine"`` (the paper's): sim = cosine similarity; ``"euclidean"``: sim = -squared distance.
- ``scale`` (1.0, the paper's formula: cosines in [-1, 1] enter the softmax as they are) multiplies sim. The
  recipe (``config/recipes.yaml``) sets 100, as Chen et al. 2019's code does ("to strengthen the highest
  probability"): with ReLU features the cosines lie in [0, 1], and unscaled they train slowly.
  ``learn_scale=True`` makes it a parameter initialised to ``scale``, as reimplementations with a temperature do
  (Gidaris & Komodakis 2018, "Dynamic Few-Shot Visual Learning without Forgetting": learnable, initialised to 10;
  torchmeta's and oscarknagg/few-shot's have none).
- No full-context embeddings (no LSTM over the support set or attention LSTM for queries).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.learners.protonet import squared_distances
from fewshot_sla.registry import LEARNERS

DISTANCES = ("cosine", "euclidean")


def similarities(query: torch.Tensor, support: torch.Tensor, distance: str) -> torch.Tensor:
    """[B,Q,D], [B,S,D] -> [B,Q,S]: cosine similarities, or negative squared Euclidean distances."""
    if distance == "cosine":
        return F.normalize(query, dim=-1, eps=1e-8) @ F.normalize(support, dim=-1, eps=1e-8).transpose(1, 2)
    return -squared_distances(query, support)


def class_log_probabilities(log_attention: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """[B,Q,S] log attention, [B,S] labels -> [B,Q,ways] log of the attention summed over each class's items.

    A log-sum-exp per class, shifted by the class's largest term (held constant for the gradient), so that no
    class underflows to log 0 however far apart the similarities are; memory [B,Q,S], not [B,Q,ways,S].
    Classes without support items get log of the dtype's smallest normal number.
    """
    b, q, s = log_attention.shape
    index = labels.unsqueeze(1).expand(b, q, s)
    floor = math.log(torch.finfo(log_attention.dtype).tiny)
    shift = log_attention.new_full((b, q, ways), floor)
    shift = shift.scatter_reduce(-1, index, log_attention.detach(), reduce="amax", include_self=False)
    terms = torch.exp(log_attention - shift.gather(-1, index))  # each class's largest term is exactly 1
    sums = torch.zeros_like(shift).scatter_add(-1, index, terms)  # >= 1 for a class present in the support
    present = sums > 0
    return torch.where(present, shift + torch.where(present, sums, torch.ones_like(sums)).log(), floor)


@LEARNERS.register("matchingnet")
class MatchingNet(EmbeddingLearner):
    """Matching Networks: log of the softmax attention over support items, summed per class.

    Options: ``distance`` ("cosine" | "euclidean"), ``scale`` (1.0), ``learn_scale`` (False).
    """

    def __init__(
        self, backbone: nn.Module, distance: str = "cosine", scale: float = 1.0, learn_scale: bool = False
    ) -> None:
        super().__init__(backbone)
        if distance not in DISTANCES:
            raise UserError(f"matchingnet: unknown distance '{distance}'; choose one of: {', '.join(DISTANCES)}")
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"matchingnet: scale must be a finite number > 0, got {scale}")
        self.distance = distance
        self.initial_scale = float(scale)
        self.learn_scale = learn_scale
        self.scale: nn.Parameter | None = nn.Parameter(torch.tensor(float(scale))) if learn_scale else None

    def settings(self) -> dict[str, object]:
        """The similarity, its scale (the initial one when learned) and that full-context embeddings are off."""
        return {
            "distance": self.distance,
            "scale": self.initial_scale,
            "learn_scale": self.learn_scale,
            "full_context_embeddings": False,
        }

    @full_precision
    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways] = log p(class | query)."""
        sims = similarities(query_features, support_features, self.distance)
        sims = sims * (self.scale if self.scale is not None else self.initial_scale)
        return class_log_probabilities(torch.log_softmax(sims, dim=-1), support_labels, ways)
