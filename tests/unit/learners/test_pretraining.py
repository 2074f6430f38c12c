"""The pretraining regime: shuffled image batches over every training class, the ``pretrain`` learner's classifiers
(SLA's joint labels as hankook/SLA's trainer computes them, Baseline++'s cosine classifier), its evaluation heads,
and whole runs: trained, resumed bit for bit, refused in one line, paired with an episodic run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewshot_sla.cli import main
from fewshot_sla.episodes import EpisodeBatch
from fewshot_sla.episodes.image_batches import ImageBatchSampler
from fewshot_sla.errors import UserError
from fewshot_sla.learners.logistic_regression import LogisticRegressionHead
from fewshot_sla.learners.nearest_centroid import NearestCentroid
from fewshot_sla.learners.pretrain import CosineClassifier, Pretrain
from fewshot_sla.registry import BACKBONES, OBJECTIVES
from tests.integration.reliability.test_resume import FLAGS as RESUME_FLAGS
from tests.integration.reliability.test_resume import assert_same_run
from tests.unit.episodes.test_episodes import make_split, reorder

# ----- the sampler -----


def ids_of(split, batch: EpisodeBatch) -> list[str]:
    return [split.image_ids[i] for i in batch.query_index.view(-1).tolist()]


def test_each_epoch_shows_every_image_once_and_batches_run_across_epochs() -> None:
    split = make_split([3, 5, 4, 8])  # 20 images
    sampler = ImageBatchSampler(split, seed=3)
    seen = [ids_of(split, sampler.sample(7)) for _ in range(6)]  # 42 images: two epochs and 2 of the third
    flat = [i for batch in seen for i in batch]
    assert [len(b) for b in seen] == [7] * 6
    assert sorted(flat[:20]) == sorted(split.image_ids) == sorted(flat[20:40])
    assert flat[:20] != flat[20:40]  # a fresh order each epoch
    assert sampler.state_dict() == {"position": 42}


def test_labels_are_the_class_index_among_the_sorted_class_names_and_images_match_their_rows() -> None:
    split = reorder(make_split([4, 6, 5]), seed=1)  # class list out of alphabetical order
    batch = ImageBatchSampler(split, seed=0).sample(15)
    assert batch.ways == 3 and batch.support.shape[:2] == (15, 0) and batch.query.shape[:2] == (15, 1)
    rank = {name: i for i, name in enumerate(sorted(split.class_names))}
    rows = batch.query_index.view(-1)
    expected = [rank[split.class_names[int(split.labels[r])]] for r in rows]
    assert batch.query_labels.view(-1).tolist() == expected
    torch.testing.assert_close(batch.query[:, 0], split.images[rows].permute(0, 3, 1, 2))


def test_the_batches_name_the_same_images_in_any_row_order_of_the_store() -> None:
    split = make_split([6, 7, 5])
    a, b = ImageBatchSampler(split, seed=5), ImageBatchSampler(reorder(split, seed=2), seed=5)
    other = reorder(split, seed=2)
    for _ in range(4):
        assert ids_of(split, a.sample(5)) == ids_of(other, b.sample(5))


def test_a_sampler_restored_from_its_state_continues_with_the_same_images() -> None:
    split = make_split([6, 7, 5])
    first = ImageBatchSampler(split, seed=1)
    first.sample(4)
    state = first.state_dict()
    later = [ids_of(split, first.sample(11)) for _ in range(3)]
    again = ImageBatchSampler(split, seed=1)
    again.load_state_dict(state)
    assert [ids_of(split, again.sample(11)) for _ in range(3)] == later


# ----- the learner -----


def small_learner(**options) -> Pretrain:
    torch.manual_seed(0)
    return Pretrain(BACKBONES.create("conv4", hidden=8), **options).double()


def image_batch(b: int = 6, classes: int = 5, size: int = 16) -> EpisodeBatch:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, 1, 3, size, size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (b, 1), generator=g)
    empty = torch.empty(b, 0, dtype=torch.int64)
    return EpisodeBatch(query[:, :0], empty, query, labels, classes, empty, torch.arange(b).unsqueeze(1))


def test_the_sla_loss_is_hankook_slas_joint_label_cross_entropy() -> None:
    """The reference trainer: the 4 rotations of each image stacked sample-major, one forward, cross-entropy against
    y*4 + j over all C*4 joint classes."""
    learner, batch = small_learner(), image_batch()
    features = learner.backbone.feature_dim(16)
    objective = OBJECTIVES.create("sla", transform="rotation", feature_dim=features).double()
    for width in objective.training_ways(batch.ways):
        learner.add_classifier(features, width)
    learner.train()
    loss, _ = objective.loss(learner, batch)

    images, labels = batch.query[:, 0], batch.query_labels[:, 0]
    rotated = torch.stack([torch.rot90(images, k, (2, 3)) for k in range(4)], 1).view(-1, *images.shape[1:])
    joint = torch.stack([labels * 4 + k for k in range(4)], 1).view(-1)
    linear = learner.classifiers[str(batch.ways * 4)]
    expected = F.cross_entropy(linear(learner.backbone(rotated)), joint)
    torch.testing.assert_close(loss, expected)
    assert list(learner.classifiers) == ["20"]  # SLA alone trains the joint classifier only


def test_self_distillation_trains_a_joint_and_a_plain_classifier() -> None:
    learner, batch = small_learner(), image_batch()
    features = learner.backbone.feature_dim(16)
    objective = OBJECTIVES.create("sla+sd", transform="rotation", feature_dim=features).double()
    for width in objective.training_ways(batch.ways):
        learner.add_classifier(features, width)
    loss, _ = objective.loss(learner.train(), batch)
    loss.backward()
    assert sorted(int(k) for k in learner.classifiers) == [5, 20]
    for key, classifier in learner.classifiers.items():
        assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0, key


def test_the_cosine_classifier_is_closer_looks_dist_linear() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(7, 5).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    with torch.no_grad():  # a learnt per-class norm different from the initial one
        head.linear.parametrizations.weight.original0.mul_(torch.linspace(0.5, 2.0, 5, dtype=torch.float64)[:, None])
    g = head.linear.parametrizations.weight.original0.view(-1)
    v = head.linear.parametrizations.weight.original1
    expected = torch.empty(4, 5, dtype=torch.float64)
    for i in range(4):
        for c in range(5):
            expected[i, c] = 2.0 * g[c] * torch.dot(x[i] / (x[i].norm() + 1e-5), v[c] / v[c].norm())
    torch.testing.assert_close(head(x), expected)
    assert CosineClassifier(7, 200).scale == 2.0 and CosineClassifier(7, 201).scale == 10.0
    assert CosineClassifier(7, 5, scale=4.0).scale == 4.0


@pytest.mark.parametrize(("name", "reference"), [("nearest-centroid", NearestCentroid), ("logistic-regression", None)])
def test_episodes_are_classified_by_the_evaluation_head_on_the_embeddings(name, reference) -> None:
    learner = small_learner(eval_head=name).eval()
    g = torch.Generator().manual_seed(1)
    support = torch.randn(2, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    query = torch.randn(2, 4, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    with torch.no_grad():
        logits = learner(support, labels, query, 3)
        head = (reference or LogisticRegressionHead)(torch.nn.Identity())
        s = learner.backbone(support.flatten(0, 1)).view(2, 6, -1)
        q = learner.backbone(query.flatten(0, 1)).view(2, 4, -1)
        torch.testing.assert_close(logits, head.head(s, labels, q, 3))
    assert learner.settings()["eval_head"] == name


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"classifier": "softmax"}, "classifier must be one of linear, cosine"),
        ({"eval_head": "maml"}, "eval_head must be one of"),
        ({"scale": -1}, "scale must be a number > 0"),
    ],
)
def test_bad_options_are_one_line(options, expected) -> None:
    with pytest.raises(UserError, match=expected):
        small_learner(**options)


def test_a_training_width_without_a_classifier_is_refused() -> None:
    learner, batch = small_learner(), image_batch()
    with pytest.raises(UserError, match="no 5-way classifier"):
        learner.train()(batch.support, batch.support_labels, batch.query, batch.ways)


# ----- whole runs -----

# The resume tests' run as a pretraining one: 4 steps of 24 images instead of 2 episodes, no training queries.
FLAGS = ["--method", "pretrain", *RESUME_FLAGS]
FLAGS[FLAGS.index("--train-episodes") + 1 : FLAGS.index("--train-episodes") + 2] = ["96"]
FLAGS[FLAGS.index("--meta-batch") + 1] = "24"
FLAGS[FLAGS.index("--val-every") + 1] = "48"
del FLAGS[FLAGS.index("--train-queries") : FLAGS.index("--train-queries") + 2]


def run(data_root: Path, out: Path, *extra: str) -> int:
    return main(["--data-root", str(data_root), "run", *FLAGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def pretrained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "run"
    assert run(data_root, out) == 0
    return out


def test_a_pretraining_run_records_its_regime(pretrained: Path) -> None:
    results = json.loads((pretrained / "results.json").read_text())
    train = results["train"]
    assert (train["ways"], train["shots"], train["queries"]) == (64, 0, 1)  # every synthetic training class
    assert train["episodes"] == 96 and train["steps"] == 4 and train["meta_batch"] == 24
    assert results["learner_settings"]["classifier_widths"] == [64, 256]  # plain and joint (x4 rotations)
    assert set(results["evaluation"]["accuracy"]) == {"si", "ag", "sd"}
    assert results["evaluation"]["episode_set"]["ways"] == 5  # tested on 5-way episodes of novel classes


def test_a_pretraining_run_resumed_after_a_kill_equals_an_uninterrupted_one(
    data_root: Path, pretrained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert run(data_root, out, "--max-steps", "1") == 0
    saved = tmp_path / "last-at-step-1.pt"
    shutil.copy(out / "checkpoints" / "last.pt", saved)
    assert run(data_root, out, "--max-steps", "3", "--resume") == 0
    # killed during step 4: the checkpoint is step 1's, the metrics hold steps 2 and 3
    shutil.copy(saved, out / "checkpoints" / "last.pt")
    assert run(data_root, out, "--resume") == 0
    assert_same_run(pretrained, out)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--train-ways", "5"],
            "the pretraining regime classifies among all 64 training classes of 'synthetic', but --train-ways is 5; "
            "leave it unset",
        ),
        (
            ["--train-shots", "5"],
            "the pretraining regime trains on batches of single images (--meta-batch per step), not on episodes, so "
            "--train-shots means nothing there; leave it unset",
        ),
    ],
    ids=["train-ways", "train-shots"],
)
def test_episode_settings_that_pretraining_cannot_honour_are_one_line(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], expected: str
) -> None:
    assert run(data_root, tmp_path / "run", *flags) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"fewshot-sla: error: {expected}"]
    assert not (tmp_path / "run").exists()


def test_compare_pairs_a_pretrained_run_with_an_episodic_one(
    data_root: Path, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    episodic = tmp_path / "protonet"
    flags = [f for f in FLAGS if f not in ("pretrain",)]
    flags[flags.index("--method") + 1 : flags.index("--method") + 1] = ["protonet"]
    flags[flags.index("--train-episodes") + 1] = "8"
    flags[flags.index("--meta-batch") + 1] = "2"
    flags[flags.index("--val-every") + 1] = "4"
    assert main(["--data-root", str(data_root), "run", *flags, "--out", str(episodic)]) == 0
    capsys.readouterr()
    assert main(["--data-root", str(data_root), "compare", str(pretrained), str(episodic)]) == 0
    out = capsys.readouterr().out
    assert "16 paired test episodes" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  SLA+")]
    assert [row[:2] for row in rows] == [["SLA+SI", "SLA+SI"], ["SLA+AG", "SLA+AG"], ["SLA+SD", "SLA+SD"]]


def test_eval_tests_a_pretrained_embedding_with_another_head_into_a_copy(
    data_root: Path, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (pretrained / "results.json").read_bytes()
    copy = tmp_path / "logistic"
    args = ["--data-root", str(data_root), "eval", str(pretrained), "--eval-head", "logistic-regression", "--quiet"]
    assert main([*args, "--out", str(copy)]) == 0
    assert (pretrained / "results.json").read_bytes() == before  # the run is untouched
    results = json.loads((copy / "results.json").read_text())
    assert results["config"]["learner_options"]["eval_head"] == "logistic-regression"
    assert results["learner_settings"]["eval_head"] == "logistic-regression"
    assert results["learner_settings"]["eval_settings"]["C"] == 1.0
    assert main([*args, "--out", str(copy), "--eval-episodes", "8"]) == 0  # the copy takes further evaluations
    capsys.readouterr()
    assert main(["--data-root", str(data_root), "compare", str(pretrained), str(copy)]) == 0
    assert "16 paired test episodes" in capsys.readouterr().out


def test_another_head_needs_a_copy_and_a_pretraining_run(
    data_root: Path, pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--data-root", str(data_root), "eval", str(pretrained), "--eval-head"]
    assert main([*args, "protonet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fewshot-sla: error: the results of {pretrained} describe its own evaluation head, nearest-centroid; write "
        "this one elsewhere with --out DIR (a copy of the run's results naming the head)"
    ]
    assert main([*args, "svm", "--out", str(tmp_path / "x")]) == 2
    assert "--eval-head must be one of nearest-centroid, logistic-regression, protonet, got 'svm'" in (
        capsys.readouterr().err
    )
