"""MetaOptNet's SVM dual solved the way MetaOptNet solved it: a primal-dual interior-point method stopped after a
fixed number of iterations (15 in training, 3 at test in MetaOptNet's code), for reproduction studies.

The QP is MetaOptNet's (the same as :mod:`fewshot_sla.learners.svm_solver`): with H = K + rho I,

    min_A  1/2 sum_k a_k^T H a_k - sum_k y_k^T a_k   s.t.   A <= C Y,   A 1_c = 0,

solved by the method qpth (MetaOptNet's solver) runs, step for step: Mehrotra's predictor-corrector in the form of
Vandenberghe's CVXOPT notes (slacks s = C Y - A, multipliers z >= 0 for the bounds and nu for the row sums). The
start solves the KKT system with unit scaling and shifts s and z so that their smallest entry is 1 when it was
negative; each iteration takes an affine-scaling direction, the centring sigma = (mu_aff / mu)^3 and the combined
direction, with a step of 0.999 of the way to the boundary (at most 1). As in qpth, each episode returns its best
iterate by the residual ||r_bounds|| + ||r_rows|| + ||r_dual|| + n mu, measured before each step (so the point
after the last step is not a candidate), and the batch stops early when no episode improved for 3 iterations or
every residual is below 1e-12. Every Newton system is solved with the structure of the problem: for the scaling
W = z / s the Hessian of each class column is H + diag(w_k), so a solve costs c Cholesky factorisations of S x S
blocks and one S x S Schur system for the row sums, where qpth factorises the (S c + S c + S)-sized KKT matrix.

Gradients reach the kernel by implicit differentiation of the KKT conditions at the returned iterate, with its
scaling (multipliers and slacks clamped at 1e-8, as qpth does); at convergence this is the exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

STEP_FRACTION = 0.999  # of the way to the boundary of the positive orthant (qpth's; CVXOPT takes 0.99)
STOP = 1e-12  # qpth's eps: every episode's residual below it ends the iterations
NOT_IMPROVED = 3  # qpth's notImprovedLim: iterations without any episode improving end them too
TOLERANCE = 1e-9  # the residual at which an episode counts as converged (for the diagnostics)
CLAMP = 1e-8  # multipliers and slacks in the scaling of the backward pass


@dataclass
class _Newton:
    """The factorised Newton system of one scaling ``w = z / s`` [B,S,c] for B episodes."""

    chol: torch.Tensor  # [B,c,S,S] Cholesky factors of H + diag(w_k)
    schur: torch.Tensor  # [B,S,S] Cholesky factor of sum_k (H + diag(w_k))^-1

    @classmethod
    def factorise(cls, hessian: torch.Tensor, w: torch.Tensor) -> _Newton:
        blocks = hessian.unsqueeze(1) + torch.diag_embed(w.transpose(1, 2))
        chol = torch.linalg.cholesky(blocks)
        return cls(chol, torch.linalg.cholesky(torch.cholesky_inverse(chol).sum(1)))

    def solve(self, r: torch.Tensor, row_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx, dnu) with (H + diag(w_k)) dx_k + dnu = r_k for every column k and sum_k dx_k = row_sums."""
        u = torch.cholesky_solve(r.transpose(1, 2).unsqueeze(-1), self.chol).squeeze(-1)  # [B,c,S]
        dnu = torch.cholesky_solve((u.sum(1) - row_sums).unsqueeze(-1), self.schur).squeeze(-1)  # [B,S]
        v = torch.cholesky_solve(dnu.unsqueeze(1).expand_as(u).unsqueeze(-1), self.chol).squeeze(-1)
        return (u - v).transpose(1, 2), dnu


def _max_step(value: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The largest t with value + t direction >= 0 per episode [B,1,1]; an episode that nothing blocks gets the
    larger of 1 and the largest ratio in the batch (qpth's rule), which the callers cap at 1 anyway."""
    ratio = -value / direction
    blocking = direction < 0
    free = torch.maximum(torch.ones((), dtype=value.dtype, device=value.device), ratio.max())
    return torch.where(blocking, ratio, free).amin((1, 2), keepdim=True)


def _direction(
    newton: _Newton,
    r_dual: torch.Tensor,
    r_bound: torch.Tensor,
    r_rows: torch.Tensor,
    slack: torch.Tensor,
    mult: torch.Tensor,
    r_comp: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The Newton direction (dx, ds, dz, dnu) for the complementarity residual ``r_comp``:
    (H + W) dx + dnu = -r_dual - (W r_bound - r_comp / s) with sum_k dx = -r_rows; ds = -r_bound - dx;
    dz = -(r_comp + z ds) / s."""
    rhs = -r_dual - (mult * r_bound - r_comp) / slack
    dx, dnu = newton.solve(rhs, -r_rows)
    ds = -r_bound - dx
    dz = -(r_comp + mult * ds) / slack
    return dx, ds, dz, dnu


@dataclass
class InteriorPointSolution:
    """The returned iterates (float64): ``alpha`` [B,S,c], slacks, bound multipliers, the factorised system of their
    (clamped) scaling for the backward pass, and which episodes reached the tolerance."""

    alpha: torch.Tensor
    slack: torch.Tensor
    multipliers: torch.Tensor
    newton: _Newton
    converged: torch.Tensor


def solve_interior_point(
    kernel: torch.Tensor, labels: torch.Tensor, ways: int, cost: float = 0.1, ridge: float = 1.0, iterations: int = 15
) -> InteriorPointSolution:
    """At most ``iterations`` predictor-corrector steps on B episodes: kernel [B,S,S], labels [B,S] (no autograd)."""
    with torch.no_grad():
        hessian = kernel.detach().to(torch.float64)
        hessian = hessian + ridge * torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
        targets = F.one_hot(labels, ways).to(torch.float64)
        bound = cost * targets
        zeros = torch.zeros(hessian.shape[:2], dtype=hessian.dtype, device=hessian.device)
        # Start: the KKT system with unit scaling, (H + I) x + nu = y + C Y with rows summing to 0, then
        # s = C Y - x and z = x - C Y, each shifted to a smallest entry of 1 when it had a negative one.
        newton = _Newton.factorise(hessian, torch.ones_like(targets))
        alpha, nu = newton.solve(targets + bound, zeros)
        slack, mult = bound - alpha, alpha - bound
        for v in (slack, mult):
            low = v.amin((1, 2), keepdim=True)
            v.sub_(torch.where(low < 0, low - 1.0, 0.0))
        count = targets[0].numel()
        best: tuple[torch.Tensor, ...] | None = None
        not_improved = 0
        for _ in range(iterations):
            r_dual = torch.einsum("bij,bjk->bik", hessian, alpha) - targets + mult + nu.unsqueeze(-1)
            r_bound = alpha + slack - bound
            r_rows = alpha.sum(-1)
            mu = ((slack * mult).sum((1, 2)) / count).abs()
            residual = r_bound.flatten(1).norm(dim=1) + r_rows.norm(dim=1) + r_dual.flatten(1).norm(dim=1) + count * mu
            current = (residual, alpha, slack, mult)
            if best is None:
                best = tuple(t.clone() for t in current)
            else:
                better = residual < best[0]
                not_improved = 0 if bool(better.any()) else not_improved + 1
                best = tuple(
                    torch.where(better.view(-1, *[1] * (new.dim() - 1)), new, old) for new, old in zip(current, best)
                )
            if not_improved == NOT_IMPROVED or float(best[0].max()) < STOP or float(mu.min()) > 1e32:
                break
            newton = _Newton.factorise(hessian, mult / slack)
            residuals = (r_dual, r_bound, r_rows, slack, mult)
            dx, ds, dz, _ = _direction(newton, *residuals, slack * mult)
            step = torch.minimum(_max_step(mult, dz), _max_step(slack, ds)).clamp(max=1.0)
            sigma = (
                ((slack + step * ds) * (mult + step * dz)).sum((1, 2), keepdim=True)
                / (slack * mult).sum((1, 2), keepdim=True)
            ) ** 3
            mu_b = mu.view(-1, 1, 1)
            dx, ds, dz, dnu = _direction(newton, *residuals, slack * mult + ds * dz - sigma * mu_b)
            step = (STEP_FRACTION * torch.minimum(_max_step(mult, dz), _max_step(slack, ds))).clamp(max=1.0)
            alpha, slack, mult, nu = alpha + step * dx, slack + step * ds, mult + step * dz, nu + step.view(-1, 1) * dnu
        assert best is not None
        residual, alpha, slack, mult = best
        backward = _Newton.factorise(hessian, mult.clamp(min=CLAMP) / slack.clamp(min=CLAMP))
        return InteriorPointSolution(alpha, slack, mult, backward, residual <= TOLERANCE)


class _InteriorPointDual(torch.autograd.Function):
    """alpha(K) after a fixed number of interior-point iterations, differentiated implicitly at that iterate."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel: torch.Tensor,
        labels: torch.Tensor,
        ways: int,
        cost: float,
        ridge: float,
        iterations: int,
        report: list[torch.Tensor],
    ) -> torch.Tensor:
        solution = solve_interior_point(kernel, labels, ways, cost, ridge, iterations)
        report.append(solution.converged)
        ctx.save_for_backward(solution.alpha, solution.newton.chol, solution.newton.schur)
        return solution.alpha.to(kernel.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_alpha: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        alpha, chol, schur = ctx.saved_tensors
        grad = grad_alpha.to(torch.float64)
        rows = torch.zeros(grad.shape[:2], dtype=grad.dtype, device=grad.device)
        adjoint, _ = _Newton(chol, schur).solve(grad, rows)
        # d alpha = -(H + W)^-1 dH alpha on the row-sum constraint: dL/dK = -sym(adjoint alpha^T).
        grad_kernel = -(adjoint @ alpha.transpose(1, 2))
        return grad_kernel.to(grad_alpha.dtype), None, None, None, None, None, None


def interior_point_dual(
    kernel: torch.Tensor,
    labels: torch.Tensor,
    ways: int,
    cost: float = 0.1,
    ridge: float = 1.0,
    iterations: int = 15,
    report: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The dual solution ``alpha`` [B,S,c] after ``iterations`` interior-point steps, differentiable in ``kernel``;
    each call appends its episodes' convergence flags [B] to ``report`` when given."""
    result: torch.Tensor = _InteriorPointDual.apply(
        kernel, labels, ways, cost, ridge, iterations, report if report is not None else []
    )
    return result
