"""Matching Networks head against a brute-force loop over episodes, queries and support items (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.errors import UserError
from fewshot_sla.objectives import Baseline
from fewshot_sla.registry import BACKBONES, LEARNERS
from tests.helpers.toy_episodes import toy_episodes as make_toy_episodes
from tests.helpers.toy_episodes import training_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def _similarity(a: list[float], b: list[float], distance: str) -> float:
    if distance == "cosine":
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return -sum((x - y) ** 2 for x, y in zip(a, b))


def _brute_force_probabilities(support, labels, query, ways, distance, scale=1.0):
    """p(c | query) = sum over support items of class c of softmax_i(scale * sim(query, item_i)), by loops."""
    b, q_count, _ = query.shape
    probabilities = torch.empty(b, q_count, ways, dtype=torch.float64)
    for e in range(b):
        items = [support[e, i].tolist() for i in range(support.shape[1])]
        for q in range(q_count):
            sims = [scale * _similarity(query[e, q].tolist(), item, distance) for item in items]
            top = max(sims)
            weights = [math.exp(s - top) for s in sims]
            total = sum(weights)
            for c in range(ways):
                probabilities[e, q, c] = sum(w for w, y in zip(weights, labels[e].tolist()) if y == c) / total
    return probabilities


def _episode(seed: int, b: int = 3, ways: int = 4, shots: int = 2, q: int = 5, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(shots) for _ in range(b)])
    support = torch.randn(b, ways * shots, d, generator=g, dtype=torch.float64)
    query = torch.randn(b, q, d, generator=g, dtype=torch.float64)
    return support, labels, query, ways


def _learner(**options):
    return LEARNERS.create("matchingnet", backbone=torch.nn.Identity(), **options).double()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize(("ways", "shots"), [(2, 1), (3, 2), (5, 3)])
def test_head_matches_brute_force(distance: str, ways: int, shots: int) -> None:
    support, labels, query, ways = _episode(ways * 10 + shots, ways=ways, shots=shots)
    logits = _learner(distance=distance).head(support, labels, query, ways)
    expected = _brute_force_probabilities(support, labels, query, ways, distance)
    torch.testing.assert_close(logits.exp(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, expected.log(), rtol=1e-10, atol=1e-10)


def test_unequal_shots_and_a_learned_scale_match_brute_force() -> None:
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([[0, 1, 1, 2, 2, 2, 1], [2, 2, 0, 1, 0, 0, 0]])
    support = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    query = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    learner = _learner(scale=2.5, learn_scale=True)
    logits = learner.head(support, labels, query, 3)
    torch.testing.assert_close(logits.exp(), _brute_force_probabilities(support, labels, query, 3, "cosine", 2.5))
    logits.sum().backward()
    assert learner.scale is not None and learner.scale.grad is not None and learner.scale.grad.abs() > 0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_probabilities_sum_to_one_and_cross_entropy_is_the_matching_nll(distance: str) -> None:
    support, labels, query, ways = _episode(3)
    query_labels = torch.randint(0, ways, query.shape[:2], generator=torch.Generator().manual_seed(1))
    logits = _learner(distance=distance).head(support, labels, query, ways)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(query.shape[:2], dtype=torch.float64))
    p = _brute_force_probabilities(support, labels, query, ways, distance)
    nll = -sum(math.log(p[e, i, int(query_labels[e, i])]) for e in range(3) for i in range(5)) / 15
    cross_entropy = F.cross_entropy(logits.reshape(-1, ways), query_labels.reshape(-1))
    assert cross_entropy.item() == pytest.approx(nll, rel=1e-10)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_separated_classes_are_classified_correctly(distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    ways, shots, d = 4, 3, 8
    centres = 5 * torch.eye(ways, d, dtype=torch.float64)
    labels = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(shots) for _ in range(2)])
    support = centres[labels] + 0.1 * torch.randn(2, ways * shots, d, generator=g, dtype=torch.float64)
    query_labels = torch.arange(ways).repeat(3).expand(2, -1)
    query = centres[query_labels] + 0.1 * torch.randn(2, 3 * ways, d, generator=g, dtype=torch.float64)
    logits = _learner(distance=distance).head(support, labels, query, ways)
    assert torch.equal(logits.argmax(-1), query_labels)


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def test_far_apart_euclidean_classes_keep_finite_exact_log_probabilities() -> None:
    """Squared distances in the thousands underflow (or, shifted badly, overflow) exp(); the logits stay log p,
    computed in log space: log p(c) = LSE over c's items of sim - LSE over all items of sim."""
    support = torch.tensor([[[1.0, 0.0], [41.0, 0.0], [60.0, 0.0], [90.0, 3.0], [0.0, 70.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2]])
    query = torch.tensor([[[0.0, 0.0], [59.0, 1.0], [2.0, 69.0]]], dtype=torch.float64)
    logits = _learner(distance="euclidean").head(support, labels, query, 3)
    for q in range(3):
        sims = [-float(((query[0, q] - support[0, i]) ** 2).sum()) for i in range(5)]
        for c in range(3):
            members = [s for s, y in zip(sims, labels[0].tolist()) if y == c]
            assert logits[0, q, c].item() == pytest.approx(_log_sum_exp(members) - _log_sum_exp(sims), rel=1e-12)
    assert logits.min() < -3000  # far below exp()'s range: no clamping of a present class


def test_a_class_without_support_items_gets_a_finite_floor() -> None:
    support, labels, query, _ = _episode(4, ways=3)
    logits = _learner().head(support, labels, query, 4)
    assert torch.isfinite(logits).all()
    assert torch.all(logits[..., 3] == math.log(torch.finfo(torch.float64).tiny))
    torch.testing.assert_close(logits[..., :3].exp().sum(-1), torch.ones(query.shape[:2], dtype=torch.float64))


def test_head_gradients_against_finite_differences() -> None:
    support, labels, query, ways = _episode(5, b=2, ways=3, shots=2, q=2, d=3)
    support.requires_grad_(True)
    query.requires_grad_(True)
    for distance in ("cosine", "euclidean"):
        learner = _learner(distance=distance, scale=1.5)
        assert torch.autograd.gradcheck(lambda s, q, m=learner: m.head(s, labels, q, ways), (support, query))


def test_options_are_checked_and_recorded() -> None:
    with pytest.raises(UserError, match="unknown distance 'manhattan'"):
        _learner(distance="manhattan")
    with pytest.raises(UserError, match="scale must be"):
        _learner(scale=0.0)
    assert _learner().settings() == {
        "distance": "cosine",
        "scale": 1.0,
        "learn_scale": False,
        "full_context_embeddings": False,
    }
    assert _learner().scale is None and not list(_learner().parameters())


def toy_episodes(b: int = 2, ways: int = 3, shots: int = 2, queries: int = 3, side: int = 16) -> EpisodeBatch:
    """B episodes whose classes are noisy copies of per-class random images (noise 1.5)."""
    return make_toy_episodes(b, ways, shots, queries, side, noise=1.5)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    episode = toy_episodes()
    learner = LEARNERS.create("matchingnet", backbone=BACKBONES.create("conv4", hidden=8))
    losses = training_losses(learner, Baseline(), episode, steps=6)
    assert losses[-1] < 0.8 * losses[0], losses
