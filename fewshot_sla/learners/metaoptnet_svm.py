"""MetaOptNet's SVM head (Lee et al. 2019): a Crammer-Singer multi-class linear SVM fitted per episode.

Per episode the dual of the SVM on the support embeddings is solved exactly (C = 0.1, and MetaOptNet's
ridge of 1 on the dual Hessian) by the batched active-set solver of :mod:`fewshot_sla.learners.svm_solver`;
query logits are the SVM scores ``scale * sum_i alpha_ik <x_i, q>`` with a learnable scale (initialised to
1). Gradients reach the embeddings and the scale by implicit differentiation of the dual's KKT system.

Deviation from MetaOptNet: it runs qpth's interior-point method for a fixed 15 iterations in training and
3 at test, which stops short of the optimum; here both modes solve to the KKT tolerance, and
``train_max_iter`` / ``eval_max_iter`` only cap the number of active-set face solves (typically 2-8).
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, full_precision
from fewshot_sla.learners.svm_solver import crammer_singer_dual
from fewshot_sla.registry import LEARNERS


def svm_logits(
    support: torch.Tensor,
    labels: torch.Tensor,
    query: torch.Tensor,
    ways: int,
    cost: float = 0.1,
    ridge: float = 1.0,
    max_iter: int = 50,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Unscaled SVM scores [B,Q,ways] of the queries [B,Q,D] under the dual solution fitted to [B,S,D], [B,S]."""
    kernel = support @ support.transpose(1, 2)
    alpha = crammer_singer_dual(kernel, labels, ways, cost=cost, ridge=ridge, max_iter=max_iter, tol=tol)
    return query @ (support.transpose(1, 2) @ alpha)  # = (Q X^T) alpha, without the [B,Q,S] kernel


@LEARNERS.register("metaoptnet-svm")
class MetaOptNetSVM(EmbeddingLearner):
    """Crammer-Singer SVM head (C = 0.1, dual ridge 1), exact and differentiable, learnable logit scale.

    ``train_max_iter`` / ``eval_max_iter`` cap the solver's face solves in training / evaluation mode
    (the solver stops earlier, at the KKT tolerance ``tol``; the caps only bind on degenerate episodes,
    where evaluation affords more solves than a training step); ``tol`` is the relative KKT tolerance.
    """

    def __init__(
        self,
        backbone: nn.Module,
        C: float = 0.1,
        ridge: float = 1.0,
        scale: float = 1.0,
        train_max_iter: int = 30,
        eval_max_iter: int = 100,
        tol: float = 1e-9,
    ) -> None:
        super().__init__(backbone)
        if not C > 0:
            raise UserError(f"metaoptnet-svm needs C > 0 (the SVM cost; MetaOptNet uses 0.1), got {C}")
        if not ridge > 0:
            raise UserError(f"metaoptnet-svm needs ridge > 0 (MetaOptNet adds 1 to the dual Hessian), got {ridge}")
        for name, value in (("train_max_iter", train_max_iter), ("eval_max_iter", eval_max_iter)):
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"metaoptnet-svm needs {name} to be an integer >= 1, got {value!r}")
        if not 0 < tol < 1:
            raise UserError(f"metaoptnet-svm needs 0 < tol < 1 (a relative KKT tolerance, e.g. 1e-9), got {tol}")
        self.C = float(C)
        self.ridge = float(ridge)
        self.train_max_iter = train_max_iter
        self.eval_max_iter = eval_max_iter
        self.tol = float(tol)
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
        max_iter = self.train_max_iter if self.training else self.eval_max_iter
        scores = svm_logits(
            support_features, support_labels, query_features, ways, self.C, self.ridge, max_iter, self.tol
        )
        return self.scale * scores
