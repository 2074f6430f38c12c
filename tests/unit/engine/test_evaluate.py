"""Episodic evaluation: cached embeddings give the uncached results, per-episode accuracy, fixed test sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_sla.data.store import Split
from fewshot_sla.engine import evaluate as evaluation
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.engine.evaluate import episode_accuracy, evaluate, fixed_test_set, validation_episode_set
from fewshot_sla.engine.feature_cache import FeatureCache, ImagesOf
from fewshot_sla.engine.memory import CreatedBytes
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec, gather_episodes
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES
from fewshot_sla.sla import RotatePermute, Transformation
from tests.helpers.paths import REPO

SIZE = 16


def make_split(name: str = "test", classes: int = 6, per_class: int = 12, seed: int = 0) -> Split:
    """A small split whose classes differ in colour and layout (so a trained-ish model is not at chance)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (classes, 1, SIZE, SIZE, 3), generator=g)
    noise = torch.randint(-40, 40, (classes, per_class, SIZE, SIZE, 3), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8).reshape(-1, SIZE, SIZE, 3)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return Split(
        name,
        images,
        labels,
        [f"c{i}" for i in range(classes)],
        [f"c{i // per_class}/{i % per_class:03d}" for i in range(classes * per_class)],
    )


def make_model(method: str, objective: str, transform: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny learner whose BatchNorm running statistics are not the defaults, in eval mode."""
    torch.manual_seed(seed)
    backbone = BACKBONES.create("conv4", hidden=8)
    learner = LEARNERS.create(method, backbone=backbone)
    obj = OBJECTIVES.create(objective, transform=transform, feature_dim=backbone.feature_dim(SIZE))
    learner.train()
    with torch.no_grad():
        for _ in range(3):
            backbone(torch.randn(16, 3, SIZE, SIZE) * 2 + 0.5)
    return learner.eval(), obj.eval()


@pytest.fixture(scope="module")
def split() -> Split:
    return make_split()


@pytest.fixture(scope="module")
def episodes(split: Split) -> EpisodeSet:
    return EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset="toy", split="test", spec=EpisodeSpec(4, 2, 3), count=30, seed=5
    )


@pytest.mark.parametrize(
    ("method", "objective", "transform"),
    [
        ("protonet", "sla", "rotation"),
        ("protonet", "sla+sd", "rotation"),
        ("protonet", "sla", "color_perm3"),
        ("protonet", "baseline", "rotation"),
        ("protonet", "da", "rotation2"),
        ("protonet", "mt", "rotation"),
        ("protonet", "sla", "none"),
        ("metaoptnet-ridge", "sla", "rotation"),
        ("metaoptnet-svm", "sla", "rotation"),
    ],
)
def test_cached_evaluation_gives_the_uncached_per_episode_results(
    split: Split, episodes: EpisodeSet, method: str, objective: str, transform: str
) -> None:
    learner, obj = make_model(method, objective, transform)
    pipeline = ImagePipeline(SIZE, SIZE)
    cached = evaluate(learner, obj, episodes, split, "toy", pipeline, batch_size=7, use_cache=True)
    plain = evaluate(learner, obj, episodes, split, "toy", pipeline, batch_size=7, use_cache=False)
    assert cached.cached and not plain.cached
    first = pipeline.episode(gather_episodes(split.images, episodes.rows_in(split, "toy")[:1], episodes.spec))
    with torch.no_grad():
        kinds = set(obj.predict(learner, first))
    assert set(cached.accuracies) == set(plain.accuracies) == kinds
    for kind in plain.accuracies:
        np.testing.assert_array_equal(cached.accuracies[kind], plain.accuracies[kind])
        assert cached.accuracies[kind].shape == (30,)


def test_cached_logits_match_the_uncached_logits(split: Split, episodes: EpisodeSet) -> None:
    learner, obj = make_model("protonet", "sla+sd", "rotation", seed=3)
    pipeline = ImagePipeline(SIZE, SIZE)
    rows = episodes.rows_in(split, "toy")[:6]
    cache = FeatureCache(learner, obj, ImagesOf(split.images, pipeline.images), rows)
    with torch.no_grad():
        direct = obj.predict(learner, pipeline.episode(gather_episodes(split.images, rows, episodes.spec)))
        via_cache = obj.predict_copies(learner.head, cache.episode(rows, episodes.spec))
    assert set(via_cache) == set(direct) == {"si", "ag", "sd"}
    for kind in direct:
        torch.testing.assert_close(via_cache[kind], direct[kind], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("objective", "copies"), [("baseline", 1), ("da", 1), ("mt", 1), ("sla", 4), ("sla+sd", 4)])
def test_cache_embeds_only_the_copies_the_objective_asks_for(
    split: Split, episodes: EpisodeSet, objective: str, copies: int
) -> None:
    learner, obj = make_model("protonet", objective, "rotation")
    rows = episodes.rows_in(split, "toy")
    with torch.no_grad():
        cache = FeatureCache(learner, obj, ImagesOf(split.images, ImagePipeline(SIZE, SIZE).images), rows)
    assert cache.table.shape[:2] == (copies, len(torch.unique(rows)))


def test_the_cache_refuses_a_learner_in_training_mode(split: Split, episodes: EpisodeSet) -> None:
    learner, obj = make_model("protonet", "sla", "rotation")
    with pytest.raises(ValueError, match="evaluation mode"):
        FeatureCache(
            learner.train(),
            obj,
            ImagesOf(split.images, ImagePipeline(SIZE, SIZE).images),
            episodes.rows_in(split, "toy"),
        )


def test_resized_images_are_cached_identically(split: Split, episodes: EpisodeSet) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=8)
    learner = LEARNERS.create("protonet", backbone=backbone).eval()
    obj = OBJECTIVES.create("sla", transform="rotation", feature_dim=backbone.feature_dim(24)).eval()
    pipeline = ImagePipeline(24, SIZE)
    cached = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=True)
    plain = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=False)
    for kind in plain.accuracies:
        np.testing.assert_array_equal(cached.accuracies[kind], plain.accuracies[kind])


def test_cached_and_uncached_agree_under_bfloat16_autocast(split: Split, episodes: EpisodeSet) -> None:
    learner, obj = make_model("protonet", "sla", "rotation", seed=1)
    pipeline = ImagePipeline(SIZE, SIZE)

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cached = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=True, autocast=amp)
    plain = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=False, autocast=amp)
    assert cached.cached
    for kind in plain.accuracies:
        np.testing.assert_array_equal(cached.accuracies[kind], plain.accuracies[kind])


def test_any_transformation_is_cached_with_the_uncached_results(split: Split, episodes: EpisodeSet) -> None:
    # Not a permutation of pixels: the cache embeds the transformed images themselves, so it needs none.
    brighter = Transformation("brighter", (RotatePermute(0), lambda x: x + 0.5, lambda x: x.flip(-1) * 0.5))
    learner, obj = make_model("protonet", "sla", "rotation")
    obj.transform = brighter
    pipeline = ImagePipeline(SIZE, SIZE)
    cached = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=True)
    plain = evaluate(learner, obj, episodes, split, "toy", pipeline, use_cache=False)
    assert cached.cached and set(cached.accuracies) == {"si", "ag"}
    for kind in plain.accuracies:
        np.testing.assert_array_equal(cached.accuracies[kind], plain.accuracies[kind])


def test_maml_is_evaluated_uncached_and_restores_training_mode(split: Split, episodes: EpisodeSet) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=4)
    learner = LEARNERS.create("maml", backbone=backbone, test_steps=1)
    obj = OBJECTIVES.create("baseline", transform="none", feature_dim=backbone.feature_dim(SIZE))
    small = EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset="toy", split="test", spec=EpisodeSpec(3, 1, 2), count=4, seed=0
    )
    learner.train()
    result = evaluate(learner, obj, small, split, "toy", ImagePipeline(SIZE, SIZE), use_cache=True)
    assert not result.cached and result.accuracies["plain"].shape == (4,)
    assert learner.training


def test_episode_accuracy_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, 4, generator=g)
    labels = torch.randint(0, 4, (5, 12), generator=g)
    expected = [sum(int(logits[b, q].argmax()) == int(labels[b, q]) for q in range(12)) / 12 for b in range(5)]
    np.testing.assert_allclose(episode_accuracy(logits, labels).numpy(), expected)


def test_test_set_is_generated_once_into_the_run_folder(tmp_path: Path, split: Split) -> None:
    spec = EpisodeSpec(3, 1, 2)  # no set of this made-up dataset is shipped or in the user's folder
    first, path, source = fixed_test_set("toy", split, spec, 10, tmp_path / "run", tmp_path / "data")
    assert path.parent == tmp_path / "run" and path.is_file() and source == "run"
    again, same, _ = fixed_test_set("toy", split, spec, 10, tmp_path / "run", tmp_path / "data")
    assert same == path and again.content_hash == first.content_hash and again.seed == 0


def test_a_shipped_test_set_is_preferred_and_a_user_set_wins(tmp_path: Path, split: Split, monkeypatch) -> None:
    import fewshot_sla.package_data as package_data

    spec = EpisodeSpec(3, 1, 2)
    name = EpisodeSet.default_name("toy", "test", spec, 10, 0)
    order = CanonicalOrder.of_split(split)
    shipped = EpisodeSet.make(order, dataset="toy", split="test", spec=spec, count=10, seed=0)
    shipped.save(tmp_path / "shipped" / name)
    monkeypatch.setattr(package_data, "shipped_episode_sets", lambda: tmp_path / "shipped")
    found, path, source = fixed_test_set("toy", split, spec, 10, tmp_path / "run", tmp_path / "data")
    assert (path.parent, source) == (tmp_path / "shipped", "shipped") and found.content_hash == shipped.content_hash
    assert not (tmp_path / "run").exists()
    # A user's file of the same name in DATA_ROOT/episodes/ wins (here one drawn with another seed inside).
    users = EpisodeSet.make(order, dataset="toy", split="test", spec=spec, count=10, seed=5)
    users.save(tmp_path / "data" / "episodes" / name)
    found, path, source = fixed_test_set("toy", split, spec, 10, tmp_path / "run", tmp_path / "data")
    assert (path, source) == (tmp_path / "data" / "episodes" / name, "user")
    assert found.content_hash == users.content_hash != shipped.content_hash


def test_validation_set_is_fixed(split: Split) -> None:
    a = validation_episode_set("toy", split, EpisodeSpec(3, 1, 2), 8)
    b = validation_episode_set("toy", split, EpisodeSpec(3, 1, 2), 8)
    assert a.content_hash == b.content_hash and a.count == 8


def test_evaluation_benchmark_smoke_mode_runs_on_the_cpu() -> None:
    script = REPO / "benchmarks" / "bench_eval_cache.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--tiny"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "identical per-episode accuracies on the 10 shared episodes: yes" in proc.stdout


@pytest.mark.parametrize("method", ["protonet", "relationnet"])
def test_head_calls_take_as_many_episodes_as_the_head_bytes_allow_with_the_same_results(
    split: Split, episodes: EpisodeSet, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for the head's output of three episodes, every head call takes at most three, and the per-episode
    accuracies equal those of the default sizing (the measuring call's result and statistics are not kept)."""
    learner, obj = make_model(method, "sla", "rotation")
    pipeline = ImagePipeline(SIZE, SIZE)
    default = evaluate(learner, obj, episodes, split, "toy", pipeline)
    cache = FeatureCache(learner, obj, ImagesOf(split.images, pipeline.images), episodes.rows_in(split, "toy")[:1])
    with torch.no_grad(), CreatedBytes() as one:
        obj.predict_copies(learner.head, cache.episode(episodes.rows_in(split, "toy")[:1], episodes.spec))
    monkeypatch.setattr(evaluation, "HEAD_BYTES", 3 * one.bytes)
    sizes: list[int] = []
    head = learner.head

    def counted(support: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sizes.append(support.shape[0])
        return head(support, *args, **kwargs)

    monkeypatch.setattr(learner, "head", counted)
    small = evaluate(learner, obj, episodes, split, "toy", pipeline)
    assert sizes[0] == 1 and max(sizes[1:]) == 3 and sum(sizes[1:]) == episodes.count
    for kind in default.accuracies:
        np.testing.assert_array_equal(small.accuracies[kind], default.accuracies[kind])
