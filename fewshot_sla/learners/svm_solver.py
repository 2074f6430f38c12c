"""Exact, batched, differentiable solver of the Crammer-Singer multi-class SVM dual (MetaOptNet's SVM head).

Per episode, with kernel K = X X^T of the S support points [S, S], one-hot labels Y [S, c], cost C and
ridge rho, the dual is (MetaOptNet's ``MetaOptNetHead_SVM_CS``, whose released code adds rho = 1 to the
diagonal of the dual Hessian to keep the QP strictly convex)::

    min_A  1/2 tr(A^T (K + rho I) A) - tr(Y^T A)   s.t.   A <= C Y  (entrywise),   A 1_c = 0.

The Hessian is (K + rho I) kron I_c and the constraints separate per support point, so for a fixed *face*
(which entries sit at their bound C Y_ik) the optimality system splits into c small systems, one per class
column k, on the free rows R_k of that column, coupled only through one multiplier per support point:

    (H_{R_k R_k}) x_k + beta_{R_k} = rhs_k,      sum_k x_ik = r_i.

Eliminating x_k leaves the S x S Schur system  (sum_k E_k H_{R_k R_k}^-1 E_k^T) beta = ...;  a face solve thus
costs c Cholesky factorisations of |R_k| x |R_k| blocks and one of S x S, batched over episodes (no
(S c) x (S c) matrix is ever formed). The feature size only enters through K.

Solver (chosen by measurement against FISTA with an exact per-row projection, which needed ~120 gradient
steps for 1e-4 relative accuracy on SLA-sized episodes where the methods below need 5-10 face solves):

1. warm start: project the equality-only solution  A0 = H^-1 (Y - 1/c)  (one S x S Cholesky) onto the
   feasible set and take ``warm_steps`` (10) FISTA steps with the exact per-row projection; their face
   seeds step 2 (this halves the face solves and shrinks the first, largest, blocks);
2. primal-dual active-set (PDAS) iterations: solve on the current face, then free every bounded entry whose
   multiplier is negative and bound every free entry above its bound; stop when the face repeats, which is
   an exact KKT point (up to ``tol``). PDAS usually converges in a handful of face solves but can cycle on
   degenerate problems (duplicated support points, tiny rho), so after ``pdas_steps`` solves it hands over to
3. a monotone primal active-set method from the projection of the PDAS iterate: step towards the face
   minimiser until a bound blocks (the bound joins the face); at a face minimiser release the entries with
   negative multipliers. Every step decreases the objective, so it terminates (finitely, in exact
   arithmetic).

"Iterations" (``max_iter``) count face solves. The returned solution is exact to the tolerance when
``converged``; otherwise it is the last (and best) feasible iterate of the primal phase, or the projection
of the last PDAS iterate.

Gradient: implicit differentiation of the KKT system on the final face (the active entries are held at
their bounds, as under strict complementarity), reusing the face factorisation: one more face solve, no
unrolling. All solver arithmetic is float64 (the systems are S x S; the cost is independent of the feature
size); the solution is returned in the kernel's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def project_rows(values: torch.Tensor, bound: torch.Tensor, cost: float) -> torch.Tensor:
    """Euclidean projection of each row of ``values`` [..., c] onto {z <= bound, sum(z) = 0}.

    ``bound`` is C times a one-hot row, so z = bound - d with d the projection of ``bound - values`` onto
    the simplex {d >= 0, sum(d) = C} (exact, by sorting).
    """
    x = bound - values
    xs = torch.sort(x, dim=-1, descending=True).values
    csum = xs.cumsum(-1) - cost
    ranks = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    support = (xs - csum / ranks > 0).sum(-1, keepdim=True)  # >= 1 always: the first term is C > 0
    theta = torch.gather(csum, -1, support - 1) / support.to(x.dtype)
    return bound - (x - theta).clamp_min(0)


def dual_objective(alpha: torch.Tensor, kernel: torch.Tensor, labels: torch.Tensor, ridge: float) -> torch.Tensor:
    """The dual objective 1/2 tr(A^T (K + rho I) A) - tr(Y^T A) of each episode: [B,S,c], [B,S,S], [B,S] -> [B]."""
    onehot = F.one_hot(labels, alpha.shape[-1]).to(alpha.dtype)
    quad = (alpha * (kernel @ alpha)).sum((1, 2)) + ridge * alpha.pow(2).sum((1, 2))
    return 0.5 * quad - (onehot * alpha).sum((1, 2))


@dataclass
class _Face:
    """The factorised optimality system of a face (free-entry pattern), for B episodes.

    ``free`` [B,S,c] marks the entries below their bound. Rows with one free entry have no degree of freedom
    (the row sum fixes it); the free entries of the other rows (``multi``) are the variables. ``order``
    [B,c,m] lists each column's variable rows first (``valid`` marks them), ``inv`` [B,c,m,m] holds the
    inverses of the column blocks of H (zero padded) and ``schur`` the Cholesky factor of the S x S Schur
    system (identity on rows without freedom).
    """

    free: torch.Tensor
    multi: torch.Tensor
    order: torch.Tensor
    valid: torch.Tensor
    inv: torch.Tensor
    schur: torch.Tensor

    @classmethod
    def factorise(cls, hessian: torch.Tensor, free: torch.Tensor) -> _Face:
        """Factorise the face system of ``free`` [B,S,c] (at least one free entry per row) for H [B,S,S]."""
        b, s, c = free.shape
        multi = free.sum(-1) >= 2
        columns = (free & multi.unsqueeze(-1)).transpose(1, 2)  # [B,c,S]
        m = int(columns.sum(-1).max())
        order = torch.argsort((~columns).to(torch.int8), dim=-1, stable=True)[..., :m]
        valid = torch.gather(columns, 2, order)
        flat = (order.unsqueeze(-1) * s + order.unsqueeze(-2)).reshape(b, -1)
        blocks = torch.gather(hessian.reshape(b, s * s), 1, flat).reshape(b, c, m, m)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        eye = torch.eye(m, dtype=hessian.dtype, device=hessian.device)
        inv = torch.cholesky_inverse(torch.linalg.cholesky(torch.where(pair, blocks, eye))) * pair
        schur = torch.zeros(b, s * s, dtype=hessian.dtype, device=hessian.device)
        schur = schur.scatter_add_(1, flat, inv.reshape(b, -1)).reshape(b, s, s)
        schur = schur + torch.diag_embed((~multi).to(hessian.dtype))
        return cls(free, multi, order, valid, inv, torch.linalg.cholesky(schur))

    def solve(self, rhs: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
        """The variable entries x [B,S,c] with (H x)_ik + beta_i = rhs_ik on them and sum_k x_ik = row_sums_i.

        Entries that are not variable are zero in x (and in the product H x, which only sees x).
        """
        b, s, c = rhs.shape
        picked = torch.gather(rhs.transpose(1, 2), 2, self.order) * self.valid  # [B,c,m]
        u = (self.inv * picked.unsqueeze(-2)).sum(-1)
        totals = torch.zeros(b, s, dtype=rhs.dtype, device=rhs.device)
        totals = totals.scatter_add_(1, self.order.reshape(b, -1), u.reshape(b, -1))
        beta = torch.cholesky_solve(torch.where(self.multi, totals - row_sums, 0.0).unsqueeze(-1), self.schur)
        beta_rows = torch.gather(beta.squeeze(-1).unsqueeze(1).expand(b, c, s), 2, self.order)
        x = u - (self.inv * beta_rows.unsqueeze(-2)).sum(-1)
        return torch.zeros(b, c, s, dtype=rhs.dtype, device=rhs.device).scatter_(2, self.order, x).transpose(1, 2)

    def minimiser(self, hessian: torch.Tensor, targets: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """The minimiser of the dual objective on this face (bounded entries at their bound, rows summing to 0)."""
        fixed = torch.where(self.free, 0.0, bound)
        fixed_sum = fixed.sum(-1, keepdim=True)
        single = self.free & ~self.multi.unsqueeze(-1)
        fixed = fixed - torch.where(single, fixed_sum, 0.0)  # a row's only free entry balances its bounds
        return fixed + self.solve(targets - hessian @ fixed, -fixed_sum.squeeze(-1))


@dataclass
class DualSolution:
    """Solver output: ``alpha`` [B,S,c] (float64), the final face, iterations (face solves) and convergence."""

    alpha: torch.Tensor
    face: _Face
    iterations: int
    converged: torch.Tensor


def _multipliers(gradient: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Bound multipliers mu_ik = v_i - G_ik (v_i: the common gradient of row i's free entries); 0 where free."""
    common = (gradient * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True)
    return torch.where(free, 0.0, common - gradient)


def _accelerated_projected_gradient(
    hessian: torch.Tensor, targets: torch.Tensor, bound: torch.Tensor, cost: float, alpha: torch.Tensor, steps: int
) -> torch.Tensor:
    """``steps`` FISTA steps on the dual from the feasible ``alpha``, with step 1/L for an upper bound L of
    the largest eigenvalue of H (the smaller of its Frobenius norm and its largest absolute row sum)."""
    if steps == 0:
        return alpha
    lipschitz = torch.minimum(hessian.norm(dim=(1, 2)), hessian.abs().sum(-1).amax(-1)).view(-1, 1, 1)
    previous, point, momentum = alpha, alpha, 1.0
    for _ in range(steps):
        alpha = project_rows(point - (hessian @ point - targets) / lipschitz, bound, cost)
        following = 0.5 * (1.0 + (1.0 + 4.0 * momentum * momentum) ** 0.5)
        point = alpha + ((momentum - 1.0) / following) * (alpha - previous)
        previous, momentum = alpha, following
    return alpha


def solve_dual(
    kernel: torch.Tensor,
    labels: torch.Tensor,
    ways: int,
    cost: float = 0.1,
    ridge: float = 1.0,
    max_iter: int = 50,
    pdas_steps: int = 10,
    tol: float = 1e-9,
    warm_steps: int = 10,
) -> DualSolution:
    """Solve the Crammer-Singer dual of B episodes: kernel [B,S,S], labels [B,S] in 0..ways-1 (no autograd).

    ``max_iter`` caps the face solves, the first ``pdas_steps`` of which are primal-dual active-set steps;
    ``tol`` is the relative KKT tolerance (on the bounds, scaled by C, and on the multipliers, scaled by
    1 + C max_i H_ii).
    """
    with torch.no_grad():
        hessian = kernel.detach().to(torch.float64)
        hessian = hessian + ridge * torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
        targets = F.one_hot(labels, ways).to(torch.float64)
        bound = cost * targets
        tol_alpha = tol * cost
        tol_mu = tol * (1.0 + cost * hessian.diagonal(dim1=1, dim2=2).amax(-1)).view(-1, 1, 1)
        # Warm start: a few accelerated projected-gradient steps from the projection of the
        # equality-constrained minimiser H^-1 (Y - 1/c); the face of the result seeds the active-set phase.
        alpha = torch.cholesky_solve(targets - 1.0 / ways, torch.linalg.cholesky(hessian))
        alpha = project_rows(alpha, bound, cost)
        alpha = _accelerated_projected_gradient(hessian, targets, bound, cost, alpha, warm_steps)
        free = alpha < bound
        converged = torch.zeros(hessian.shape[0], dtype=torch.bool, device=hessian.device)
        iterations = 0
        face = None
        while iterations < min(pdas_steps, max_iter):
            face = _Face.factorise(hessian, free)
            alpha = face.minimiser(hessian, targets, bound)
            iterations += 1
            mu = _multipliers(hessian @ alpha - targets, free)
            new_free = torch.where(free, alpha <= bound + tol_alpha, mu < -tol_mu)
            stuck = ~new_free.any(-1)  # a row needs a free entry: free its most violated one
            if stuck.any():
                crit = torch.where(free, alpha - bound, mu)
                new_free = new_free | (stuck.unsqueeze(-1) & F.one_hot(crit.argmin(-1), ways).bool())
            converged = (new_free == free).all(-1).all(-1)
            if converged.all():
                return DualSolution(alpha, face, iterations, converged)
            free = torch.where(converged.view(-1, 1, 1), free, new_free)
        # Monotone primal active-set phase from a feasible point (projections are exact on bounded entries).
        alpha = torch.where(converged.view(-1, 1, 1), alpha, project_rows(alpha, bound, cost))
        free = torch.where(converged.view(-1, 1, 1), free, alpha < bound)
        face_is_current = False
        while iterations < max_iter:
            face = _Face.factorise(hessian, free)
            face_is_current = True
            target = face.minimiser(hessian, targets, bound)
            iterations += 1
            step = torch.where(free & ~converged.view(-1, 1, 1), target - alpha, 0.0)
            ratio = torch.where(step > 0, (bound - alpha).clamp_min(0) / step, torch.inf)
            t = ratio.amin((1, 2)).clamp(max=1.0).view(-1, 1, 1)
            alpha = alpha + t * step
            blocked = free & (ratio <= t) & (t < 1)
            alpha = torch.where(blocked, bound, alpha)
            mu = _multipliers(hessian @ alpha - targets, free)
            release = ~free & (mu < -tol_mu) & (t >= 1)
            converged = converged | ((t.view(-1) >= 1) & ~release.any(-1).any(-1))
            if converged.all():
                break
            new_free = (free & ~blocked) | release
            face_is_current = bool((new_free == free).all())
            free = new_free
        if face is None or not face_is_current:
            face = _Face.factorise(hessian, free)
        return DualSolution(alpha, face, iterations, converged)


class _CrammerSingerDual(torch.autograd.Function):
    """alpha(K): the dual solution, differentiated implicitly through the KKT system of its final face."""

    @staticmethod
    def forward(
        ctx: Any, kernel: torch.Tensor, labels: torch.Tensor, ways: int, report: list[torch.Tensor], *options: Any
    ) -> torch.Tensor:
        solution = solve_dual(kernel, labels, ways, *options)
        report.append(solution.converged)
        face = solution.face
        ctx.save_for_backward(solution.alpha, face.free, face.multi, face.order, face.valid, face.inv, face.schur)
        return solution.alpha.to(kernel.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_alpha: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        alpha, *face = ctx.saved_tensors
        grad = grad_alpha.to(torch.float64)
        adjoint = _Face(*face).solve(grad, torch.zeros(grad.shape[:2], dtype=grad.dtype, device=grad.device))
        grad_kernel = -(adjoint @ alpha.transpose(1, 2))
        return grad_kernel.to(grad_alpha.dtype), *([None] * 9)


def crammer_singer_dual(
    kernel: torch.Tensor,
    labels: torch.Tensor,
    ways: int,
    cost: float = 0.1,
    ridge: float = 1.0,
    max_iter: int = 50,
    pdas_steps: int = 10,
    tol: float = 1e-9,
    warm_steps: int = 10,
    report: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Differentiable dual solution alpha [B,S,ways] of B episodes from kernel [B,S,S] and labels [B,S].

    Gradients flow to ``kernel`` by implicit differentiation (see the module docstring); options as in
    :func:`solve_dual`; each call appends its episodes' convergence flags [B] to ``report`` when given.
    """
    options = (cost, ridge, max_iter, pdas_steps, tol, warm_steps)
    alpha: torch.Tensor = _CrammerSingerDual.apply(kernel, labels, ways, report if report is not None else [], *options)
    return alpha
