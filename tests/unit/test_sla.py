"""SLA transformations, label augmentation, aggregation and self-distillation, each checked against an
independent formulation (explicit per-image loops, hand-written formulas, closed-form gradients)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.errors import UserError
from fewshot_sla.registry import TRANSFORMS
from fewshot_sla.sla import (
    Transformation,
    aggregate_ag,
    aggregate_si,
    augment_episode,
    check_transform,
    checked_transform,
    joint_labels,
    resolve_transform,
    self_distillation_loss,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_episode(b: int = 2, n: int = 3, k: int = 2, q: int = 2, size: int = 5, seed: int = 0) -> EpisodeBatch:
    """A random float episode; support labels in a random class order, split rows all distinct."""
    g = gen(seed)
    rows = torch.randperm(1000, generator=g)[: b * n * (k + q)].reshape(b, n * (k + q))
    return EpisodeBatch(
        support=torch.randn(b, n * k, 3, size, size, generator=g),
        support_labels=torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).repeat_interleave(k, 1),
        query=torch.randn(b, n * q, 3, size, size, generator=g),
        query_labels=torch.arange(n).repeat_interleave(q).expand(b, -1).clone(),
        ways=n,
        support_index=rows[:, : n * k],
        query_index=rows[:, n * k :],
    )


# Independent specification of every built-in: (rotation quarter turns k, channel order) per copy j,
# written out by hand in the reference code's order (rotation-major, colour orders minor).
ALL6 = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
CYC3 = [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
EXPECTED = {
    "none": [(0, (0, 1, 2))],
    "rotation": [(k, (0, 1, 2)) for k in range(4)],
    "rotation2": [(0, (0, 1, 2)), (2, (0, 1, 2))],
    "color_perm": [(0, p) for p in ALL6],
    "color_perm3": [(0, p) for p in CYC3],
    "rot_color_perm12": [(k, p) for k in range(4) for p in CYC3],
    "rot_color_perm24": [(k, p) for k in range(4) for p in ALL6],
}


def by_hand(image: torch.Tensor, k: int, order: tuple[int, ...]) -> torch.Tensor:
    """One [C, H, W] image rotated k quarter turns, then channels picked one by one."""
    rotated = torch.rot90(image, k, dims=(1, 2))
    return torch.stack([rotated[c] for c in order])


def test_builtin_transforms_are_registered_with_their_sizes():
    assert set(EXPECTED) <= set(TRANSFORMS.names())
    for name, spec in EXPECTED.items():
        assert resolve_transform(name).m == len(spec)
        assert TRANSFORMS.create(name).m == len(spec)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_transform_matches_explicit_per_image_ops(name):
    transform = resolve_transform(name)
    images = torch.randn(2, 3, 3, 6, 6, generator=gen(1))
    out = transform(images)
    m = len(EXPECTED[name])
    assert out.shape == (2, 3 * m, 3, 6, 6)
    for b, r in itertools.product(range(2), range(3)):
        for j, (k, order) in enumerate(EXPECTED[name]):
            assert torch.equal(out[b, r * m + j], by_hand(images[b, r], k, order)), (b, r, j)


def test_transform_works_on_a_flat_batch_and_keeps_dtype():
    transform = resolve_transform("rotation")
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    out = transform(images)
    assert out.dtype == torch.uint8 and out.shape == (8, 3, 4, 4)
    assert torch.equal(out[5], torch.rot90(images[1], 1, dims=(1, 2)))


def test_rotation_needs_square_images_and_colour_permutation_needs_rgb():
    wide = torch.zeros(1, 2, 3, 4, 6)
    with pytest.raises(UserError, match="square"):
        resolve_transform("rotation")(wide)
    with pytest.raises(UserError, match="square"):
        resolve_transform("rot_color_perm12")(wide)
    assert resolve_transform("rotation2")(wide).shape == (1, 4, 3, 4, 6)
    assert resolve_transform("color_perm")(wide).shape == (1, 12, 3, 4, 6)
    with pytest.raises(UserError, match="3-channel"):
        resolve_transform("color_perm3")(torch.zeros(1, 2, 1, 4, 4))


def test_unknown_transform_lists_the_valid_names():
    with pytest.raises(UserError) as info:
        resolve_transform("rotate")
    message = str(info.value)
    assert "\n" not in message and "rotation" in message and "color_perm" in message


def test_a_transformation_object_resolves_to_itself():
    custom = Transformation("flip", (lambda x: x, lambda x: torch.flip(x, dims=(-1,))))
    assert resolve_transform(custom) is custom
    out = custom(torch.arange(8.0).reshape(1, 1, 1, 2, 4))
    assert out.shape == (1, 2, 1, 2, 4)
    assert out[0, 1, 0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]


def test_joint_labels_are_class_major():
    labels = torch.tensor([[2, 0, 1]])
    m = 4
    expected = [labels[0, r].item() * m + j for r in range(3) for j in range(m)]
    assert joint_labels(labels, m).tolist() == [expected]


@pytest.mark.parametrize("name", ["rotation", "color_perm3", "rot_color_perm12"])
def test_augmented_episode_layout_matches_a_brute_force_loop(name):
    episode = random_episode()
    transform = resolve_transform(name)
    m = transform.m
    spec = EXPECTED[name]
    augmented = augment_episode(episode, transform)
    assert augmented.ways == episode.ways * m
    for part in ("support", "query"):
        images, labels, index = (getattr(episode, part + end) for end in ("", "_labels", "_index"))
        new_images, new_labels, new_index = (getattr(augmented, part + end) for end in ("", "_labels", "_index"))
        assert new_images.shape[1] == new_labels.shape[1] == new_index.shape[1] == images.shape[1] * m
        for b, r in itertools.product(range(images.shape[0]), range(images.shape[1])):
            for j, (k, order) in enumerate(spec):
                row = r * m + j
                assert torch.equal(new_images[b, row], by_hand(images[b, r], k, order))
                assert new_labels[b, row].item() == labels[b, r].item() * m + j
                assert new_index[b, row].item() == index[b, r].item()
    # The input episode is left untouched.
    assert episode.ways == 3 and episode.support.shape[1] == 6


def test_aggregation_matches_the_formula_with_explicit_loops():
    b, q, n, m = 2, 3, 4, 5
    z = torch.randn(b, q * m, n * m, generator=gen(3))
    si, ag = aggregate_si(z, m), aggregate_ag(z, m)
    assert si.shape == ag.shape == (b, q, n)
    for e, x, i in itertools.product(range(b), range(q), range(n)):
        assert si[e, x, i] == z[e, x * m + 0, i * m + 0]
        total = sum(z[e, x * m + j, i * m + j].item() for j in range(m))
        assert ag[e, x, i].item() == pytest.approx(total / m, abs=1e-6)


def test_aggregation_ignores_columns_of_other_transformations():
    """Hand-made logits: only the (i, j) column of copy j may matter; a huge value elsewhere must not."""
    m, n = 2, 3
    z = torch.zeros(1, 1 * m, n * m)
    z[0, 0, 1 * m + 0] = 4.0  # copy 0 votes class 1 in its own column
    z[0, 1, 2 * m + 1] = 2.0  # copy 1 votes class 2 in its own column
    z[0, 0, 2 * m + 1] = 100.0  # copy 0 in copy 1's column: ignored
    z[0, 1, 0 * m + 0] = 100.0  # copy 1 in copy 0's column: ignored
    assert aggregate_si(z, m)[0, 0].tolist() == [0.0, 4.0, 0.0]
    assert aggregate_ag(z, m)[0, 0].tolist() == [0.0, 2.0, 1.0]


def test_aggregation_rejects_shapes_that_do_not_divide():
    with pytest.raises(ValueError):
        aggregate_ag(torch.zeros(1, 6, 8), 4)


def manual_sd(single: torch.Tensor, agg: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    """CE + T^2 KL(p || q) written with exp/log, one row at a time."""
    total = torch.zeros(())
    for s, a, y in zip(single, agg, labels):
        ce = -(s[y] - torch.log(torch.exp(s).sum()))
        p = torch.exp(a / t) / torch.exp(a / t).sum()
        log_q = s / t - torch.log(torch.exp(s / t).sum())
        kl = (p * (torch.log(p) - log_q)).sum()
        total = total + ce + t**2 * kl
    return total / len(labels)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_self_distillation_loss_matches_manual_computation(temperature):
    g = gen(4)
    single = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    agg = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    got = self_distillation_loss(single, agg, labels, temperature)
    want = manual_sd(single.reshape(6, 5), agg.reshape(6, 5), labels.reshape(6), temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_self_distillation_gradient_is_closed_form_and_skips_the_target():
    g = gen(5)
    single = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    agg = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    t = 2.0
    self_distillation_loss(single, agg, labels, t).backward()
    assert agg.grad is None
    # d/ds [CE + T^2 KL] per row = softmax(s) - onehot(y) + T (softmax(s/T) - softmax(a/T)), mean over rows.
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(labels, 3).double()
        want = (single.softmax(-1) - onehot + t * ((single / t).softmax(-1) - (agg / t).softmax(-1))) / 4
    torch.testing.assert_close(single.grad, want)


# --- the contract of a (plug-in) transformation, checked on a probe batch --------------------------------------------


def qualname(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"  # type: ignore[attr-defined]


class Brighten:
    """A plug-in op that is not the identity."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images + 0.5


class Crop:
    """A plug-in op that does not keep the shape."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., 1:, 1:]


class ToDouble:
    """A plug-in op that changes the dtype."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.double()


class Jitter:
    """A plug-in op that is random."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images + torch.randn_like(images)


class Identity:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


class CroppedOutput(Transformation):
    """A plug-in Transformation subclass whose own __call__ crops its output."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return super().__call__(images)[..., :-1]


class ReversedCopies(Transformation):
    """A plug-in subclass whose __call__ puts the flipped copy first: copy 0 is not the identity."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images.flip(-1), images], dim=-4).flatten(-5, -4)


class NotATransformation:
    """A plug-in class registered as a transform that is not a Transformation."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


def listed_ops() -> list:
    """A plug-in factory that returns its ops instead of a Transformation."""
    return [Identity(), Brighten()]


def brighter_first() -> Transformation:
    """A plug-in factory whose copy 0 is not the identity."""
    return Transformation("brighter-first", (Brighten(), Identity()))


PLUGINS = {
    # name: (registered entry, the module.qualname the message must name, what it must say)
    "brighter-first": (brighter_first, qualname(Brighten), "copy 0 (test_sla.Brighten) is not the identity"),
    "cropped": (
        lambda: Transformation("cropped", (Identity(), Crop())),
        qualname(Crop),
        "copy 1 (test_sla.Crop) has shape [2, 2, 3, 7, 7] for images [2, 2, 3, 8, 8], not [2, 2, 3, 8, 8]",
    ),
    "cropped-output": (
        CroppedOutput("cropped-output", (Identity(), Brighten())),
        qualname(CroppedOutput),
        "the output has shape [2, 4, 3, 8, 7] for images [2, 2, 3, 8, 8], not [2, 4, 3, 8, 8]",
    ),
    "reversed": (
        ReversedCopies("reversed", (Identity(), Identity())),
        qualname(ReversedCopies),
        "the output has a copy 0 (rows r*2) that is not the identity",
    ),
    "double": (
        Transformation("double", (Identity(), ToDouble())),
        qualname(ToDouble),
        "turns torch.float32 images on cpu into torch.float64 on cpu",
    ),
    "jitter": (
        Transformation("jitter", (Identity(), Jitter())),
        qualname(Jitter),
        "gives different images for the same input on a second call",
    ),
    "listed-ops": (
        listed_ops,
        qualname(listed_ops),
        "which gives a builtins.list, not a fewshot_sla.sla.Transformation",
    ),
    "not-a-transformation": (
        NotATransformation,
        qualname(NotATransformation),
        "which gives a test_sla.NotATransformation, not a fewshot_sla.sla.Transformation",
    ),
}


@pytest.fixture
def plugins(monkeypatch):
    """The broken plug-ins of PLUGINS registered in a restorable copy of TRANSFORMS."""
    TRANSFORMS.names()
    monkeypatch.setattr(TRANSFORMS, "_entries", dict(TRANSFORMS._entries))
    for name, (entry, _, _) in PLUGINS.items():
        TRANSFORMS.add(name, entry)


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_a_plugin_that_breaks_the_contract_is_one_line_naming_it_and_the_rule(name, plugins):
    _, plugin, rule = PLUGINS[name]
    with pytest.raises(UserError) as raised:
        checked_transform(name, channels=3, image_size=8)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"transform '{name}'")
    assert plugin in message and rule.replace("test_sla.", f"{__name__}.") in message, message
    assert "Plug-in transformations" in message


def test_the_message_names_the_registered_factory_and_the_op():
    with pytest.raises(UserError) as raised:
        check_transform(brighter_first(), channels=1, image_size=6, entry=brighter_first)
    message = str(raised.value)
    assert f"transform 'brighter-first' ({qualname(brighter_first)}): copy 0 ({qualname(Brighten)})" in message
    assert "by up to 0.5" in message and "SLA+SI and SLA+AG read it as the plain image" in message


def test_the_check_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    with pytest.raises(UserError, match="second call"):
        check_transform(Transformation("jitter", (Identity(), Jitter())), channels=3, image_size=4)
    assert torch.equal(torch.get_rng_state(), state)


def test_images_the_transformation_cannot_take_are_the_datas_error_not_the_plugins():
    with pytest.raises(UserError, match="needs 3-channel images, got 1") as raised:
        checked_transform("color_perm", channels=1, image_size=8)
    assert "Plug-in transformations" not in str(raised.value)


def test_training_eval_and_predict_check_the_transformation_where_they_build_the_model(plugins):
    """``build_model`` is where a run (training), ``eval`` and ``load_run`` (predict) get their transformation."""
    from fewshot_sla.config import RunConfig
    from fewshot_sla.engine.build import build_model

    with pytest.raises(UserError, match=r"copy 0 \(.*Brighten\) is not the identity"):
        build_model(RunConfig(transform="brighter-first"), 16, torch.device("cpu"))
    _, objective = build_model(RunConfig(transform="rotation"), 16, torch.device("cpu"), channels=1)
    assert objective.transform.m == 4
