"""ProtoNet head against a brute-force loop over episodes, classes and queries (float64)."""

from __future__ import annotations

import pytest
import torch

from fewshot_sla.registry import BACKBONES, LEARNERS


def _brute_force(support, labels, query, ways, scale=None):
    b, q_count, d = query.shape
    logits = torch.empty(b, q_count, ways, dtype=torch.float64)
    for e in range(b):
        prototypes = []
        for c in range(ways):
            members = [support[e, i] for i in range(support.shape[1]) if int(labels[e, i]) == c]
            prototypes.append(sum(members) / len(members))
        for q in range(q_count):
            for c in range(ways):
                distance = sum((float(query[e, q, k]) - float(prototypes[c][k])) ** 2 for k in range(d))
                logits[e, q, c] = -distance if scale is None else -distance / d * scale
    return logits


def _episode(seed: int, b=3, ways=4, extra=5, q=6, d=7):
    g = torch.Generator().manual_seed(seed)
    # Every class at least once, then unequal extra shots, in shuffled order.
    labels = torch.cat([torch.arange(ways).expand(b, ways), torch.randint(0, ways, (b, extra), generator=g)], 1)
    labels = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in labels])
    support = torch.randn(b, labels.shape[1], d, generator=g, dtype=torch.float64)
    query = torch.randn(b, q, d, generator=g, dtype=torch.float64)
    return support, labels, query, ways


@pytest.mark.parametrize("seed", [0, 1])
def test_head_matches_brute_force(seed: int) -> None:
    support, labels, query, ways = _episode(seed)
    learner = LEARNERS.create("protonet", backbone=torch.nn.Identity()).double()
    got = learner.head(support, labels, query, ways)
    assert torch.allclose(got, _brute_force(support, labels, query, ways), rtol=1e-10, atol=1e-10)


def test_scaled_variant_divides_by_feature_size_and_multiplies_by_learnable_scale() -> None:
    support, labels, query, ways = _episode(2)
    learner = LEARNERS.create("protonet", backbone=torch.nn.Identity(), scaled=True).double()
    with torch.no_grad():
        learner.scale.fill_(2.5)
    got = learner.head(support, labels, query, ways)
    assert torch.allclose(got, _brute_force(support, labels, query, ways, scale=2.5), rtol=1e-10, atol=1e-10)
    got.sum().backward()
    assert learner.scale.grad is not None and learner.scale.grad.abs() > 0


def test_head_gradients_against_finite_differences() -> None:
    support, labels, query, ways = _episode(3, b=2, ways=3, extra=2, q=2, d=3)
    learner = LEARNERS.create("protonet", backbone=torch.nn.Identity(), scaled=True).double()
    support.requires_grad_(True)
    query.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, q: learner.head(s, labels, q, ways), (support, query))


def test_forward_is_embed_then_head() -> None:
    torch.manual_seed(0)
    learner = LEARNERS.create("protonet", backbone=BACKBONES.create("conv4", hidden=4)).double().eval()
    g = torch.Generator().manual_seed(0)
    support = torch.randn(2, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    query = torch.randn(2, 4, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    with torch.no_grad():
        features_s = learner.backbone(support.flatten(0, 1)).reshape(2, 6, -1)
        features_q = learner.backbone(query.flatten(0, 1)).reshape(2, 4, -1)
        expected = _brute_force(features_s, labels, features_q, 3)
        assert torch.allclose(learner(support, labels, query, 3), expected, rtol=1e-9, atol=1e-9)


def test_reduced_precision_features_are_solved_in_float32() -> None:
    support, labels, query, ways = _episode(4)
    learner = LEARNERS.create("protonet", backbone=torch.nn.Identity())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = learner.head(support.bfloat16(), labels, query.bfloat16(), ways)
    assert got.dtype == torch.float32
    expected = _brute_force(support.bfloat16().double(), labels, query.bfloat16().double(), ways)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4)
