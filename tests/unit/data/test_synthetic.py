"""The synthetic dataset: deterministic under its seed, the right shapes, learnable classes and orientation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fewshot_sla.data.synthetic import IMAGES_PER_CLASS, SPLIT_CLASSES, render_classes, synthetic_splits


@pytest.fixture(scope="module")
def full() -> dict:
    started = time.perf_counter()
    splits = {split: raw for split, raw in synthetic_splits(seed=0)}
    images = {split: np.stack([raw.load(i) for i in range(len(raw.labels))]) for split, raw in splits.items()}
    print(f"\ngenerated the synthetic dataset (15000 images) in {time.perf_counter() - started:.1f} s")
    return {"splits": splits, "images": images}


def test_shapes_counts_names_and_ids(full: dict) -> None:
    assert SPLIT_CLASSES == {"train": 64, "val": 16, "test": 20} and IMAGES_PER_CLASS >= 100
    first = 0
    for split, raw in full["splits"].items():
        n = SPLIT_CLASSES[split]
        assert raw.class_names == [f"synthetic_{c:03d}" for c in range(first, first + n)]
        first += n
        images = full["images"][split]
        assert images.shape == (n * IMAGES_PER_CLASS, 32, 32, 3) and images.dtype == np.uint8
        assert np.bincount(raw.labels).tolist() == [IMAGES_PER_CLASS] * n
        assert len(set(raw.image_ids)) == len(raw.image_ids)
        assert all(i.startswith(raw.class_names[y] + "/") for i, y in zip(raw.image_ids, raw.labels))


def test_same_seed_same_images_and_classes_render_independently_of_each_other() -> None:
    a = render_classes([3, 70], seed=0, images_per_class=20)
    assert np.array_equal(a, render_classes([3, 70], seed=0, images_per_class=20))
    assert np.array_equal(a[20:], render_classes([70], seed=0, images_per_class=20))
    assert not np.array_equal(a, render_classes([3, 70], seed=1, images_per_class=20))


def test_full_set_matches_rendering_its_classes_directly(full: dict) -> None:
    assert np.array_equal(full["images"]["val"][:IMAGES_PER_CLASS], render_classes([64], seed=0))


def test_instances_of_a_class_differ() -> None:
    images = render_classes([5], images_per_class=30).astype(np.float64)
    assert len({im.tobytes() for im in images.astype(np.uint8)}) == 30
    assert images.std(axis=0).mean() > 10  # pose, colour and noise vary from image to image


def _nearest_centroid(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of a nearest-class-mean classifier on raw pixels (an independent, model-free baseline)."""
    train, test = train.reshape(len(train), -1).astype(np.float64), test.reshape(len(test), -1).astype(np.float64)
    classes = np.unique(train_y)
    centroids = np.stack([train[train_y == c].mean(0) for c in classes])
    distances = ((test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distances.argmin(1)] == test_y).mean())


def test_classes_are_distinguishable_from_pixels() -> None:
    classes, per_class = list(range(80, 90)), 60
    images = render_classes(classes, images_per_class=per_class).reshape(len(classes), per_class, 32, 32, 3)
    labels = np.repeat(np.arange(len(classes))[:, None], per_class, axis=1)
    accuracy = _nearest_centroid(
        images[:, :40].reshape(-1, 32, 32, 3),
        labels[:, :40].ravel(),
        images[:, 40:].reshape(-1, 32, 32, 3),
        labels[:, 40:].ravel(),
    )
    print(f"\n10-way nearest centroid on pixels: {accuracy:.2f} (chance 0.10)")
    assert accuracy > 0.3


def test_one_shot_pixel_matching_is_far_from_perfect_but_above_chance() -> None:
    """5-way 1-shot episodes with raw-pixel nearest neighbour: the task is neither trivial nor impossible."""
    rng = np.random.default_rng(0)
    images = render_classes(list(range(80, 100)), images_per_class=40).reshape(20, 40, -1).astype(np.float64)
    hits = []
    for _ in range(200):
        classes = rng.choice(20, 5, replace=False)
        picks = np.stack([rng.choice(40, 6, replace=False) for _ in classes])
        support = images[classes, picks[:, 0]]
        query = images[classes[:, None], picks[:, 1:]].reshape(25, -1)
        predicted = ((query[:, None] - support[None]) ** 2).sum(-1).argmin(1)
        hits.append((predicted == np.repeat(np.arange(5), 5)).mean())
    accuracy = float(np.mean(hits))
    print(f"\n5-way 1-shot pixel nearest neighbour: {accuracy:.2f} (chance 0.20)")
    assert 0.25 < accuracy < 0.8


def test_rotated_images_are_distinguishable_from_upright_ones() -> None:
    """A nearest-centroid rotation classifier on pixels beats chance: the set has a canonical orientation."""
    images = render_classes(list(range(0, 100, 5)), images_per_class=20).reshape(-1, 32, 32, 3)
    rotated = np.stack([np.rot90(images, k, axes=(1, 2)) for k in range(4)])  # [4, N, 32, 32, 3]
    half = images.shape[0] // 2
    labels = np.repeat(np.arange(4)[:, None], images.shape[0], axis=1)
    accuracy = _nearest_centroid(
        rotated[:, :half].reshape(-1, 32, 32, 3),
        labels[:, :half].ravel(),
        rotated[:, half:].reshape(-1, 32, 32, 3),
        labels[:, half:].ravel(),
    )
    print(f"\n4-way rotation nearest centroid on pixels: {accuracy:.2f} (chance 0.25)")
    assert accuracy > 0.5


def _brute_force(params: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Pixel by pixel: undo the pose, then the part's placement; a bar's distance sets its coverage."""
    out = np.zeros((len(params["tilt"]), size, size, 3))
    pixel = 2 / size

    def turn(angle: float, x: float, y: float) -> tuple[float, float]:  # rotate by -angle
        return np.cos(angle) * x + np.sin(angle) * y, -np.sin(angle) * x + np.cos(angle) * y

    for n in range(len(out)):
        for row in range(size):
            for col in range(size):
                qx, qy = (col + 0.5) * pixel - 1, (row + 0.5) * pixel - 1
                cx, cy = turn(params["tilt"][n], qx - params["shift"][n, 0], qy - params["shift"][n, 1])
                cx, cy = cx / params["scale"][n], cy / params["scale"][n]
                ramp = min(max((cy + 1) / 2, 0), 1)
                colour = params["top"][n] + (params["bottom"][n] - params["top"][n]) * ramp
                r = params["size"][n, 0]
                ux, uy = turn(params["angle"][n, 0], cx - params["centre"][n, 0, 0], cy - params["centre"][n, 0, 1])
                dx, dy = abs(ux / r) - 1.0, abs(uy / r) - 0.28  # the bar: a 2 x 0.56 box in its unit frame
                distance = np.hypot(max(dx, 0), max(dy, 0)) + min(max(dx, dy), 0)
                cover = min(max(0.5 - distance * r * params["scale"][n] / pixel, 0), 1)
                out[n, row, col] = colour * (1 - cover) + params["colour"][n, 0] * cover
    return np.rint(np.clip(out, 0, 1) * 255)


def test_rendering_matches_a_pixel_by_pixel_reference() -> None:
    from fewshot_sla.data.synthetic import _SHAPES, _render

    rng = np.random.default_rng(7)
    n, size = 3, 16
    params = {
        "kind": np.full((n, 1), 2.0),  # the bar: anisotropic, so rotations show
        "centre": rng.uniform(-0.4, 0.4, (n, 1, 2)),
        "size": rng.uniform(0.3, 0.5, (n, 1)),
        "angle": rng.uniform(-1, 1, (n, 1)),
        "colour": rng.uniform(0, 1, (n, 1, 3)),
        "alive": np.ones((n, 1)),
        "tilt": rng.uniform(-0.3, 0.3, n),
        "scale": rng.uniform(0.8, 1.2, n),
        "shift": rng.uniform(-0.15, 0.15, (n, 2)),
        "top": rng.uniform(0.5, 1, (n, 3)),
        "bottom": rng.uniform(0, 0.5, (n, 3)),
        "gain": np.ones(n),
        "noise": np.zeros((n, 3, size, size)),
    }
    assert _SHAPES[2](np.float32([1.0]), np.float32([0.0]))[0] == 0  # shape 2 is the bar of half-length 1
    rendered = _render({k: v.astype(np.float32) for k, v in params.items()}, size)
    assert np.abs(rendered.astype(np.int64) - _brute_force(params, size)).max() <= 1
