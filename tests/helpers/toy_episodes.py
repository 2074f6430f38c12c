"""Small learnable episode batches for learner tests (each class a per-class random image plus noise), and a short
training loop on them."""

from __future__ import annotations

import torch

from fewshot_sla.episodes import EpisodeBatch


def toy_episodes(b: int, ways: int, shots: int, queries: int, side: int, noise: float) -> EpisodeBatch:
    """B episodes whose classes are noisy copies of per-class random images (learnable, not trivial)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(b, ways, 3, side, side, generator=g)
    support_labels = torch.stack([torch.randperm(ways, generator=g) for _ in range(b)]).repeat_interleave(shots, 1)
    query_labels = torch.arange(ways).repeat_interleave(queries).expand(b, -1).clone()

    def draw(labels: torch.Tensor) -> torch.Tensor:
        picked = torch.stack([means[e, labels[e]] for e in range(b)])
        return picked + noise * torch.randn(picked.shape, generator=g)

    rows = torch.arange(b * ways * (shots + queries)).reshape(b, -1)
    split = ways * shots
    return EpisodeBatch(
        draw(support_labels), support_labels, draw(query_labels), query_labels, ways, rows[:, :split], rows[:, split:]
    )


def training_losses(
    learner: torch.nn.Module, objective: torch.nn.Module, episode: EpisodeBatch, steps: int
) -> list[float]:
    """The loss at each of ``steps`` Adam steps (lr 1e-2) of ``learner`` on ``episode``; lazy parameters are
    materialised first."""
    objective.loss(learner, episode)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, _ = objective.loss(learner, episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
