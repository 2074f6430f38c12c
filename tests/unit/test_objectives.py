"""Training objectives (baseline, da, mt, sla, sla+sd) over tiny ProtoNet-like learners, checked against
hand-written loops, against each other (M = 1 reduces to the baseline) and by training a few steps."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import EmbeddingLearner, Learner
from fewshot_sla.registry import OBJECTIVES

SIZE, DIM = 6, 8
BUILTIN_KEYS = {
    "baseline": {"plain"},
    "da": {"plain"},
    "mt": {"plain"},
    "sla": {"si", "ag"},
    "sla+sd": {"si", "ag", "sd"},
}


class TinyBackbone(nn.Module):
    """conv -> relu -> linear on 6x6 RGB images; counts its calls so tests can see backbone passes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4 * SIZE * SIZE, DIM)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(F.relu(self.conv(x)).flatten(1))

    def feature_dim(self, image_size: int) -> int:
        return DIM


class RotationInvariant(nn.Module):
    """Features averaged over the four rotations of the input: f(rot90(x)) == f(x)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.inner(torch.rot90(x, k, dims=(-2, -1))) for k in range(4)]).mean(0)


def prototype_logits(
    support_features: torch.Tensor, support_labels: torch.Tensor, query_features: torch.Tensor, ways: int
) -> torch.Tensor:
    """Negative squared distances to class means: [B,S,D], [B,S], [B,Q,D] -> [B,Q,ways]."""
    onehot = F.one_hot(support_labels, ways).to(support_features.dtype)
    prototypes = onehot.transpose(1, 2) @ support_features / onehot.sum(1).unsqueeze(-1)
    return -((query_features.unsqueeze(2) - prototypes.unsqueeze(1)) ** 2).sum(-1)


class TinyProtoNet(EmbeddingLearner):
    """A ProtoNet written as an EmbeddingLearner (embed once, then a head)."""

    def head(self, support_features, support_labels, query_features, ways):
        return prototype_logits(support_features, support_labels, query_features, ways)


class GenericProtoNet(Learner):
    """The same maths as a plain Learner, so objectives must take their generic (non-embedding) path."""

    def forward(self, support, support_labels, query, ways):
        b = support.shape[0]
        support_features = self.backbone(support.flatten(0, 1)).reshape(b, support.shape[1], -1)
        query_features = self.backbone(query.flatten(0, 1)).reshape(b, query.shape[1], -1)
        return prototype_logits(support_features, support_labels, query_features, ways)


LEARNERS = {"embedding": TinyProtoNet, "generic": GenericProtoNet}


def make_learner(kind: str = "embedding", seed: int = 0) -> Learner:
    return LEARNERS[kind](TinyBackbone(seed))


def toy_episode(b: int = 2, n: int = 3, k: int = 2, q: int = 2, seed: int = 0, noise: float = 0.5) -> EpisodeBatch:
    """Episodes whose classes are noisy copies of per-class random images (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(b, n, 3, SIZE, SIZE, generator=g)
    support_labels = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).repeat_interleave(k, 1)
    query_labels = torch.arange(n).repeat_interleave(q).expand(b, -1).clone()

    def draw(labels: torch.Tensor) -> torch.Tensor:
        picked = torch.stack([means[e, labels[e]] for e in range(b)])
        return picked + noise * torch.randn(picked.shape, generator=g)

    rows = torch.arange(b * n * (k + q)).reshape(b, n * (k + q))
    return EpisodeBatch(
        draw(support_labels), support_labels, draw(query_labels), query_labels, n, rows[:, : n * k], rows[:, n * k :]
    )


def create(name: str, transform: str = "rotation"):
    return OBJECTIVES.create(name, transform=transform, feature_dim=DIM)


# ---------------------------------------------------------------- registry-wide checks


def test_builtin_objectives_declare_their_prediction_kinds():
    """The kinds each built-in offers; that every registered objective predicts exactly its declared kinds, with a
    finite, differentiable loss, for embedding and plain learners, and that every registered learner trains and
    predicts with ``mt`` and ``sla+sd``, is ``fewshot_sla.testing`` (``check_objective``, ``check_learner``; run
    over the registries in tests/unit/test_testing.py)."""
    for name, keys in BUILTIN_KEYS.items():
        assert {kind.name for kind in OBJECTIVES.get(name).kinds} == keys, name


def test_unknown_objective_is_a_one_line_user_error_listing_valid_names():
    with pytest.raises(UserError) as info:
        create("slaa")
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in BUILTIN_KEYS)


# ---------------------------------------------------------------- M = 1 reduces to the baseline


@pytest.mark.parametrize("kind", sorted(LEARNERS))
@pytest.mark.parametrize("name", ["da", "mt", "sla"])
def test_without_transformation_objectives_reduce_to_the_baseline(name, kind):
    episode, learner = toy_episode(), make_learner(kind)
    baseline_loss, _ = create("baseline", "none").loss(learner, episode)
    loss, _ = create(name, "none").loss(learner, episode)
    assert torch.equal(loss, baseline_loss)
    learner.eval()
    plain = create("baseline", "none").predict(learner, episode)["plain"]
    for logits in create(name, "none").predict(learner, episode).values():
        assert torch.equal(logits, plain)


def test_mt_without_transformation_has_a_one_output_head_and_zero_auxiliary_loss():
    objective = create("mt", "none")
    assert objective.transform_head.out_features == 1
    _, metrics = objective.loss(make_learner(), toy_episode())
    assert metrics["loss_transform"] == 0.0


def test_sla_sd_without_transformation_is_twice_the_baseline_loss():
    """M = 1: joint CE = CE, the aggregated target equals the single prediction, so KL = 0."""
    episode, learner = toy_episode(), make_learner()
    baseline_loss, _ = create("baseline", "none").loss(learner, episode)
    loss, metrics = create("sla+sd", "none").loss(learner, episode)
    torch.testing.assert_close(loss, 2 * baseline_loss)
    assert metrics["loss_sd"] == pytest.approx(baseline_loss.item(), rel=1e-6)


# ---------------------------------------------------------------- against hand-written loops


def features_by_hand(backbone: nn.Module, image: torch.Tensor, k: int) -> torch.Tensor:
    """The embedding of one [C,H,W] image rotated by k quarter turns."""
    return backbone(torch.rot90(image, k, dims=(1, 2)).unsqueeze(0))[0]


def test_sla_loss_and_predictions_match_a_prototype_loop():
    """N*M prototypes (class i, rotation j) and joint targets i*M + j, built image by image."""
    episode, learner = toy_episode(), make_learner()
    objective = create("sla")
    m, n, f = 4, episode.ways, learner.backbone
    with torch.no_grad():
        loss, _ = objective.loss(learner, episode)
        predictions = objective.predict(learner, episode)
        losses, si_rows, ag_rows = [], [], []
        for e in range(episode.support.shape[0]):
            prototypes = torch.stack(
                [
                    torch.stack(
                        [
                            features_by_hand(f, episode.support[e, r], j)
                            for r in range(episode.support.shape[1])
                            if episode.support_labels[e, r] == i
                        ]
                    ).mean(0)
                    for i in range(n)
                    for j in range(m)
                ]
            )  # row i*M + j
            for r in range(episode.query.shape[1]):
                per_copy = []
                for j in range(m):
                    z = -((features_by_hand(f, episode.query[e, r], j) - prototypes) ** 2).sum(-1)
                    target = episode.query_labels[e, r] * m + j
                    losses.append(torch.logsumexp(z, 0) - z[target])
                    per_copy.append(z)
                si_rows.append(torch.stack([per_copy[0][i * m] for i in range(n)]))
                ag_rows.append(torch.stack([sum(per_copy[j][i * m + j] for j in range(m)) / m for i in range(n)]))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictions["si"].reshape(-1, n), torch.stack(si_rows), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(predictions["ag"].reshape(-1, n), torch.stack(ag_rows), rtol=1e-5, atol=1e-4)


def test_da_loss_matches_a_loop_where_copies_keep_their_label():
    episode, learner = toy_episode(), make_learner()
    m, n, f = 4, episode.ways, learner.backbone
    with torch.no_grad():
        loss, _ = create("da").loss(learner, episode)
        losses = []
        for e in range(episode.support.shape[0]):
            prototypes = torch.stack(
                [
                    torch.stack(
                        [
                            features_by_hand(f, episode.support[e, r], j)
                            for r, j in itertools.product(range(episode.support.shape[1]), range(m))
                            if episode.support_labels[e, r] == i
                        ]
                    ).mean(0)
                    for i in range(n)
                ]
            )
            for r, j in itertools.product(range(episode.query.shape[1]), range(m)):
                z = -((features_by_hand(f, episode.query[e, r], j) - prototypes) ** 2).sum(-1)
                losses.append(torch.logsumexp(z, 0) - z[episode.query_labels[e, r]])
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_mt_loss_is_plain_loss_plus_a_transformation_head_loop(kind):
    episode, learner = toy_episode(), make_learner(kind)
    objective = create("mt")
    m, f, head = 4, learner.backbone, objective.transform_head
    with torch.no_grad():
        loss, metrics = objective.loss(learner, episode)
        plain = learner(episode.support, episode.support_labels, episode.query, episode.ways)
        task = F.cross_entropy(plain.reshape(-1, 3), episode.query_labels.reshape(-1))
        aux = []
        for images in (episode.support, episode.query):
            for e, r, j in itertools.product(range(images.shape[0]), range(images.shape[1]), range(m)):
                z = head(features_by_hand(f, images[e, r], j))
                aux.append(torch.logsumexp(z, 0) - z[j])
    torch.testing.assert_close(loss, task + torch.stack(aux).mean(), rtol=1e-5, atol=1e-5)
    assert metrics["loss_task"] == pytest.approx(task.item(), rel=1e-5)


# ---------------------------------------------------------------- embedding reuse and aggregation


@pytest.mark.parametrize("name", ["mt", "sla+sd"])
def test_embedding_learners_share_one_backbone_pass_with_the_same_result(name):
    """The EmbeddingLearner path reuses the t_1 rows; a generic learner with the same weights runs the
    plain episode separately. Without batch statistics both must agree."""
    episode = toy_episode()
    fast, slow = make_learner("embedding"), make_learner("generic")
    objective = create(name)
    fast_loss, _ = objective.loss(fast, episode)
    slow_loss, _ = objective.loss(slow, episode)
    assert fast.backbone.calls == 1
    assert slow.backbone.calls > 1
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-5, atol=1e-5)
    fast_predictions = objective.predict(fast.eval(), episode)
    slow_predictions = objective.predict(slow.eval(), episode)
    for key in fast_predictions:
        torch.testing.assert_close(fast_predictions[key], slow_predictions[key], rtol=1e-5, atol=1e-4)


def test_sd_prediction_is_the_learner_on_the_untransformed_episode():
    episode, learner = toy_episode(), make_learner().eval()
    sd = create("sla+sd").predict(learner, episode)["sd"]
    plain = learner(episode.support, episode.support_labels, episode.query, episode.ways)
    torch.testing.assert_close(sd, plain, rtol=1e-5, atol=1e-4)


def test_rotation_invariant_embedding_gives_identical_si_and_ag():
    episode = toy_episode()
    invariant = TinyProtoNet(RotationInvariant(TinyBackbone())).eval()
    predictions = create("sla").predict(invariant, episode)
    torch.testing.assert_close(predictions["si"], predictions["ag"], rtol=1e-5, atol=1e-4)
    # Control: the same check must fail for an embedding that sees the rotation.
    ordinary = create("sla").predict(make_learner().eval(), episode)
    assert not torch.allclose(ordinary["si"], ordinary["ag"], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- errors and training


def test_mt_needs_the_right_feature_dim():
    with pytest.raises(UserError, match="feature_dim"):
        OBJECTIVES.create("mt", transform="rotation", feature_dim=0)
    wrong = OBJECTIVES.create("mt", transform="rotation", feature_dim=DIM + 1)
    with pytest.raises(UserError, match="feature_dim"):
        wrong.loss(make_learner(), toy_episode())


def test_rotation_of_non_square_episode_is_a_user_error():
    episode = toy_episode()
    episode.support, episode.query = episode.support[..., :-1], episode.query[..., :-1]
    with pytest.raises(UserError, match="square"):
        create("sla").loss(make_learner(), episode)


@pytest.mark.parametrize("name", sorted(BUILTIN_KEYS))
def test_losses_decrease_over_a_few_optimizer_steps(name):
    episode, learner = toy_episode(), make_learner()
    objective = create(name)
    optimizer = torch.optim.Adam([*learner.parameters(), *objective.parameters()], lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = objective.loss(learner, episode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if name == "mt":
        assert objective.transform_head.weight.grad is not None
