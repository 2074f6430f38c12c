"""MetaOptNet's ridge-regression head (R2-D2, Bertinetto et al. 2019): a closed-form linear classifier.

Per episode, with support features X [S, D], one-hot targets Y [S, W] and lambda = 50:
``W* = argmin |X W - Y|^2 + lambda |W|^2 = (X^T X + lambda I_D)^-1 X^T Y = X^T (X X^T + lambda I_S)^-1 Y``
(the second form by the Woodbury identity). Query logits are ``scale * Q W*`` with a learnable scale, no bias.
The scale starts at 2: MetaOptNet's ridge head solves ``1/2 z^T (K + lambda I) z - 2 y^T z``, whose logits are
twice the ridge-regression logits, and multiplies them by its own learnable scale initialised to 1, so MetaOptNet
starts from twice the ridge logits; starting ours at 2 gives the same logits at every step of training.
Whichever of the S x S or D x D systems is smaller is solved, by Cholesky factorisation batched over the episodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.registry import LEARNERS

SOLVES = ("auto", "woodbury", "primal")


def ridge_logits(
    support: torch.Tensor, targets: torch.Tensor, query: torch.Tensor, lam: float, woodbury: bool
) -> torch.Tensor:
    """Query scores of the ridge solution: [B,S,D], [B,S,W], [B,Q,D] -> [B,Q,W].

    ``woodbury`` solves the S x S system (cheaper when D > S), otherwise the D x D one; both are exact.
    """
    if woodbury:
        gram = support @ support.transpose(1, 2)  # [B,S,S]
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        dual = torch.cholesky_solve(targets, torch.linalg.cholesky(gram + lam * eye))  # [B,S,W]
        return (query @ support.transpose(1, 2)) @ dual
    covariance = support.transpose(1, 2) @ support  # [B,D,D]
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    weights = torch.cholesky_solve(support.transpose(1, 2) @ targets, torch.linalg.cholesky(covariance + lam * eye))
    return query @ weights


@LEARNERS.register("metaoptnet-ridge")
class MetaOptNetRidge(EmbeddingLearner):
    """Ridge regression on one-hot support labels (lambda = 50), learnable logit scale; batched closed form.

    ``solve``: ``auto`` (Woodbury S x S system when the feature size exceeds the support size, else D x D),
    or force ``woodbury`` / ``primal``.
    """

    def __init__(self, backbone: nn.Module, lam: float = 50.0, solve: str = "auto", scale: float = 2.0) -> None:
        super().__init__(backbone)
        if not lam > 0:
            raise UserError(f"metaoptnet-ridge needs lam > 0 (the ridge penalty; MetaOptNet uses 50), got {lam}")
        if solve not in SOLVES:
            raise UserError(f"metaoptnet-ridge: unknown solve '{solve}'; choose one of: {', '.join(SOLVES)}")
        self.lam = float(lam)
        self.solve = solve
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    @full_precision
    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways]."""
        s, d = support_features.shape[-2:]
        woodbury = d > s if self.solve == "auto" else self.solve == "woodbury"
        targets = F.one_hot(support_labels, ways).to(support_features.dtype)
        return self.scale * ridge_logits(support_features, targets, query_features, self.lam, woodbury)
