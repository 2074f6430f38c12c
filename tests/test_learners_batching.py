"""Every registered learner: B episodes at once give the same logits as one episode at a time (eval mode)."""

from __future__ import annotations

import pytest
import torch

from fewshot_sla.registry import BACKBONES, LEARNERS

EPISODES, WAYS, SHOTS, QUERIES, SIDE = 3, 3, 2, 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _episodes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    support = torch.randn(EPISODES, WAYS * SHOTS, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    query = torch.randn(EPISODES, WAYS * QUERIES, 3, SIDE, SIDE, generator=g, dtype=torch.float64)
    # Label-major rows as the sampler makes them, with a different class order in every episode.
    labels = torch.stack([torch.randperm(WAYS, generator=g).repeat_interleave(SHOTS) for _ in range(EPISODES)])
    return support, labels, query


@pytest.mark.parametrize("name", LEARNERS.names())
def test_batched_episodes_equal_one_at_a_time(name: str) -> None:
    torch.manual_seed(0)
    learner = LEARNERS.create(name, backbone=BACKBONES.create("conv4", hidden=4)).double().eval()
    support, labels, query = _episodes()
    with torch.no_grad():
        batched = learner(support, labels, query, WAYS)
        single = torch.cat(
            [learner(support[e : e + 1], labels[e : e + 1], query[e : e + 1], WAYS) for e in range(EPISODES)]
        )
    assert batched.shape == (EPISODES, WAYS * QUERIES, WAYS)
    assert torch.isfinite(batched).all()
    assert torch.allclose(batched, single, rtol=1e-6, atol=1e-8)
