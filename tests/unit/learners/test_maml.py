"""MAML: meta-gradients against finite differences through the inner loop, first order against an explicit
computation, learn2learn side by side (when the extra is installed), batch statistics, test-time adaptation, the
lazily sized head."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES, LEARNERS

WAYS, SHOTS, QUERIES, EPISODES = 3, 2, 2, 2


pytestmark = pytest.mark.usefixtures("one_thread")

# CI's learn2learn environment sets this: there a missing learn2learn is a failure, not a skip.
REQUIRE_LEARN2LEARN = "FEWSHOT_SLA_REQUIRE_LEARN2LEARN"


def _learn2learn():
    """The learn2learn module (the optional extra, see DEVELOPERS.md); the test is skipped without it, unless
    ``FEWSHOT_SLA_REQUIRE_LEARN2LEARN=1``."""
    if os.environ.get(REQUIRE_LEARN2LEARN) == "1":
        import learn2learn

        return learn2learn
    return pytest.importorskip("learn2learn")


class Tiny(nn.Module):
    """A backbone small enough for finite differences: tanh(linear(flattened 3x2x2 image)) -> 4 features."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def feature_dim(self, image_size: int) -> int:
        return 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(images.flatten(1)))


def _episodes(seed: int, side: int = 2):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(EPISODES, WAYS * SHOTS, 3, side, side, generator=g, dtype=torch.float64)
    query = torch.randn(EPISODES, WAYS * QUERIES, 3, side, side, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.randperm(WAYS * SHOTS, generator=g) % WAYS for _ in range(EPISODES)])
    query_labels = torch.stack([torch.randperm(WAYS * QUERIES, generator=g) % WAYS for _ in range(EPISODES)])
    return support, labels, query, query_labels


def _tiny_learner(name: str = "maml", seed: int = 0, **options):
    torch.manual_seed(seed)
    learner = LEARNERS.create(name, backbone=Tiny(), inner_lr=0.5, train_steps=3, **options).double()
    support, labels, query, _ = _episodes(seed)
    learner(support, labels, query, WAYS)  # materialise the head, then give its bias a non-trivial value too
    if learner.head == "learned":
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            learner.head_bias.copy_(torch.randn(WAYS, generator=g, dtype=torch.float64))
    return learner


def _outer_loss(learner, episode) -> torch.Tensor:
    support, labels, query, query_labels = episode
    logits = learner(support, labels, query, WAYS)
    return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())


def _meta_gradient(learner, episode) -> list[torch.Tensor]:
    learner.zero_grad()
    _outer_loss(learner, episode).backward()
    return [p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("episodes", ["loop", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_second_order_meta_gradient_matches_finite_differences(adapt: str, episodes: str) -> None:
    """Directional derivatives of the outer loss (inner loop included) along random directions."""
    learner = _tiny_learner(adapt=adapt, episodes=episodes).train()
    episode = _episodes(1)
    analytic = torch.cat([g.flatten() for g in _meta_gradient(learner, episode)])
    params = list(learner.parameters())
    theta = nn.utils.parameters_to_vector(params).detach()
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
            values = []
            for sign in (1, -1):
                nn.utils.vector_to_parameters(theta + sign * eps * direction, params)
                values.append(_outer_loss(learner, episode).item())
            numeric = (values[0] - values[1]) / (2 * eps)
            assert (analytic @ direction).item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        nn.utils.vector_to_parameters(theta, params)


def _explicit_adaptation(learner: nn.Module, support, labels, steps: int, adapt: str = "all"):
    """Plain-tensor MAML inner loop on the Tiny model, adapted parameters returned as new leaves."""
    if learner.head == "learned":
        weight, bias = learner.head_weight.detach().clone(), learner.head_bias.detach().clone()
    else:
        weight, bias = torch.zeros(WAYS, 4, dtype=torch.float64), torch.zeros(WAYS, dtype=torch.float64)
    params = [
        learner.backbone.linear.weight.detach().clone(),
        learner.backbone.linear.bias.detach().clone(),
        weight,
        bias,
    ]
    for _ in range(steps):
        params = [p.requires_grad_(True) for p in params]
        w1, b1, wh, bh = params
        loss = F.cross_entropy(torch.tanh(support.flatten(1) @ w1.T + b1) @ wh.T + bh, labels)
        grads = torch.autograd.grad(loss, params)
        if adapt == "head":
            grads = (torch.zeros_like(w1), torch.zeros_like(b1), *grads[2:])
        params = [(p - learner.inner_lr * g).detach() for p, g in zip(params, grads)]
    return [p.requires_grad_(True) for p in params]


def _explicit_logits(params, query):
    w1, b1, wh, bh = params
    return torch.tanh(query.flatten(1) @ w1.T + b1) @ wh.T + bh


@pytest.mark.parametrize("episodes", ["loop", "vmap"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_first_order_gradient_is_the_outer_gradient_at_the_adapted_parameters(adapt: str, episodes: str) -> None:
    learner = _tiny_learner("maml-fo", adapt=adapt, episodes=episodes).train()
    episode = _episodes(2)
    support, labels, query, query_labels = episode
    got = _meta_gradient(learner, episode)
    expected = [torch.zeros_like(p) for p in learner.parameters()]
    names = [n for n, _ in learner.named_parameters()]
    for e in range(EPISODES):
        adapted = _explicit_adaptation(learner, support[e], labels[e], learner.train_steps, adapt)
        loss = F.cross_entropy(_explicit_logits(adapted, query[e]), query_labels[e]) / EPISODES
        g_w1, g_b1, g_wh, g_bh = torch.autograd.grad(loss, adapted)
        by_name = {"backbone.linear.weight": g_w1, "backbone.linear.bias": g_b1, "head_weight": g_wh, "head_bias": g_bh}
        for i, name in enumerate(names):
            expected[i] += by_name[name]
    for name, a, b in zip(names, got, expected):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_first_and_second_order_differ_with_inner_steps_and_agree_without() -> None:
    episode = _episodes(3)
    second = _meta_gradient(_tiny_learner("maml").train(), episode)
    first = _meta_gradient(_tiny_learner("maml-fo").train(), episode)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(second, first))

    grads = []
    for name in ("maml", "maml-fo"):
        learner = _tiny_learner(name).train()
        learner.train_steps = 0
        grads.append(_meta_gradient(learner, episode))
    # With no inner step both are the plain gradient of the query loss at the initial parameters.
    support, labels, query, query_labels = episode
    plain = _explicit_adaptation(learner, support[0], labels[0], 0)
    loss = sum(F.cross_entropy(_explicit_logits(plain, query[e]), query_labels[e]) for e in range(EPISODES)) / EPISODES
    g_w1, g_b1, g_wh, g_bh = torch.autograd.grad(loss, plain)
    expected = {"backbone.linear.weight": g_w1, "backbone.linear.bias": g_b1, "head_weight": g_wh, "head_bias": g_bh}
    names = [n for n, _ in learner.named_parameters()]
    for name, a, b in zip(names, grads[0], grads[1]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
        assert torch.allclose(a, expected[name], rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("name", ["maml", "maml-fo"])
def test_meta_gradient_matches_learn2learn_clone_adapt(name: str) -> None:
    """Side by side with learn2learn's MAML (the optional extra): same model, tasks and inner loop."""
    l2l = _learn2learn()
    learner = _tiny_learner(name).train()
    episode = _episodes(4)
    ours = dict(zip([n for n, _ in learner.named_parameters()], _meta_gradient(learner, episode)))

    body = Tiny().double()
    body.load_state_dict(learner.backbone.state_dict())
    head = nn.Linear(4, WAYS).double()
    with torch.no_grad():
        head.weight.copy_(learner.head_weight)
        head.bias.copy_(learner.head_bias)
    maml = l2l.algorithms.MAML(nn.Sequential(body, head), lr=learner.inner_lr, first_order=name == "maml-fo")
    support, labels, query, query_labels = episode
    losses = []
    for e in range(EPISODES):
        clone = maml.clone()
        for _ in range(learner.train_steps):
            clone.adapt(F.cross_entropy(clone(support[e]), labels[e]))
        losses.append(F.cross_entropy(clone(query[e]), query_labels[e]))
    (sum(losses) / EPISODES).backward()
    # A standard N-way output layer on both sides.
    theirs = {
        "backbone.linear.weight": body.linear.weight.grad,
        "backbone.linear.bias": body.linear.bias.grad,
        "head_weight": head.weight.grad,
        "head_bias": head.bias.grad,
    }
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-9, atol=1e-12, msg=key)


# Small instances of the built-in backbones (any other registered backbone with its defaults).
SMALL_BACKBONES: dict[str, dict] = {
    "conv4": {"hidden": 4},
    "relation-conv4": {"hidden": 4},
    "resnet12": {"channels": (4, 4, 8, 8), "drop_rate": 0.1, "dropblock_ramp_steps": 1},
    "wrn28-10": {"depth": 10, "widen": 1},
}
BACKBONE_CASES = [
    *[pytest.param(name, SMALL_BACKBONES.get(name, {}), id=name) for name in BACKBONES.names()],
    pytest.param("conv4", {"hidden": 4, "strided": True}, id="conv4-strided"),
]


@pytest.mark.parametrize(("name", "options"), BACKBONE_CASES)
def test_learn2learn_clone_adapts_every_backbone_like_a_functional_sgd_step(name: str, options: dict) -> None:
    """learn2learn's ``MAML(backbone).clone().adapt(loss)`` on our backbones: the adapted output and the
    meta-gradient are those of one SGD step written with ``torch.func.functional_call``."""
    l2l = _learn2learn()
    torch.manual_seed(0)
    backbone = BACKBONES.create(name, **options).double().train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.randn(4, backbone.feature_dim(32), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    buffers = copy.deepcopy(dict(backbone.named_buffers()))  # BatchNorm statistics, DropBlock clocks

    def run(call, *args):
        torch.manual_seed(3)  # the same dropout and DropBlock masks on both sides
        return call(*args)

    def loss_of(features: torch.Tensor) -> torch.Tensor:
        return (features - target).square().mean()

    lr = 0.1
    before = run(backbone, images).detach()
    clone = l2l.algorithms.MAML(backbone, lr=lr).clone()
    clone.adapt(loss_of(run(clone, images)))
    adapted = run(clone, images)
    loss_of(adapted).backward()
    theirs = {n: p.grad for n, p in backbone.named_parameters()}

    with torch.no_grad():  # learn2learn's clone shares the buffers: the same statistics and clocks again
        for n, b in backbone.named_buffers():
            b.copy_(buffers[n])
    params = dict(backbone.named_parameters())
    loss = loss_of(run(torch.func.functional_call, backbone, params, (images,)))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    stepped = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    expected = run(torch.func.functional_call, backbone, stepped, (images,))
    ours = dict(zip(params, torch.autograd.grad(loss_of(expected), list(params.values()))))

    assert not torch.allclose(adapted, before), "the step changed nothing"
    torch.testing.assert_close(adapted, expected, rtol=1e-12, atol=1e-14)
    for n, g in ours.items():
        assert theirs[n] is not None, n
        torch.testing.assert_close(theirs[n], g, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("name", ["maml", "maml-fo"])
def test_test_time_adapts_with_test_steps_and_without_autograd(name: str) -> None:
    learner = _tiny_learner(name).eval()
    support, labels, query, _ = _episodes(4)
    with torch.no_grad():
        got = learner(support, labels, query, WAYS)
    assert not got.requires_grad
    for e in range(EPISODES):
        adapted = _explicit_adaptation(learner, support[e], labels[e], learner.test_steps)
        assert torch.allclose(got[e], _explicit_logits(adapted, query[e]).detach(), rtol=1e-10, atol=1e-12)
    with torch.inference_mode():
        assert torch.allclose(learner(support, labels, query, WAYS), got, rtol=1e-12, atol=1e-14)


def _conv_learner(name: str = "maml", **options):
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=4)
    return LEARNERS.create(name, backbone=backbone, inner_lr=0.1, train_steps=2, test_steps=2, **options).double()


def test_batchnorm_uses_batch_statistics_in_train_and_eval() -> None:
    learner = _conv_learner()
    norms = [m for m in learner.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.running_mean is None and m.running_var is None for m in norms)
    support, labels, query, _ = _episodes(5, side=16)
    train_logits = learner.train()(support, labels, query, WAYS)
    eval_logits = learner.eval()(support, labels, query, WAYS)
    assert torch.allclose(train_logits, eval_logits, rtol=1e-10, atol=1e-12)
    # Query logits depend on the other queries of the episode (transductive), as in the original MAML.
    shifted = query.clone()
    shifted[:, 1:] += 1.0
    assert not torch.allclose(learner(support, labels, shifted, WAYS)[:, 0], eval_logits[:, 0])


@pytest.mark.parametrize(("name", "adapt"), [("maml", "head"), ("maml-fo", "all"), ("maml-fo", "head")])
def test_vmap_and_loop_agree_in_logits_and_meta_gradients(name: str, adapt: str) -> None:
    episode = _episodes(6, side=16)
    support, labels, query, _ = episode
    results = []
    for episodes in ("loop", "vmap"):
        learner = _conv_learner(name, adapt=adapt, episodes=episodes).train()
        logits = learner(support, labels, query, WAYS)
        results.append((logits.detach(), _meta_gradient(learner, episode)))
        one_at_a_time = torch.cat(
            [learner(support[e : e + 1], labels[e : e + 1], query[e : e + 1], WAYS) for e in range(EPISODES)]
        )
        assert torch.allclose(logits, one_at_a_time, rtol=1e-10, atol=1e-12)
    (loop_logits, loop_grads), (vmap_logits, vmap_grads) = results
    assert torch.allclose(loop_logits, vmap_logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(loop_grads, vmap_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_vmap_refuses_second_order_through_batchnorm() -> None:
    # torch.func's BatchNorm double-backward batching rule gives wrong meta-gradients (see the module docstring).
    with pytest.raises(UserError, match="episodes='loop'"):
        _conv_learner("maml", episodes="vmap")


def test_lazy_head_trains_with_an_early_optimizer_and_round_trips_through_state_dict() -> None:
    learner = _conv_learner().train()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)  # before the head has a size
    episode = _episodes(7, side=16)
    _outer_loss(learner, episode).backward()
    start = learner.head_weight.detach().clone()
    optimizer.step()
    assert learner.head_weight.shape == (WAYS, 4) and learner.head_bias.shape == (WAYS,)
    assert not torch.equal(learner.head_weight, start), "the optimizer must update the head"
    fresh = _conv_learner()
    fresh.load_state_dict(learner.state_dict())
    support, labels, query, _ = episode
    learner.eval(), fresh.eval()
    assert torch.equal(fresh(support, labels, query, WAYS), learner(support, labels, query, WAYS))


def _ways_episode(ways: int):
    g = torch.Generator().manual_seed(8)
    support = torch.randn(1, ways, 3, 16, 16, generator=g, dtype=torch.float64)
    query = torch.randn(1, 3, 3, 16, 16, generator=g, dtype=torch.float64)
    return support, torch.arange(ways)[None], query, ways


def test_the_learned_head_has_its_training_ways_and_serves_fewer() -> None:
    learner = _conv_learner().eval()
    learner(*_ways_episode(6))  # sized by its first episode: 6 outputs
    assert learner.head_weight.shape[0] == 6
    assert learner(*_ways_episode(2)).shape == (1, 3, 2)  # its first two rows
    with pytest.raises(UserError, match="learned head has 6 outputs"):
        learner(*_ways_episode(7))


def test_the_zero_head_has_no_parameter_and_fits_any_number_of_ways() -> None:
    learner = _conv_learner(head="zero").eval()
    assert not [n for n, _ in learner.named_parameters() if n.startswith("head")]
    for ways in (2, 12):
        assert learner(*_ways_episode(ways)).shape == (1, 3, ways)


@pytest.mark.parametrize("head", ["learned", "zero"])
def test_zero_head_meta_gradients_match_finite_differences_too(head: str) -> None:
    learner = _tiny_learner(head=head).train()
    episode = _episodes(9)
    got = _meta_gradient(learner, episode)
    assert all(float(g.abs().max()) > 1e-8 for g in got), "every parameter receives a meta-gradient"
    params = list(learner.parameters())
    theta = nn.utils.parameters_to_vector(params).detach()
    direction = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            nn.utils.vector_to_parameters(theta + sign * 1e-6 * direction, params)
            values.append(_outer_loss(learner, episode).item())
        nn.utils.vector_to_parameters(theta, params)
    assert (torch.cat([g.flatten() for g in got]) @ direction).item() == pytest.approx(
        (values[0] - values[1]) / 2e-6, rel=1e-6, abs=1e-9
    )


def test_under_sla_the_engine_sizes_the_head_for_the_joint_ways() -> None:
    from fewshot_sla.config import RunConfig
    from fewshot_sla.config.recipes import apply_recipe
    from fewshot_sla.engine.build import build_model

    for objective, transform, rows in (("sla", "rotation", 20), ("baseline", "none", 5), ("da", "rotation", 5)):
        cfg = apply_recipe(RunConfig(method="maml", objective=objective, transform=transform))
        learner, _ = build_model(cfg, 32, torch.device("cpu"))
        assert learner.head_weight.shape[0] == rows, objective


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner_lr": -1.0}, "must be >= 0"),
        ({"adapt": "body"}, "unknown adapt"),
        ({"episodes": "jit"}, "unknown episodes"),
        ({"head": "shared"}, "unknown head 'shared'; choose one of: learned, zero"),
    ],
)
def test_bad_options_are_user_errors(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        LEARNERS.create("maml", backbone=Tiny(), **options)
