"""The MetaOptNet-SVM head: its Crammer-Singer dual solver against cvxpy, the KKT conditions, gradients against
finite differences, batching, precision and train/eval settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.metaoptnet_svm import MetaOptNetSVM, svm_logits
from fewshot_sla.learners.svm_solver import crammer_singer_dual, dual_objective, project_rows, solve_dual
from fewshot_sla.registry import LEARNERS

C = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def _sla_like(generator: torch.Generator, ways: int, rotations: int, shots: int, dim: int, scale: float):
    """Non-negative (post-ReLU-like) features of an SLA episode: class and transformation effects plus noise.

    Returns support [S, dim] and joint labels [S] (class-major, y * rotations + j).
    """
    cls = torch.randn(ways, 1, 1, dim, generator=generator, dtype=torch.float64)
    rot = 0.7 * torch.randn(1, 1, rotations, dim, generator=generator, dtype=torch.float64)
    inst = 0.8 * torch.randn(ways, shots, 1, dim, generator=generator, dtype=torch.float64)
    noise = 0.3 * torch.randn(ways, shots, rotations, dim, generator=generator, dtype=torch.float64)
    x = scale * torch.relu(cls + rot + inst + noise).reshape(-1, dim)
    labels = (torch.arange(ways).view(-1, 1, 1) * rotations + torch.arange(rotations).view(1, 1, -1)).expand(
        ways, shots, rotations
    )
    return x, labels.reshape(-1)


def _instance(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A small dual instance: features [S, D], labels [S], ways, ridge. ``kind`` picks a (degenerate) family."""
    g = torch.Generator().manual_seed(seed)
    if kind == "sla":
        x, y = _sla_like(g, ways=3, rotations=2, shots=3, dim=24, scale=[0.05, 0.5, 3.0][seed % 3])
        return x, y, 6, 1.0
    s, ways, dim = 14, 4, 6
    x = torch.randn(s, dim, generator=g, dtype=torch.float64) * [0.1, 1.0, 5.0][seed % 3]
    y = torch.randint(0, ways, (s,), generator=g)
    ridge = 1.0
    if kind == "duplicates":  # repeated support points, some with different labels
        x[3] = x[2]
        x[7] = x[2]
        x[9] = x[8]
        y[9] = (y[8] + 1) % ways
        ridge = 1e-2
    elif kind == "identical":  # every support point the same: all ties
        x[:] = x[0]
    elif kind == "zero":  # K = 0: the dual is a projection of Y / ridge
        x.zero_()
    elif kind == "missing-class":  # a class without support points
        y = torch.where(y == ways - 1, 0, y)
    elif kind == "tiny-ridge":
        ridge = 1e-3
    return x, y, ways, ridge


def _cvxpy_dual(kernel: np.ndarray, labels: np.ndarray, ways: int, ridge: float) -> tuple[np.ndarray, float]:
    """Reference: the same dual QP stated directly in cvxpy and solved by a generic conic solver."""
    cp = pytest.importorskip("cvxpy")
    s = kernel.shape[0]
    onehot = np.eye(ways)[labels]
    factor = np.linalg.cholesky(kernel + ridge * np.eye(s))
    alpha = cp.Variable((s, ways))
    objective = 0.5 * cp.sum_squares(factor.T @ alpha) - cp.sum(cp.multiply(onehot, alpha))
    problem = cp.Problem(cp.Minimize(objective), [alpha <= C * onehot, cp.sum(alpha, axis=1) == 0])
    if "CLARABEL" in cp.installed_solvers():
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    else:
        problem.solve()
    return alpha.value, float(problem.value)


KINDS = ["random", "sla", "duplicates", "identical", "zero", "missing-class", "tiny-ridge"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pdas_steps", [10, 0])
def test_solution_matches_cvxpy(kind: str, seed: int, pdas_steps: int) -> None:
    """Objective to 1e-4 relative and the (unique, since ridge > 0) solution, through both solver phases."""
    x, y, ways, ridge = _instance(kind, seed)
    kernel = x @ x.T
    ref_alpha, _ = _cvxpy_dual(kernel.numpy(), y.numpy(), ways, ridge)
    ref_alpha = torch.from_numpy(ref_alpha).unsqueeze(0)
    solution = solve_dual(kernel[None], y[None], ways, C, ridge, max_iter=500, pdas_steps=pdas_steps)
    assert bool(solution.converged.all())
    ours = dual_objective(solution.alpha, kernel[None], y[None], ridge).item()
    ref = dual_objective(ref_alpha, kernel[None], y[None], ridge).item()
    assert abs(ours - ref) <= 1e-4 * abs(ref)
    assert ours <= ref + 1e-7 * abs(ref)  # never worse than the reference (up to its own tolerance)
    assert torch.allclose(solution.alpha, ref_alpha, atol=1e-5)


def _kkt_residuals(alpha: torch.Tensor, kernel: torch.Tensor, labels: torch.Tensor, ridge: float) -> dict[str, float]:
    """KKT residuals of the dual, computed from the definitions (not from solver internals).

    With G = H alpha - Y, the free entries F (alpha < C Y) of row i give its equality multiplier
    beta_i = -mean_{k in F} G_ik and the bound multipliers are mu = -G - beta (stationarity G + beta + mu = 0).
    """
    onehot = F.one_hot(labels, alpha.shape[-1]).to(alpha.dtype)
    bound = C * onehot
    hessian = kernel + ridge * torch.eye(kernel.shape[-1], dtype=kernel.dtype)
    gradient = hessian @ alpha - onehot
    free = alpha < bound - 1e-7 * C
    beta = -(gradient * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True)
    mu = -gradient - beta
    return {
        "bound": (alpha - bound).clamp_min(0).max().item(),  # primal feasibility
        "row_sum": alpha.sum(-1).abs().max().item(),
        "stationarity": torch.where(free, mu, 0.0).abs().max().item(),  # mu = 0 on free entries
        "dual": torch.where(free, 0.0, (-mu).clamp_min(0)).max().item(),  # mu >= 0 on bound entries
        "complementarity": (mu * (bound - alpha)).abs().max().item(),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_kkt_conditions_hold(kind: str) -> None:
    x, y, ways, ridge = _instance(kind, 4)
    kernel = (x @ x.T)[None]
    alpha = solve_dual(kernel, y[None], ways, C, ridge, max_iter=500).alpha
    residuals = _kkt_residuals(alpha, kernel, y[None], ridge)
    scale = 1.0 + C * kernel.abs().max().item()
    assert residuals["bound"] <= 1e-8 * C
    assert residuals["row_sum"] <= 1e-10
    assert residuals["stationarity"] <= 1e-10 * scale
    assert residuals["dual"] <= 1e-8 * scale
    assert residuals["complementarity"] <= 1e-8 * C * scale
    # the certificate is not vacuous: the feasible point alpha = 0 violates dual feasibility
    assert _kkt_residuals(torch.zeros_like(alpha), kernel, y[None], ridge)["dual"] > 0.5


def test_sla_size_episode_matches_cvxpy() -> None:
    """A 3-way 5-shot episode with 4 rotations (12 joint classes, 60 support points, 720 dual variables)."""
    g = torch.Generator().manual_seed(7)
    x, y = _sla_like(g, ways=3, rotations=4, shots=5, dim=64, scale=0.5)
    kernel = x @ x.T
    ref_alpha, ref = _cvxpy_dual(kernel.numpy(), y.numpy(), 12, 1.0)
    solution = solve_dual(kernel[None], y[None], 12)
    ours = dual_objective(solution.alpha, kernel[None], y[None], 1.0).item()
    assert bool(solution.converged.all())
    assert abs(ours - ref) <= 1e-4 * abs(ref)
    assert torch.allclose(solution.alpha[0], torch.from_numpy(ref_alpha), atol=1e-5)


def test_projection_is_the_euclidean_projection() -> None:
    """project_rows against cvxpy's projection onto {z <= C e_y, sum z = 0}."""
    cp = pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 5, generator=g, dtype=torch.float64) * torch.tensor([[0.01], [0.1], [1], [1], [3], [0]])
    values[3, 1:3] = values[3, 0]  # ties
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    bound = C * F.one_hot(labels, 5).to(torch.float64)
    ours = project_rows(values, bound, C)
    for row in range(values.shape[0]):
        z = cp.Variable(5)
        constraints = [z <= bound[row].numpy(), cp.sum(z) == 0]
        cp.Problem(cp.Minimize(cp.sum_squares(z - values[row].numpy())), constraints).solve()
        assert np.allclose(ours[row].numpy(), z.value, atol=1e-6)


def _head(**options) -> MetaOptNetSVM:
    return MetaOptNetSVM(backbone=nn.Identity(), **options).double()


def _features(seed: int, dtype: torch.dtype = torch.float64):
    """Two small SLA-like episodes (3 classes x 2 rotations x 3 shots) with 4 queries per joint class."""
    g = torch.Generator().manual_seed(seed)
    support, labels, query = [], [], []
    for _ in range(2):
        x, y = _sla_like(g, ways=3, rotations=2, shots=3 + 4, dim=10, scale=0.6)
        x = x.view(3, 7, 2, 10)
        support.append(x[:, :3].reshape(-1, 10))
        query.append(x[:, 3:].reshape(-1, 10))
        labels.append(y.view(3, 7, 2)[:, :3].reshape(-1))
    return torch.stack(support).to(dtype), torch.stack(labels), torch.stack(query).to(dtype)


def test_gradients_match_finite_differences() -> None:
    """d(loss)/d(support, query) by gradcheck, d(loss)/d(scale) by central differences (float64)."""
    support, labels, query = _features(0)
    head = _head(scale=1.7)
    solution = solve_dual(support @ support.transpose(1, 2), labels, 6)
    free = solution.alpha < C * F.one_hot(labels, 6).double() - 1e-9
    assert bool((free.sum(-1) >= 2).any()) and bool((free.sum(-1) == 1).any())  # a non-trivial face
    weights = torch.randn(2, query.shape[1], 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        logits = head.head(s, labels, q, 6)
        return (logits * weights).sum() + logits.pow(2).sum()

    inputs = (support.clone().requires_grad_(), query.clone().requires_grad_())
    for seed in range(3):  # fast mode: random projections of the Jacobian against finite differences
        torch.manual_seed(seed)
        assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    head.zero_grad()
    loss(support, query).backward()
    eps = 1e-6
    with torch.no_grad():
        base = head.scale.item()
        head.scale.fill_(base + eps)
        up = loss(support, query).item()
        head.scale.fill_(base - eps)
        down = loss(support, query).item()
        head.scale.fill_(base)
    assert head.scale.grad.item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_kernel_gradient_matches_finite_differences_on_a_mixed_face() -> None:
    """Implicit differentiation on a face mixing free and bounded label entries and rows with one free entry."""
    x, y, ways, ridge = _instance("random", 2)
    kernel = (x @ x.T)[None].requires_grad_()
    alpha = solve_dual(kernel, y[None], ways, ridge=ridge).alpha
    free = alpha < C * F.one_hot(y[None], ways).double() - 1e-9
    label_free = free.gather(-1, y.view(1, -1, 1)).squeeze(-1)
    assert bool((free.sum(-1) == 1).any()) and bool(label_free.any()) and bool((~label_free).any())
    weights = torch.randn(1, x.shape[0], ways, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def func(k: torch.Tensor) -> torch.Tensor:
        return (crammer_singer_dual(0.5 * (k + k.transpose(1, 2)), y[None], ways, ridge=ridge) * weights).sum()

    assert torch.autograd.gradcheck(func, (kernel,), eps=1e-7, atol=1e-7)  # the full Jacobian


def test_batched_equals_one_at_a_time() -> None:
    """Episodes of different difficulty (different faces, block sizes, iteration counts) solved together."""
    kernels, labels = [], []
    for kind, seed in [("random", 0), ("duplicates", 1), ("sla", 2), ("zero", 0)]:
        x, y, _, _ = _instance(kind, seed)
        x = F.pad(x, (0, 24 - x.shape[1]))[:12]
        kernels.append(x @ x.T)
        labels.append(y[:12] % 4)
    kernel, labels = torch.stack(kernels).requires_grad_(), torch.stack(labels)
    weights = torch.randn(4, 12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = crammer_singer_dual(kernel, labels, 4, ridge=0.5)
    (batched * weights).sum().backward()
    for e in range(4):
        single_kernel = kernel[e : e + 1].detach().clone().requires_grad_()
        single = crammer_singer_dual(single_kernel, labels[e : e + 1], 4, ridge=0.5)
        (single * weights[e : e + 1]).sum().backward()
        assert torch.allclose(batched[e : e + 1], single, atol=1e-12)
        assert torch.allclose(kernel.grad[e : e + 1], single_kernel.grad, atol=1e-10)


def test_float32_matches_float64() -> None:
    support, labels, query = _features(1)
    head = _head()
    logits64 = head.head(support, labels, query, 6)
    logits32 = head.float().head(support.float(), labels, query.float(), 6)
    assert logits32.dtype == torch.float32
    assert torch.allclose(logits32.double(), logits64, rtol=1e-4, atol=1e-5)


def test_train_and_eval_settings_agree_and_a_tight_cap_stays_feasible() -> None:
    support, labels, query = _features(2)
    head = _head(train_max_iter=30, eval_max_iter=100)
    with torch.no_grad():
        train_logits = head.train().head(support, labels, query, 6)
        eval_logits = head.eval().head(support, labels, query, 6)
    assert torch.allclose(train_logits, eval_logits, atol=1e-12)
    kernel = support @ support.transpose(1, 2)
    exact = solve_dual(kernel, labels, 6)
    capped = solve_dual(kernel, labels, 6, max_iter=1, warm_steps=0)
    assert exact.iterations > 1 and not bool(capped.converged.all())
    residuals = _kkt_residuals(capped.alpha, kernel, labels, 1.0)
    assert residuals["bound"] <= 1e-12 and residuals["row_sum"] <= 1e-12  # feasible, not optimal
    capped_objective = dual_objective(capped.alpha, kernel, labels, 1.0)
    assert bool((capped_objective >= dual_objective(exact.alpha, kernel, labels, 1.0) - 1e-12).all())


def test_logits_are_svm_scores() -> None:
    """Logits = scale * sum_i alpha_ik <x_i, q>, by an explicit loop over support points."""
    support, labels, query = _features(3)
    head = _head(scale=2.5)
    alpha = solve_dual(support @ support.transpose(1, 2), labels, 6).alpha
    expected = torch.zeros(2, query.shape[1], 6, dtype=torch.float64)
    for e in range(2):
        for i in range(support.shape[1]):
            expected[e] += (query[e] @ support[e, i]).unsqueeze(-1) * alpha[e, i]
    assert torch.allclose(head.head(support, labels, query, 6), 2.5 * expected, atol=1e-10)
    assert torch.allclose(svm_logits(support, labels, query, 6), expected, atol=1e-10)


def test_registered_and_runs_on_images() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    learner = LEARNERS.create("metaoptnet-svm", backbone=backbone)
    g = torch.Generator().manual_seed(0)
    support = torch.randn(2, 6, 3, 4, 4, generator=g)
    query = torch.randn(2, 9, 3, 4, 4, generator=g)
    labels = torch.arange(3).repeat_interleave(2).expand(2, -1)
    logits = learner(support, labels, query, 3)
    assert logits.shape == (2, 9, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert learner.scale.grad is not None and backbone[1].weight.grad is not None


@pytest.mark.parametrize(
    "options", [{"C": 0.0}, {"ridge": -1.0}, {"train_max_iter": 0}, {"eval_max_iter": 2.5}, {"tol": 0.0}]
)
def test_bad_options_are_user_errors(options: dict) -> None:
    with pytest.raises(UserError) as info:
        MetaOptNetSVM(backbone=nn.Identity(), **options)
    assert "\n" not in str(info.value)


# ----- MetaOptNet's solver budget: the interior-point method qpth runs -----


def _problem(episodes: int = 2, support: int = 20, ways: int = 5, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(episodes, support, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(support // ways).expand(episodes, support)
    return x, labels


@pytest.mark.parametrize("iterations", [1, 2, 3, 15])
def test_interior_point_reproduces_qpth_on_metaoptnets_qp(iterations: int) -> None:
    """Side by side with qpth (MetaOptNet's solver, run as MetaOptNet sets up its SVM-CS QP densely): the same
    iterate after the same budget, and the same gradient."""
    qp_module = pytest.importorskip("qpth.qp", reason="qpth is not installed (pip install --no-deps qpth)")
    from fewshot_sla.learners.svm_interior_point import interior_point_dual

    x, labels = _problem()
    b, s, c = x.shape[0], x.shape[1], 5
    weights = torch.randn(b, s, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    solutions = []
    for use_qpth in (True, False):
        xs = x.clone().requires_grad_()
        kernel = xs @ xs.transpose(1, 2)
        if use_qpth:
            onehot = F.one_hot(labels, c).double()
            eye_c = torch.eye(c, dtype=torch.float64)
            q = torch.stack([torch.kron(kernel[e], eye_c) for e in range(b)]) + torch.eye(s * c, dtype=torch.float64)
            g = torch.eye(s * c, dtype=torch.float64).expand(b, -1, -1)
            a = torch.kron(torch.eye(s, dtype=torch.float64), torch.ones(1, c, dtype=torch.float64)).expand(b, -1, -1)
            solver = qp_module.QPFunction(verbose=-1, maxIter=iterations)
            alpha = solver(
                q, -onehot.reshape(b, -1), g, 0.1 * onehot.reshape(b, -1), a, torch.zeros(b, s, dtype=torch.float64)
            ).reshape(b, s, c)
        else:
            alpha = interior_point_dual(kernel, labels, c, 0.1, 1.0, iterations)
        (alpha * weights).sum().backward()
        solutions.append(alpha.detach())
        grads.append(xs.grad)
    torch.testing.assert_close(solutions[1], solutions[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-11)


def test_interior_point_converges_to_the_exact_dual_with_its_gradient() -> None:
    from fewshot_sla.learners.svm_interior_point import interior_point_dual

    x, labels = _problem(3, 40, 10, 8, seed=2)
    weights = torch.randn(3, 40, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for method in ("interior", "exact"):
        xs = x.clone().requires_grad_()
        kernel = xs @ xs.transpose(1, 2)
        if method == "interior":
            alpha = interior_point_dual(kernel, labels, 10, 0.1, 1.0, 40)
        else:
            alpha = crammer_singer_dual(kernel, labels, 10, cost=0.1, ridge=1.0, max_iter=100)
        (alpha * weights).sum().backward()
        results.append((alpha.detach(), xs.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-8, atol=1e-10)
    # The gradient uses qpth's backward scaling, multipliers and slacks clamped at 1e-8: close to the exact
    # solver's (where active bounds are fixed), not equal to it.
    ours, exact = results[0][1], results[1][1]
    assert float((ours - exact).norm() / exact.norm()) < 1e-2


def test_a_short_budget_approaches_feasibility_and_counts_as_unconverged() -> None:
    from fewshot_sla.learners.svm_interior_point import solve_interior_point

    x, labels = _problem(4, 40, 10, 8, seed=4)
    kernel = x @ x.transpose(1, 2)
    bound = 0.1 * F.one_hot(labels, 10).double()
    violations = []
    for iterations, converged in ((1, False), (3, False), (8, False), (30, True)):
        solution = solve_interior_point(kernel, labels, 10, 0.1, 1.0, iterations)
        # An infeasible-start method: the bounds hold only in the limit, the row sums from the start.
        violations.append(float((solution.alpha - bound).clamp(min=0).max()))
        assert float(solution.alpha.sum(-1).abs().max()) < 1e-12
        assert bool((solution.converged == converged).all()), iterations
    assert violations[0] > violations[1] > violations[2] and violations[3] < 1e-9


def test_the_learner_offers_metaoptnets_budget_and_reports_what_did_not_converge() -> None:
    from fewshot_sla.learners.metaoptnet_svm import MetaOptNetSVM

    g = torch.Generator().manual_seed(5)
    support = torch.randn(2, 20, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat_interleave(4).expand(2, 20)
    query = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    budget = MetaOptNetSVM(torch.nn.Identity(), solver="interior-point").double().eval()
    exact = MetaOptNetSVM(torch.nn.Identity()).double().eval()
    assert budget.settings() == {"solver": "interior-point", "train_iterations": 15, "eval_iterations": 3}
    assert exact.settings()["solver"] == "exact"
    short = budget.head(support, labels, query, 5)
    assert budget.pop_diagnostics() == {"svm_unconverged": 1.0}  # 3 iterations at test: none converged
    assert budget.pop_diagnostics() == {}  # reset
    budget.train()
    converged = budget.head(support, labels, query, 5)  # 15 in training
    assert budget.pop_diagnostics() == {"svm_unconverged": 0.0}
    torch.testing.assert_close(converged, exact.head(support, labels, query, 5), rtol=1e-6, atol=1e-8)
    assert exact.pop_diagnostics() == {"svm_unconverged": 0.0}
    assert not torch.allclose(short, converged, rtol=1e-3)
    with pytest.raises(UserError, match="unknown solver 'qp'"):
        MetaOptNetSVM(torch.nn.Identity(), solver="qp")
