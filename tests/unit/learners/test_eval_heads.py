"""Few-shot evaluation heads for a pretrained embedding: ``nearest-centroid`` (SimpleShot) against a per-query loop,
``logistic-regression`` (RFS) against scikit-learn's ``LogisticRegression``, implicit gradients against finite
differences, SLA with and without the feature cache, and a run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.data.store import Split
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.engine.evaluate import evaluate
from fewshot_sla.engine.feature_cache import FeatureCache, ImagesOf
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec, gather_episodes
from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import UNCONVERGED
from fewshot_sla.learners.logistic_regression import fit_logistic_regression
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES

HEADS = ("nearest-centroid", "logistic-regression")
UNCONVERGED_KEY = f"logistic_regression{UNCONVERGED}"


def _episodes(seed: int, b: int, ways: int, shots: int, queries: int, d: int, dtype=torch.float64):
    """B episodes of clustered features (class means plus noise, not normalised), support classes shuffled."""
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(b, ways, d, generator=g, dtype=dtype)
    labels = torch.stack([torch.randperm(ways * shots, generator=g) % ways for _ in range(b)])
    query_labels = torch.randint(0, ways, (b, queries), generator=g)

    def draw(rows: torch.Tensor) -> torch.Tensor:
        picked = means.gather(1, rows.unsqueeze(-1).expand(-1, -1, d))
        return picked + torch.randn(picked.shape, generator=g, dtype=dtype) + 0.5

    return draw(labels), labels, draw(query_labels), ways


def _head(name: str, **options) -> torch.nn.Module:
    return LEARNERS.create(name, backbone=torch.nn.Identity(), **options).double().eval()


# ------------------------------------------------------------------------------------------------- nearest centroid


def _nearest_centroid_loop(support, labels, query, ways, scale=1.0, normalize=True):
    out = torch.empty(query.shape[0], query.shape[1], ways, dtype=query.dtype)
    for e in range(support.shape[0]):
        s = F.normalize(support[e], dim=-1) if normalize else support[e]
        q = F.normalize(query[e], dim=-1) if normalize else query[e]
        for c in range(ways):
            centroid = s[labels[e] == c].mean(0)
            for i in range(q.shape[0]):
                out[e, i, c] = -scale * ((q[i] - centroid) ** 2).sum()
    return out


@pytest.mark.parametrize(("scale", "normalize"), [(1.0, True), (2.5, True), (1.0, False)])
def test_nearest_centroid_equals_a_loop(scale: float, normalize: bool) -> None:
    support, labels, query, ways = _episodes(1, 3, 5, 3, 7, 12)
    got = _head("nearest-centroid", scale=scale, normalize=normalize).head(support, labels, query, ways)
    torch.testing.assert_close(got, _nearest_centroid_loop(support, labels, query, ways, scale, normalize))


def test_nearest_centroid_without_normalising_is_protonet() -> None:
    support, labels, query, ways = _episodes(2, 2, 4, 2, 5, 6)
    plain = _head("nearest-centroid", normalize=False).head(support, labels, query, ways)
    torch.testing.assert_close(plain, _head("protonet").head(support, labels, query, ways))


def test_nearest_centroid_scale_leaves_the_predictions() -> None:
    support, labels, query, ways = _episodes(3, 4, 5, 1, 9, 8)
    one = _head("nearest-centroid").head(support, labels, query, ways)
    ten = _head("nearest-centroid", scale=10.0).head(support, labels, query, ways)
    torch.testing.assert_close(ten, 10 * one)
    assert torch.equal(one.argmax(-1), ten.argmax(-1))


# ---------------------------------------------------------------------------------------------- logistic regression


@pytest.mark.parametrize(
    ("ways", "shots", "d", "C"),
    [
        (5, 1, 64, 1.0),  # 5-way 1-shot, more features than support images (solved in the support's span)
        (5, 5, 64, 1.0),  # 5-way 5-shot
        (5, 5, 16, 1.0),  # fewer features than support images (solved as given)
        (20, 1, 640, 1.0),  # 20-way 1-shot at ResNet-12's feature size
        (20, 5, 32, 1.0),  # 20-way 5-shot
        (5, 5, 64, 10.0),  # a weaker penalty
        (3, 2, 8, 0.1),  # a stronger one
    ],
)
def test_logistic_regression_equals_scikit_learn(ways: int, shots: int, d: int, C: float) -> None:
    """Probabilities, coefficients and intercepts of scikit-learn's lbfgs multinomial fit on the same L2-normalised
    support features (float64, both solved to tight tolerances)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    support, labels, query, ways = _episodes(100 * ways + 10 * shots + d, 3, ways, shots, 15, d)
    head = _head("logistic-regression", C=C, tol=1e-10)
    logits = head.head(support, labels, query, ways)
    assert head.pop_diagnostics() == {UNCONVERGED_KEY: 0.0}
    x, q = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    weights, bias, converged = fit_logistic_regression(x, labels, ways, C=C, tol=1e-10)
    assert bool(converged.all())
    for e in range(support.shape[0]):
        reference = linear_model.LogisticRegression(C=C, max_iter=10000, tol=1e-10).fit(x[e].numpy(), labels[e].numpy())
        expected = reference.predict_proba(q[e].numpy())
        np.testing.assert_allclose(torch.softmax(logits[e], -1).numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(weights[e].numpy(), reference.coef_, rtol=0, atol=1e-5)
        np.testing.assert_allclose(bias[e].numpy(), reference.intercept_, rtol=0, atol=1e-5)
        assert abs(float(bias[e].sum())) < 1e-12  # the intercepts sum to zero, as scikit-learn's do


def test_logistic_regression_in_float32_at_its_default_tolerance() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    support, labels, query, ways = _episodes(7, 4, 5, 5, 15, 640, dtype=torch.float32)
    head = LEARNERS.create("logistic-regression", backbone=torch.nn.Identity()).eval()
    probabilities = torch.softmax(head.head(support, labels, query, ways), -1)
    assert probabilities.dtype == torch.float32 and head.pop_diagnostics() == {UNCONVERGED_KEY: 0.0}
    x, q = F.normalize(support.double(), dim=-1).numpy(), F.normalize(query.double(), dim=-1).numpy()
    for e in range(support.shape[0]):
        reference = linear_model.LogisticRegression(max_iter=10000, tol=1e-10).fit(x[e], labels[e].numpy())
        np.testing.assert_allclose(probabilities[e].numpy(), reference.predict_proba(q[e]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("d", [4, 9])  # fewer and more features than the 6 support images
def test_logistic_regression_gradients_are_the_implicit_ones(d: int) -> None:
    """In training mode the logits reach the support and query embeddings; finite differences of the refitted
    solution agree."""
    support, labels, query, ways = _episodes(11 + d, 1, 3, 2, 2, d)
    head = _head("logistic-regression", C=2.0, tol=1e-12).train()
    inputs = (support.clone().requires_grad_(True), query.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda s, q: head.head(s, labels, q, ways), inputs, atol=1e-6, rtol=1e-4)


def test_logistic_regression_training_logits_equal_the_evaluation_ones() -> None:
    support, labels, query, ways = _episodes(5, 3, 5, 2, 4, 20)
    head = _head("logistic-regression", tol=1e-10)
    with torch.no_grad():
        evaluated = head.head(support, labels, query, ways)
    trained = head.train().head(support.clone().requires_grad_(True), labels, query, ways)
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), evaluated, rtol=0, atol=1e-9)


def test_logistic_regression_batch_equals_one_episode_at_a_time() -> None:
    support, labels, query, ways = _episodes(6, 5, 5, 3, 6, 40, dtype=torch.float32)
    head = LEARNERS.create("logistic-regression", backbone=torch.nn.Identity()).eval()
    batched = head.head(support, labels, query, ways)
    for e in range(support.shape[0]):
        single = head.head(support[e : e + 1], labels[e : e + 1], query[e : e + 1], ways)
        torch.testing.assert_close(single, batched[e : e + 1], rtol=1e-5, atol=1e-5)


def test_logistic_regression_reports_episodes_stopped_short() -> None:
    support, labels, query, ways = _episodes(8, 4, 5, 5, 3, 30)
    head = _head("logistic-regression", max_iter=1, tol=1e-10)
    head.head(support, labels, query, ways)
    assert head.pop_diagnostics() == {UNCONVERGED_KEY: 1.0}
    assert head.pop_diagnostics() == {}
    head.max_iter = 100
    head.head(support, labels, query, ways)
    assert head.pop_diagnostics() == {UNCONVERGED_KEY: 0.0}
    assert head.settings() == {"C": 1.0, "normalize": True, "solver": "newton-cg", "max_iter": 100, "tol": 1e-10}


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("logistic-regression", {"C": 0}, "C > 0"),
        ("logistic-regression", {"max_iter": 0}, "max_iter"),
        ("logistic-regression", {"tol": 2.0}, "tol"),
        ("logistic-regression", {"normalize": "yes"}, "normalize"),
        ("nearest-centroid", {"scale": -1.0}, "scale > 0"),
        ("nearest-centroid", {"normalize": 1}, "normalize"),
    ],
)
def test_bad_options_are_one_line_errors(name: str, options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment) as raised:
        LEARNERS.create(name, backbone=torch.nn.Identity(), **options)
    assert name in str(raised.value) and "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------ SLA, cached and uncached

SIZE = 16


@pytest.fixture(scope="module")
def split() -> Split:
    """A small split whose classes differ in colour and layout."""
    g = torch.Generator().manual_seed(0)
    classes, per_class = 6, 10
    base = torch.randint(0, 256, (classes, 1, SIZE, SIZE, 3), generator=g)
    noise = torch.randint(-40, 40, (classes, per_class, SIZE, SIZE, 3), generator=g)
    images = (base + noise).clamp(0, 255).to(torch.uint8).reshape(-1, SIZE, SIZE, 3)
    ids = [f"c{i // per_class}/{i % per_class:03d}" for i in range(classes * per_class)]
    return Split("test", images, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(6)], ids)


@pytest.fixture(scope="module")
def episodes(split: Split) -> EpisodeSet:
    return EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset="toy", split="test", spec=EpisodeSpec(4, 2, 3), count=12, seed=5
    )


def _model(method: str, objective: str, transform: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=8)
    learner = LEARNERS.create(method, backbone=backbone)
    obj = OBJECTIVES.create(objective, transform=transform, feature_dim=backbone.feature_dim(SIZE))
    learner.train()
    with torch.no_grad():  # BatchNorm running statistics other than the defaults
        for _ in range(3):
            backbone(torch.randn(16, 3, SIZE, SIZE) * 2 + 0.5)
    return learner.eval(), obj.eval()


@pytest.mark.parametrize("method", HEADS)
@pytest.mark.parametrize(("objective", "kinds"), [("sla", {"si", "ag"}), ("baseline", {"plain"})])
def test_predictions_with_the_feature_cache_equal_those_without(
    split: Split, episodes: EpisodeSet, method: str, objective: str, kinds: set[str]
) -> None:
    learner, obj = _model(method, objective, "rotation")
    pipeline = ImagePipeline(SIZE, SIZE)
    rows = episodes.rows_in(split, "toy")[:5]
    cache = FeatureCache(learner, obj, ImagesOf(split.images, pipeline.images), rows)
    with torch.no_grad():
        direct = obj.predict(learner, pipeline.episode(gather_episodes(split.images, rows, episodes.spec)))
        via_cache = obj.predict_copies(learner.head, cache.episode(rows, episodes.spec))
    assert set(direct) == set(via_cache) == kinds
    for kind in kinds:
        assert direct[kind].shape == (5, 4 * 3, 4)
        torch.testing.assert_close(via_cache[kind], direct[kind], rtol=1e-4, atol=1e-4)
    cached = evaluate(learner, obj, episodes, split, "toy", pipeline, batch_size=5, use_cache=True)
    plain = evaluate(learner, obj, episodes, split, "toy", pipeline, batch_size=5, use_cache=False)
    assert cached.cached and not plain.cached and set(cached.accuracies) == kinds
    for kind in kinds:
        np.testing.assert_array_equal(cached.accuracies[kind], plain.accuracies[kind])
    if method == "logistic-regression":
        assert cached.diagnostics == plain.diagnostics == {UNCONVERGED_KEY: 0.0}


# ------------------------------------------------------------------------------------------- recipes and the CLI


def test_the_heads_take_the_protonet_and_metaoptnet_recipes() -> None:
    for method, like in (("nearest-centroid", "protonet"), ("logistic-regression", "metaoptnet-ridge")):
        for dataset in ("miniimagenet", "synthetic"):
            resolved = apply_recipe(RunConfig(method=method, dataset=dataset)).to_dict()
            reference = apply_recipe(RunConfig(method=like, dataset=dataset)).to_dict()
            assert {**resolved, "method": like} == reference


TINY = ["--device", "cpu", "--quiet", "--train-episodes", "4", "--val-every", "2", "--val-episodes", "6"]
TINY += ["--eval-episodes", "10", "--queries", "3", "--train-queries", "3", "--backbone-option", "hidden=8"]
TINY += ["--image-size", "16"]


@pytest.mark.parametrize(("method", "setting"), [("nearest-centroid", "scale"), ("logistic-regression", "tol")])
def test_a_run_trains_and_tests_each_head(data_root: Path, tmp_path: Path, method: str, setting: str) -> None:
    out = tmp_path / "run"
    code = main(["--data-root", str(data_root), "run", "--method", method, "--dataset", "synthetic", *TINY,
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and setting in results["learner_settings"]
    evaluation = results["evaluation"]
    assert set(evaluation["accuracy"]) == {"si", "ag"}  # the synthetic set's default objective: SLA
    assert 0 <= evaluation["accuracy"][evaluation["headline"]]["mean"] <= 100
    if method == "logistic-regression":
        assert evaluation["diagnostics"] == {UNCONVERGED_KEY: 0.0}
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(UNCONVERGED_KEY in step for step in steps if step["kind"] == "train")
