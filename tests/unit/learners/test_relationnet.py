"""Relation Networks: the paper's shapes, the batched relation module against a per-pair loop, finite
differences, the MSE loss on one-hot targets, and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import MSE_SIGMOID
from fewshot_sla.learners.relationnet import RelationNet, relation_padding
from fewshot_sla.objectives import _distillation_loss
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES
from fewshot_sla.sla import aggregate_ag, augment_episode, resolve_transform
from tests.helpers.toy_episodes import toy_episodes as make_toy_episodes
from tests.helpers.toy_episodes import training_losses

pytestmark = pytest.mark.usefixtures("one_thread")


class Maps(nn.Module):
    """A stand-in backbone whose flattened output holds ``map_channels``-channel maps (the head's input)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.map_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _learner(channels: int, seed: int = 0, **options) -> RelationNet:
    """A relationnet on ``Maps`` with random BatchNorm running statistics and affine parameters."""
    torch.manual_seed(seed)
    options = {"relation_channels": 4, "relation_hidden": 3, **options}
    learner = LEARNERS.create("relationnet", backbone=Maps(channels), **options).double()
    return learner


def _randomise_batch_norms(learner: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in learner.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))


def _reference_relation(pairs: torch.Tensor, module: nn.Module, padding: int, training: bool) -> torch.Tensor:
    """The paper's relation module on explicit [class map; query map] pairs [P, 2C, h, w] -> [P] logits, from the
    module's parameters with plain torch ops (batch statistics over the P pairs when ``training``)."""

    def block(x: torch.Tensor, weight: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
        x = F.conv2d(x, weight, padding=padding)
        mean, var = (None, None) if training else (norm.running_mean, norm.running_var)
        x = F.relu(F.batch_norm(x, mean, var, norm.weight, norm.bias, training=training, eps=norm.eps))
        return F.max_pool2d(x, 2) if x.shape[-1] >= 2 else x

    x = block(pairs, module.conv1_weight, module.norm1)
    x = block(x, module.conv2.weight, module.norm2)
    x = F.relu(x.flatten(1) @ module.fc1_weight.T + module.fc1_bias)
    return (x @ module.fc2.weight.T + module.fc2.bias).squeeze(-1)


def _features(seed: int, b: int, ways: int, shots: int, queries: int, channels: int, side: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(shots) for _ in range(b)])
    d = channels * side * side
    support = torch.randn(b, ways * shots, d, generator=g, dtype=torch.float64)
    query = torch.randn(b, queries, d, generator=g, dtype=torch.float64)
    return support, labels, query


# ---------------------------------------------------------------- the paper's shapes


@pytest.mark.parametrize(("size", "in_channels", "side"), [(28, 1, 5), (84, 3, 19)])
def test_embedding_module_gives_the_papers_map_sizes(size: int, in_channels: int, side: int) -> None:
    # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5 (-> 5 -> 5); 84 -> 82 -> 41 -> 39 -> 19 (-> 19 -> 19).
    backbone = BACKBONES.create("relation-conv4", in_channels=in_channels)
    assert backbone.feature_shape(size) == (64, side, side)
    assert backbone.feature_dim(size) == 64 * side * side
    assert backbone.map_channels == 64
    images = torch.randn(2, in_channels, size, size)
    features = backbone(images)
    assert features.shape == (2, 64 * side * side)
    maps = images
    for block in backbone.blocks:
        maps = block(maps)
    assert maps.shape == (2, 64, side, side)
    torch.testing.assert_close(features, maps.reshape(2, -1))  # channel-major flattening of the maps


def test_embedding_module_rejects_too_small_images() -> None:
    backbone = BACKBONES.create("relation-conv4")
    with pytest.raises(UserError, match="at least 10x10"):
        backbone.feature_dim(9)
    with pytest.raises(UserError, match="at least 10x10"):
        backbone(torch.randn(1, 3, 9, 9))
    assert backbone.feature_shape(10) == (64, 1, 1)


@pytest.mark.parametrize(("size", "padding", "fc_in"), [(28, 1, 64), (84, 0, 64 * 3 * 3)])
def test_relation_module_takes_the_authors_padding_and_fc_size(size: int, padding: int, fc_in: int) -> None:
    # Omniglot: 5x5 maps, padding 1: 5 -> 5 -> 2 -> 2 -> 1, FC 64 -> 8. mini-ImageNet: 19x19 maps, padding 0:
    # 19 -> 17 -> 8 -> 6 -> 3, FC 64*3*3 -> 8 (the authors' code: input_size*3*3).
    torch.manual_seed(0)
    learner = LEARNERS.create("relationnet", backbone=BACKBONES.create("relation-conv4")).eval()
    support = torch.randn(1, 2, 3, size, size)
    with torch.no_grad():
        logits = learner(support, torch.tensor([[0, 1]]), torch.randn(1, 3, 3, size, size), 2)
    relation = learner.relation
    assert logits.shape == (1, 3, 2)
    assert tuple(relation.conv1_weight.shape) == (64, 128, 3, 3)
    assert tuple(relation.fc1_weight.shape) == (8, fc_in)
    assert tuple(relation.fc2.weight.shape) == (1, 8)
    assert relation.fc1_bias.eq(1).all() and relation.fc2.bias.eq(1).all()  # the authors' initialisation
    side = learner.backbone.feature_shape(size)[-1]
    assert relation_padding("auto", side, side) == padding


# ---------------------------------------------------------------- batched against one pair at a time


@pytest.mark.parametrize(
    ("ways", "shots", "side", "padding"), [(2, 1, 5, 1), (3, 2, 5, 1), (5, 3, 3, 1), (2, 2, 12, 0), (3, 1, 1, 1)]
)
def test_head_matches_a_per_pair_loop(ways: int, shots: int, side: int, padding: int) -> None:
    """Eval mode: each logit from one explicit [class map; query map] through the module, the class map the sum of
    that class's support maps, found by scanning the labels."""
    channels, b, queries = 2, 2, 3
    learner = _learner(channels, seed=ways + side)
    support, labels, query = _features(side, b, ways, shots, queries, channels, side)
    learner.eval()
    with torch.no_grad():
        got = learner.head(support, labels, query, ways)
        _randomise_batch_norms(learner, side)
        got = learner.head(support, labels, query, ways)
        assert got.shape == (b, queries, ways)
        for e in range(b):
            for c in range(ways):
                class_map = torch.zeros(channels, side, side, dtype=torch.float64)
                for i in range(support.shape[1]):
                    if int(labels[e, i]) == c:
                        class_map = class_map + support[e, i].reshape(channels, side, side)
                for q in range(queries):
                    query_map = query[e, q].reshape(channels, side, side)
                    pair = torch.cat([class_map, query_map]).unsqueeze(0)
                    expected = _reference_relation(pair, learner.relation, padding, training=False)
                    assert got[e, q, c].item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(("side", "padding"), [(5, 1), (12, 0)])
def test_training_mode_normalises_over_every_pair_of_the_pass(side: int, padding: int) -> None:
    channels, b, ways, shots, queries = 2, 2, 3, 2, 2
    learner = _learner(channels, seed=1).train()
    support, labels, query = _features(3, b, ways, shots, queries, channels, side)
    got = learner.head(support, labels, query, ways)
    onehot = F.one_hot(labels, ways).double()
    class_maps = torch.einsum("bsw,bsd->bwd", onehot, support).reshape(b, ways, channels, side, side)
    query_maps = query.reshape(b, queries, channels, side, side)
    pairs = torch.cat(
        [
            class_maps.unsqueeze(1).expand(b, queries, ways, channels, side, side),
            query_maps.unsqueeze(2).expand(b, queries, ways, channels, side, side),
        ],
        dim=3,
    ).reshape(b * queries * ways, 2 * channels, side, side)
    expected = _reference_relation(pairs, learner.relation, padding, training=True).reshape(b, queries, ways)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_relation_module_gradients_against_finite_differences() -> None:
    """Inputs and every parameter, in float64, BatchNorm in eval mode with random running statistics."""
    channels, side = 2, 5
    learner = _learner(channels, seed=2, relation_channels=3, relation_hidden=2).eval()
    support, labels, query = _features(4, 1, 2, 1, 2, channels, side)
    learner.head(support, labels, query, 2)  # materialise
    _randomise_batch_norms(learner, 5)
    relation = learner.relation
    names = [n for n, _ in relation.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in relation.parameters())
    class_maps = support.reshape(1, 2, channels, side, side).clone().requires_grad_(True)
    query_maps = query.reshape(1, 2, channels, side, side).clone().requires_grad_(True)

    def run(c: torch.Tensor, q: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(relation, dict(zip(names, p)), (c, q))
        return out

    assert torch.autograd.gradcheck(run, (class_maps, query_maps, *params))


# ---------------------------------------------------------------- the loss


def toy_episodes(b: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, side: int = 12) -> EpisodeBatch:
    """B episodes whose classes are noisy copies of per-class random images (noise 0.5)."""
    return make_toy_episodes(b, ways, shots, queries, side, noise=0.5)


def _small_learner(seed: int = 0) -> RelationNet:
    torch.manual_seed(seed)
    backbone = BACKBONES.create("relation-conv4", hidden=4)
    return LEARNERS.create("relationnet", backbone=backbone, relation_channels=4)


def test_the_loss_is_mse_of_sigmoid_scores_against_one_hot_targets() -> None:
    episode, learner = toy_episodes(), _small_learner()
    assert learner.loss_kind == MSE_SIGMOID
    loss, metrics = OBJECTIVES.create("baseline").loss(learner, episode)
    logits = learner(episode.support, episode.support_labels, episode.query, episode.ways)  # same batch statistics
    total, count = 0.0, 0
    for e in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            for c in range(episode.ways):
                score = 1 / (1 + math.exp(-logits[e, q, c].item()))
                target = 1.0 if c == int(episode.query_labels[e, q]) else 0.0
                total += (score - target) ** 2
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert metrics["loss"] == pytest.approx(loss.item())
    cross_entropy = F.cross_entropy(logits.reshape(-1, episode.ways), episode.query_labels.reshape(-1))
    assert abs(cross_entropy.item() - loss.item()) > 0.1


@pytest.mark.parametrize("name", ["da", "mt", "sla"])
def test_without_transformation_objectives_reduce_to_the_mse_baseline(name: str) -> None:
    episode, learner = toy_episodes(), _small_learner()
    baseline, _ = OBJECTIVES.create("baseline").loss(learner, episode)
    feature_dim = learner.backbone.feature_dim(12)
    loss, _ = OBJECTIVES.create(name, transform="none", feature_dim=feature_dim).loss(learner, episode)
    torch.testing.assert_close(loss, baseline)  # mt: its one-output transformation head adds exactly 0


def test_sla_sd_distils_in_the_learners_own_loss() -> None:
    """M = 1: the joint MSE equals the plain one and the aggregated scores equal the plain ones, so sla+sd is twice
    the baseline; with rotations, the SD term is MSE to one-hot plus MSE to the detached aggregated scores."""
    episode, learner = toy_episodes(), _small_learner()
    baseline, _ = OBJECTIVES.create("baseline").loss(learner, episode)
    loss, metrics = OBJECTIVES.create("sla+sd", transform="none").loss(learner, episode)
    torch.testing.assert_close(loss, 2 * baseline)
    assert metrics["loss_sd"] == pytest.approx(baseline.item(), rel=1e-6)
    # Eval mode (running statistics): the plain and joint logits do not depend on which pass computed them. The
    # running statistics of one training pass (momentum 1) and larger FC weights than the authors' N(0, 0.01), so
    # that the rotated copies' scores differ from the plain ones.
    with torch.no_grad():
        for m in learner.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        learner(episode.support, episode.support_labels, episode.query, episode.ways)
        for weight in (learner.relation.fc1_weight, learner.relation.fc2.weight):
            weight.normal_(0.0, 1.0)
        for bias in (learner.relation.fc1_bias, learner.relation.fc2.bias):
            bias.zero_()
    learner.eval()
    _, metrics = OBJECTIVES.create("sla+sd", transform="rotation").loss(learner, episode)
    with torch.no_grad():
        single = learner(episode.support, episode.support_labels, episode.query, episode.ways)
        augmented = augment_episode(episode, resolve_transform("rotation"))
        joint = learner(augmented.support, augmented.support_labels, augmented.query, augmented.ways)
    aggregated = aggregate_ag(joint, 4)
    onehot = F.one_hot(episode.query_labels, episode.ways).float()
    expected = ((single.sigmoid() - onehot) ** 2).mean() + ((single.sigmoid() - aggregated.sigmoid()) ** 2).mean()
    assert metrics["loss_sd"] == pytest.approx(expected.item(), rel=1e-5)
    assert ((single.sigmoid() - aggregated.sigmoid()) ** 2).mean() > 1e-2 * expected  # the distillation term counts
    # The aggregated prediction is a fixed target: no gradient flows into it.
    single, aggregated = single.clone().requires_grad_(True), aggregated.clone().requires_grad_(True)
    _distillation_loss(learner, single, aggregated, episode.query_labels).backward()
    assert aggregated.grad is None and single.grad is not None


def test_a_few_training_steps_reduce_the_loss() -> None:
    episode, learner = toy_episodes(), _small_learner()
    losses = training_losses(learner, OBJECTIVES.create("baseline"), episode, steps=8)
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- options and errors


def test_options_are_checked_and_recorded() -> None:
    with pytest.raises(UserError, match="relation_padding"):
        LEARNERS.create("relationnet", backbone=Maps(2), relation_padding=2)
    with pytest.raises(UserError, match=">= 1"):
        LEARNERS.create("relationnet", backbone=Maps(2), relation_hidden=0)
    assert LEARNERS.create("relationnet", backbone=Maps(2)).settings() == {
        "relation_channels": 64,
        "relation_hidden": 8,
        "relation_padding": "auto",
        "class_map": "sum",
        "loss": MSE_SIGMOID,
    }


def test_an_explicit_padding_overrides_auto_and_other_map_sizes_are_a_user_error() -> None:
    channels = 2
    learner = _learner(channels, relation_padding=1).eval()
    support, labels, query = _features(0, 1, 2, 1, 2, channels, 12)
    with torch.no_grad():
        learner.head(support, labels, query, 2)
    # padding 1 on 12x12 maps: 12 -> 12 -> 6 -> 6 -> 3, so the first FC reads 4 * 3 * 3 (auto would give 0: 2x2).
    assert learner.relation.fc1_weight.shape[1] == 4 * 3 * 3
    support, labels, query = _features(0, 1, 2, 1, 2, channels, 5)
    with pytest.raises(UserError, match="image size it was trained on"):
        learner.head(support, labels, query, 2)
    with pytest.raises(UserError, match="not 2-channel square maps"):
        learner.head(support[..., :-1], labels, query[..., :-1], 2)
