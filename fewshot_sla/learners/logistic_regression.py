"""Logistic regression on each episode's support embeddings (RFS, Tian et al. ECCV 2020), fitted on the device.

RFS evaluates a pretrained embedding by fitting scikit-learn's ``LogisticRegression`` (L2 penalty, C = 1, lbfgs,
multinomial) on each episode's L2-normalised support embeddings. This head fits the same model, for the B episodes
of a pass at once, in torch: per episode, with support features ``x_i`` (L2-normalised when ``normalize``), labels
``y_i`` and ``K`` = ways classes,

    minimise over W [K, D], b [K]:   C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2

(the intercept is not penalised), scikit-learn's objective (which it scales by 1 / (C * S), S support images, and
stops when its gradient is small). The query logits are ``W q + b``. The intercept is fixed to sum to zero over the
classes (the objective does not depend on a shift of all of them; scikit-learn's lbfgs, started at zero, keeps the
sum at zero too), so the coefficients are scikit-learn's ``coef_`` / ``intercept_``.

Solver: Newton's method, batched over the episodes, with each Newton system ``H d = -g`` solved by conjugate
gradients on Hessian-vector products (truncated Newton: the CG residual is cut to ``min(0.5, sqrt(|g|)) * |g|``,
superlinear convergence) and a backtracking (Armijo) line search. An episode stops, on its own, when the gradient
of the scaled objective has Euclidean norm ``<= tol``; episodes still above it after ``max_iter`` Newton steps (or
whose line search finds no decrease) are counted: ``pop_diagnostics`` gives their fraction
(``logistic_regression_unconverged``), which training logs and evaluation records with a warning when above 0.
The optimal W lies in the span of the support features, so when D > S the problem is solved exactly in an
orthonormal basis of that span (a QR factorisation of the support): each product costs O(S^2 K), not O(S D K).

Differentiable: in training (when the support embeddings carry a gradient) the logits reach the embeddings by
implicit differentiation of the optimality condition ``g(theta*, X) = 0``: the solution is passed through one
Newton step ``theta* - H^-1 g(theta*, X)`` whose value is theta* (g = 0 there) and whose derivative is the implicit
function theorem's ``-H^-1 dg/dX``; the solve with H (fixed at theta*) runs by conjugate gradients in the forward
and again in the backward pass. So the head can also be meta-trained (like MetaOptNet's convex heads), although the
literature uses it only to evaluate a pretrained embedding. It has no parameters of its own.

With 2 ways this is the 2-class multinomial model (RFS's ``multi_class='multinomial'``); scikit-learn 1.8 and later
fit the binomial model for two classes (one weight vector with penalty 0.5 * ||w||^2), a different optimum.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import UNCONVERGED, EmbeddingLearner, full_precision
from fewshot_sla.registry import LEARNERS

ARMIJO = 1e-4  # sufficient decrease of the line search, a fraction of the directional derivative
HALVINGS = 40  # line-search steps halved at most this often before the episode stops
CG_SAFETY = 4  # conjugate-gradient iterations per Newton step at most: this many times the system's size, or 500


def _scores(features: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[B,R,D], [B,K,D], [B,K] -> [B,R,K] logits ``W x + b``."""
    return features @ weights.transpose(1, 2) + bias.unsqueeze(1)


def _objective(
    features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor, C: float
) -> torch.Tensor:
    """[B] ``C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2`` (targets one-hot [B,S,K])."""
    scores = _scores(features, weights, bias)
    cross_entropy = torch.logsumexp(scores, dim=-1) - (scores * targets).sum(-1)
    return C * cross_entropy.sum(1) + 0.5 * weights.pow(2).sum((1, 2))


def _gradient(
    features: torch.Tensor, targets: torch.Tensor, probabilities: torch.Tensor, weights: torch.Tensor, C: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's gradient in W [B,K,D] and b [B,K] at the softmax probabilities [B,S,K]."""
    residual = probabilities - targets
    return C * residual.transpose(1, 2) @ features + weights, C * residual.sum(1)


def _curvature(
    features: torch.Tensor, probabilities: torch.Tensor, C: float, v_weights: torch.Tensor, v_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian-vector product H v for v = (V [B,K,D], v_b [B,K]); the intercept part has zero mean over K.

    H = C * sum_i (diag(p_i) - p_i p_i^T) (x) [x_i; 1][x_i; 1]^T + (identity on W, zero on b).
    """
    change = _scores(features, v_weights, v_bias)  # the scores' change [B,S,K]
    weighted = probabilities * change
    moved = weighted - probabilities * weighted.sum(-1, keepdim=True)  # (diag(p) - p p^T) dz, per support row
    h_bias = C * moved.sum(1)
    return C * moved.transpose(1, 2) @ features + v_weights, h_bias - h_bias.mean(-1, keepdim=True)


def _dot(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[B] inner products of (W, b) pairs."""
    return (a[0] * b[0]).sum((1, 2)) + (a[1] * b[1]).sum(1)


def _conjugate_gradients(
    features: torch.Tensor,
    probabilities: torch.Tensor,
    C: float,
    rhs: tuple[torch.Tensor, torch.Tensor],
    threshold: torch.Tensor,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve H x = rhs per episode until ``|residual| <= threshold`` [B] (``inf``: leave the episode at 0).

    Each episode's iterates depend on that episode alone (a finished one takes zero steps), so the batch gives
    the same result as one episode at a time.
    """
    x = (torch.zeros_like(rhs[0]), torch.zeros_like(rhs[1]))
    residual = rhs
    direction = rhs
    squared = _dot(residual, residual)
    for _ in range(max_iter):
        running = squared.sqrt() > threshold
        if not bool(running.any()):
            break
        product = _curvature(features, probabilities, C, *direction)
        curvature = _dot(direction, product)
        running = running & (curvature > 0)  # none left in that direction (probabilities at 0 or 1): stop there
        step = torch.where(running, squared / torch.where(running, curvature, 1.0), 0.0)
        x = (x[0] + step[:, None, None] * direction[0], x[1] + step[:, None] * direction[1])
        residual = (residual[0] - step[:, None, None] * product[0], residual[1] - step[:, None] * product[1])
        new_squared = _dot(residual, residual)
        beta = torch.where(running, new_squared / torch.where(running, squared, 1.0), 0.0)
        direction = (residual[0] + beta[:, None, None] * direction[0], residual[1] + beta[:, None] * direction[1])
        squared = torch.where(running, new_squared, squared)
    return x


def _solve_size(weights: torch.Tensor) -> int:
    """Conjugate-gradient iterations at most for a system the size of (W, b)."""
    k, d = weights.shape[-2:]
    return min(CG_SAFETY * k * (d + 1), 500)


def fit_logistic_regression(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    ways: int,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the multinomial L2-regularised logistic regression of each episode (no gradient; see the module).

    ``support`` [B,S,D] (used as given: normalise it first), labels [B,S] in 0..ways-1 -> weights W [B,ways,D],
    intercepts b [B,ways] (summing to zero) and ``converged`` [B] (the scaled gradient's norm at most ``tol``).
    """
    with torch.no_grad():
        b, s, d = support.shape
        targets = F.one_hot(support_labels, ways).to(support.dtype)
        basis = None
        features = support
        if d > s:  # the optimum lies in the span of the support rows: solve in an orthonormal basis of it
            basis, upper = torch.linalg.qr(support.transpose(1, 2))  # support^T = basis @ upper; [B,D,S], [B,S,S]
            features = upper.transpose(1, 2)  # the support rows in that basis, [B,S,S]
        weights = support.new_zeros(b, ways, features.shape[-1])
        bias = support.new_zeros(b, ways)
        scale = 1.0 / (C * s)  # scikit-learn's objective is ours divided by C * S
        active = torch.ones(b, dtype=torch.bool, device=support.device)
        eps = torch.finfo(support.dtype).eps
        for iteration in range(max_iter + 1):
            probabilities = torch.softmax(_scores(features, weights, bias), dim=-1)
            gradient = _gradient(features, targets, probabilities, weights, C)
            norm = _dot(gradient, gradient).sqrt()
            converged = norm * scale <= tol
            active = active & ~converged
            if iteration == max_iter or not bool(active.any()):
                break
            forcing = torch.clamp(torch.sqrt(norm * scale), max=0.5) * norm
            threshold = torch.where(active, forcing.clamp(min=0.5 * tol / scale), math.inf)
            rhs = (-gradient[0], -gradient[1] + gradient[1].mean(-1, keepdim=True))
            direction = _conjugate_gradients(features, probabilities, C, rhs, threshold, _solve_size(weights))
            value = _objective(features, targets, weights, bias, C)
            slope = _dot(gradient, direction)  # < 0 for a descent direction
            slack = 64 * eps * value.abs().clamp(min=1.0)  # rounding of the objective near the optimum
            step = torch.ones_like(value)
            searching = active.clone()
            new_weights, new_bias = weights, bias
            for _ in range(HALVINGS):
                trial_weights = weights + step[:, None, None] * direction[0]
                trial_bias = bias + step[:, None] * direction[1]
                trial = _objective(features, targets, trial_weights, trial_bias, C)
                accept = searching & (trial <= value + ARMIJO * step * slope + slack)
                new_weights = torch.where(accept[:, None, None], trial_weights, new_weights)
                new_bias = torch.where(accept[:, None], trial_bias, new_bias)
                searching = searching & ~accept
                if not bool(searching.any()):
                    break
                step = torch.where(searching, step / 2, step)
            active = active & ~searching  # no decrease found: the episode stops where it is
            weights, bias = new_weights, new_bias
        if basis is not None:
            weights = weights @ basis.transpose(1, 2)  # back to the feature space, [B,K,D]
        return weights, bias, converged


class _NewtonSolve(torch.autograd.Function):
    """``(g_W, g_b) -> H^-1 (g_W, g_b)`` with H the Hessian at the fitted solution, fixed; its backward solves with
    H again (H is symmetric). The intercept part is solved in the zero-sum subspace, where H is invertible."""

    @staticmethod
    def forward(
        ctx: Any,
        g_weights: torch.Tensor,
        g_bias: torch.Tensor,
        features: torch.Tensor,
        probabilities: torch.Tensor,
        C: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(features, probabilities)
        ctx.C = C
        return _solve_hessian(features, probabilities, C, g_weights, g_bias)

    @staticmethod
    def backward(
        ctx: Any, d_weights: torch.Tensor, d_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        features, probabilities = ctx.saved_tensors
        u_weights, u_bias = _solve_hessian(features, probabilities, ctx.C, d_weights, d_bias)
        return u_weights, u_bias, None, None, None


def _solve_hessian(
    features: torch.Tensor, probabilities: torch.Tensor, C: float, v_weights: torch.Tensor, v_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """H^-1 v by conjugate gradients to a relative residual at the precision's limit."""
    rhs = (v_weights, v_bias - v_bias.mean(-1, keepdim=True))
    norm = _dot(rhs, rhs).sqrt()
    relative = max(1e-10, 10 * torch.finfo(features.dtype).eps)
    threshold = torch.where(norm > 0, relative * norm, math.inf)
    return _conjugate_gradients(features, probabilities, C, rhs, threshold, _solve_size(v_weights))


def _implicit_step(
    support: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor,
    C: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step from the fitted (W*, b*), differentiable in the support: the value is the solution (its
    gradient is zero there), the derivative the implicit function theorem's ``-H^-1 dg/dX``."""
    probabilities = torch.softmax(_scores(support, weights, bias), dim=-1)
    gradient = _gradient(support, targets, probabilities, weights, C)
    correction = _NewtonSolve.apply(gradient[0], gradient[1], support.detach(), probabilities.detach(), C)
    return weights - correction[0], bias - correction[1]


@LEARNERS.register("logistic-regression")
class LogisticRegressionHead(EmbeddingLearner):
    """RFS's evaluation head: multinomial logistic regression (L2 penalty, ``C``) fitted per episode on the
    L2-normalised support embeddings, solved on the device; differentiable by implicit differentiation.

    Options: ``C`` (1.0, scikit-learn's inverse penalty), ``max_iter`` (Newton steps, 100), ``tol`` (1e-6: the
    norm of the gradient of scikit-learn's scaled objective at which an episode stops; float32 embeddings are solved
    in float32, whose rounding leaves about 5e-8 of it, float64 ones reach 1e-10), ``normalize`` (True:
    L2-normalise the embeddings first).
    """

    def __init__(
        self, backbone: nn.Module, C: float = 1.0, max_iter: int = 100, tol: float = 1e-6, normalize: bool = True
    ) -> None:
        super().__init__(backbone)
        if not (isinstance(C, (int, float)) and C > 0):
            raise UserError(f"logistic-regression needs C > 0 (the inverse L2 penalty; RFS uses 1.0), got {C!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise UserError(f"logistic-regression needs an integer max_iter >= 1 (Newton steps), got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise UserError(f"logistic-regression needs 0 < tol < 1 (a gradient norm, e.g. 1e-6), got {tol!r}")
        if not isinstance(normalize, bool):
            raise UserError(f"logistic-regression needs normalize to be true or false, got {normalize!r}")
        self.C = float(C)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.normalize = normalize
        self._episodes = 0  # fitted since the last pop_diagnostics
        self._unconverged = 0

    def settings(self) -> dict[str, object]:
        """The model and the solver's budget (recorded in results.json)."""
        return {
            "C": self.C,
            "normalize": self.normalize,
            "solver": "newton-cg",
            "max_iter": self.max_iter,
            "tol": self.tol,
        }

    def pop_diagnostics(self) -> dict[str, float]:
        """The fraction of episodes since the last call whose fit stopped short of its tolerance."""
        episodes, unconverged = self._episodes, self._unconverged
        self._episodes = self._unconverged = 0
        return {f"logistic_regression{UNCONVERGED}": unconverged / episodes} if episodes else {}

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
        weights, bias, converged = fit_logistic_regression(
            support_features, support_labels, ways, self.C, self.max_iter, self.tol
        )
        self._episodes += converged.numel()
        self._unconverged += int((~converged).sum())
        if torch.is_grad_enabled() and support_features.requires_grad:
            targets = F.one_hot(support_labels, ways).to(support_features.dtype)
            weights, bias = _implicit_step(support_features, targets, weights, bias, self.C)
        return _scores(query_features, weights, bias)
