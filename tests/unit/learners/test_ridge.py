"""MetaOptNet ridge head against a closed-form numpy solution, both the D x D and the Woodbury S x S branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_sla.errors import UserError
from fewshot_sla.registry import LEARNERS

LAM = 50.0


def _numpy_ridge(support, labels, query, ways, lam=LAM, scale=1.0):
    """Per episode, W = argmin |X W - Y|^2 + lam |W|^2 from the normal equations; logits = scale * Q W."""
    out = []
    for x, y, q in zip(support.numpy(), labels.numpy(), query.numpy()):
        targets = np.eye(ways)[y]
        w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ targets)
        out.append(scale * q @ w)
    return torch.from_numpy(np.stack(out))


def _episode(seed: int, d: int, b=3, ways=4, shots=3, q=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(ways * shots, generator=g) % ways for _ in range(b)])
    # Features of a realistic scale (|x|^2 comparable to lam) so that lam matters but does not dominate.
    support = 3 * torch.randn(b, ways * shots, d, generator=g, dtype=torch.float64)
    query = 3 * torch.randn(b, q, d, generator=g, dtype=torch.float64)
    return support, labels, query, ways


def _learner(solve: str = "auto", scale: float = 1.0):
    learner = LEARNERS.create("metaoptnet-ridge", backbone=torch.nn.Identity(), solve=solve).double()
    with torch.no_grad():
        learner.scale.fill_(scale)
    return learner


@pytest.mark.parametrize("d", [5, 40])  # fewer and more features than the 12 support images
@pytest.mark.parametrize("solve", ["auto", "primal", "woodbury"])
def test_head_matches_numpy_closed_form(d: int, solve: str) -> None:
    support, labels, query, ways = _episode(d, d)
    got = _learner(solve, scale=1.7).head(support, labels, query, ways)
    expected = _numpy_ridge(support, labels, query, ways, scale=1.7)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("d", [5, 12, 40])
def test_primal_and_woodbury_agree(d: int) -> None:
    support, labels, query, ways = _episode(100 + d, d)
    primal = _learner("primal").head(support, labels, query, ways)
    woodbury = _learner("woodbury").head(support, labels, query, ways)
    assert torch.allclose(primal, woodbury, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("d", "system"), [(5, 5), (40, 12)])
def test_auto_solves_the_smaller_system(d: int, system: int, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    cholesky = torch.linalg.cholesky

    def spy(matrix, *args, **kwargs):
        sizes.append(matrix.shape[-1])
        return cholesky(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky", spy)
    support, labels, query, ways = _episode(7, d)
    _learner().head(support, labels, query, ways)
    assert sizes == [system]


@pytest.mark.parametrize("solve", ["primal", "woodbury"])
def test_gradients_against_finite_differences(solve: str) -> None:
    support, labels, query, ways = _episode(9, 4, b=2, ways=3, shots=2, q=2)
    support = (support / 3).requires_grad_(True)
    query = (query / 3).requires_grad_(True)
    learner = _learner(solve, scale=1.3)
    assert torch.autograd.gradcheck(lambda s, q: learner.head(s, labels, q, ways), (support, query))
    out = learner.head(support, labels, query, ways)
    (grad_scale,) = torch.autograd.grad(out.sum(), learner.scale)
    assert torch.allclose(grad_scale, (out / 1.3).sum())


def test_reduced_precision_features_are_solved_in_float32() -> None:
    support, labels, query, ways = _episode(11, 40)
    learner = LEARNERS.create("metaoptnet-ridge", backbone=torch.nn.Identity())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = learner.head(support.bfloat16(), labels, query.bfloat16(), ways)
    assert got.dtype == torch.float32
    scale = float(learner.scale)  # 2, MetaOptNet's effective start
    expected = _numpy_ridge(support.bfloat16().double(), labels, query.bfloat16().double(), ways, scale=scale)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="lam > 0"):
        LEARNERS.create("metaoptnet-ridge", backbone=torch.nn.Identity(), lam=0)
    with pytest.raises(UserError, match="unknown solve"):
        LEARNERS.create("metaoptnet-ridge", backbone=torch.nn.Identity(), solve="svd")


def test_initial_logits_equal_metaoptnets_ridge_qp_with_its_unit_scale() -> None:
    """MetaOptNet's head solves min 1/2 z^T (K + lam I) z - 2 y^T z per class column (logits Q X^T z, times its
    learnable scale initialised to 1); a fresh learner starts at the same logits."""
    from fewshot_sla.learners.metaoptnet_ridge import MetaOptNetRidge

    g = torch.Generator().manual_seed(11)
    support = torch.randn(2, 10, 7, generator=g, dtype=torch.float64)
    query = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.arange(10).remainder(5).expand(2, 10)
    y = torch.nn.functional.one_hot(labels, 5).double()
    kernel = support @ support.transpose(1, 2)
    z = torch.linalg.solve(kernel + LAM * torch.eye(10, dtype=torch.float64), 2 * y)  # the QP's stationary point
    metaoptnet = 1.0 * (query @ support.transpose(1, 2) @ z)
    learner = MetaOptNetRidge(torch.nn.Identity()).double()
    torch.testing.assert_close(learner.head(support, labels, query, 5), metaoptnet, rtol=1e-10, atol=1e-12)
