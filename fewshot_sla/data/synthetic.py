"""The synthetic dataset: procedurally generated few-shot classes, no download, built in seconds.

Each class is a fixed composition of four coloured shapes (discs, rings, bars, boxes, triangles, domes,
crosses) with a class-specific layout; classes come in families of four that share two of their parts,
as sibling species share traits. Like objects under gravity, parts stand near upright, larger parts sit
lower and the background is usually darker at the bottom, so images have a canonical upright orientation
(predicting a rotation is learnable, as on natural images). Instances vary in pose (rotation within
+-17 degrees, shift, scale), per-part placement, size, angle and colour, may lose a part, carry three
random distractor shapes (one behind, two in front), and get brightness jitter and pixel noise.
Class ``c`` (named ``synthetic_{c:03d}``) is drawn from its own seed streams, so any subset of classes
renders identically to the full set; classes 0-63 are train, 64-79 val, 80-99 test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fewshot_sla.data.importers.common import RawSplit, rows_of
from fewshot_sla.data.store import SPLIT_NAMES

SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 150
IMAGE_SIZE = 32
GENERATOR_VERSION = 1
PARTS = 4
MAX_TILT = 0.3  # radians of pose rotation either way (about 17 degrees)
FAMILY, SHARED = 4, 2  # classes 4f..4f+3 share 2 of their 4 parts, as sibling species share traits
BEHIND, FRONT = 1, 2  # random distractor shapes drawn behind / in front of the class's parts
DROP = 0.2  # chance that an image lacks one given part of its class

# Ten colours the shapes are painted in (RGB in [0, 1]).
PALETTE = np.array(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.65, 0.15],
        [0.15, 0.25, 0.90],
        [0.95, 0.80, 0.10],
        [0.60, 0.15, 0.75],
        [0.05, 0.75, 0.80],
        [0.95, 0.50, 0.05],
        [0.10, 0.10, 0.10],
        [0.95, 0.95, 0.95],
        [0.55, 0.30, 0.10],
    ],
    dtype=np.float32,
)


def class_name(index: int) -> str:
    """The name of synthetic class ``index``."""
    return f"synthetic_{index:03d}"


def _box(ux: np.ndarray, uy: np.ndarray, bx: float, by: float) -> np.ndarray:
    dx, dy = np.abs(ux) - bx, np.abs(uy) - by
    outside = np.sqrt(np.maximum(dx, 0) ** 2 + np.maximum(dy, 0) ** 2)
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _disc(ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    return np.sqrt(ux * ux + uy * uy) - 1


def _triangle(ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    s = np.float32(0.8660254)  # sin(60 degrees)
    return np.maximum(np.maximum(uy, -s * ux - 0.5 * uy), s * ux - 0.5 * uy) - 0.45


# Signed distance of each shape in its own unit frame (negative inside), by shape number.
_SHAPES = (
    _disc,
    lambda ux, uy: np.abs(_disc(ux, uy) + 0.3) - 0.3,  # ring
    lambda ux, uy: _box(ux, uy, 1.0, 0.28),  # bar
    lambda ux, uy: _box(ux, uy, 0.75, 0.75),  # box
    _triangle,  # apex up
    lambda ux, uy: np.maximum(_disc(ux, uy), uy),  # dome (upper half disc)
    lambda ux, uy: np.minimum(_box(ux, uy, 1.0, 0.25), _box(ux, uy, 0.25, 1.0)),  # cross
)


def _parts(
    rng: np.random.Generator, shape: tuple[int, ...], spread: float, sizes: tuple[float, float], tilt: float | None
) -> dict:
    """Random shapes: kind, centre within +-spread, size, orientation (near upright when ``tilt`` is given,
    as its standard deviation; else any) and a palette colour each."""
    return {
        "kind": rng.integers(0, len(_SHAPES), shape),
        "centre": rng.uniform(-spread, spread, (*shape, 2)),
        "size": rng.uniform(*sizes, shape),
        "angle": rng.uniform(0, 2 * np.pi, shape) if tilt is None else rng.normal(0, tilt, shape),
        "colour": PALETTE[rng.integers(0, len(PALETTE), shape)],
    }


def _recipe(seed: int, index: int) -> dict[str, np.ndarray]:
    """The layout of class ``index``: SHARED parts common to its family, the rest its own.

    Like objects under gravity, parts stand near upright and the larger ones sit lower, so orientation
    cues are shared across classes (a rotation is recognisable on classes never seen).
    """
    family, own = (
        _parts(np.random.default_rng(np.random.SeedSequence(key)), (PARTS,), 0.55, (0.18, 0.38), tilt=0.35)
        for key in ([seed, 0, index // FAMILY], [seed, 1, index])
    )
    recipe = {k: np.concatenate([family[k][:SHARED], own[k][SHARED:]]) for k in family}
    recipe["centre"][np.argsort(recipe["size"]), 1] = np.sort(recipe["centre"][:, 1])
    return recipe


def _class_parameters(seed: int, index: int, count: int, image_size: int) -> dict[str, np.ndarray]:
    """Every random number ``count`` images of class ``index`` need, drawn from the class's own streams."""
    recipe = _recipe(seed, index)
    r = np.random.default_rng(np.random.SeedSequence([seed, 2, index]))
    n = count
    # Drawing order (slots): distractors behind, the class's parts (jittered, maybe dropped), distractors in front.
    behind = _parts(r, (n, BEHIND), 0.8, (0.1, 0.22), tilt=None)
    front = _parts(r, (n, FRONT), 0.8, (0.06, 0.14), tilt=None)
    parts = {
        "kind": np.broadcast_to(recipe["kind"], (n, PARTS)),
        "centre": recipe["centre"] + r.normal(0, 0.07, (n, PARTS, 2)),
        "size": recipe["size"] * r.uniform(0.85, 1.15, (n, PARTS)),
        "angle": recipe["angle"] + r.normal(0, 0.2, (n, PARTS)),
        "colour": recipe["colour"] + r.normal(0, 0.1, (n, PARTS, 3)),
    }
    slots = {k: np.concatenate([behind[k], parts[k], front[k]], axis=1) for k in parts}
    alive = np.concatenate([np.ones((n, BEHIND)), r.random((n, PARTS)) > DROP, np.ones((n, FRONT))], axis=1)
    top = r.uniform(0.55, 0.95, (n, 3))
    return {
        **slots,
        "alive": alive,
        "tilt": r.uniform(-MAX_TILT, MAX_TILT, n),
        "scale": r.uniform(0.8, 1.2, n),
        "shift": r.uniform(-0.15, 0.15, (n, 2)),
        "top": top,
        "bottom": top * r.uniform(0.45, 1.0, (n, 1)),  # usually darker below, as on natural images
        "gain": r.uniform(0.8, 1.2, n),
        # Pixel noise, uniform with a per-image standard deviation in [0.03, 0.08] (cheaper than Gaussian).
        "noise": (r.uniform(0.03, 0.08, (n, 1, 1, 1)) * np.sqrt(3)).astype(np.float32)
        * (2 * r.random((n, 3, image_size, image_size), dtype=np.float32) - 1),
    }


def _render(p: dict[str, np.ndarray], image_size: int) -> np.ndarray:
    """Rasterise images from their parameters (float32 numpy, small batches stay in cache): uint8 ``[n, S, S, 3]``."""
    pixel = np.float32(2.0 / image_size)
    axis = (np.arange(image_size, dtype=np.float32) + 0.5) * pixel - 1
    qx, qy = axis[None, None, :], axis[None, :, None]  # y grows downwards: row 0 is the top

    def frame(turn: np.ndarray, zoom: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u, v) = zoom * R(-turn) q + (dx, dy) of every pixel q, per image ([n] parameters)."""
        a, b = (zoom * np.cos(turn))[:, None, None], (zoom * np.sin(turn))[:, None, None]
        return (a * qx + dx[:, None, None]) + b * qy, (a * qy + dy[:, None, None]) - b * qx

    tilt, scale, (tx, ty) = p["tilt"], p["scale"], p["shift"].T
    cos, sin = np.cos(tilt), np.sin(tilt)
    # Canonical height of every pixel (pose undone), for the lighter-at-the-top background.
    _, height = frame(tilt, 1 / scale, -(cos * tx + sin * ty) / scale, (sin * tx - cos * ty) / scale)
    ramp = np.clip((height + 1) / 2, 0, 1)[:, None]
    image = p["top"][:, :, None, None] + (p["bottom"] - p["top"])[:, :, None, None] * ramp
    for slot in range(p["kind"].shape[1]):
        size, angle, (mx, my) = p["size"][:, slot], p["angle"][:, slot], p["centre"][:, slot].T
        turn, zoom = tilt + angle, 1 / (scale * size)
        # Pixel -> shape frame: undo the pose, then the part's placement, rotation and size.
        ux, uy = frame(
            turn,
            zoom,
            -zoom * (np.cos(turn) * tx + np.sin(turn) * ty) - (np.cos(angle) * mx + np.sin(angle) * my) / size,
            zoom * (np.sin(turn) * tx - np.cos(turn) * ty) - (-np.sin(angle) * mx + np.cos(angle) * my) / size,
        )
        kinds = p["kind"][:, slot].astype(np.int64)
        numbers = np.unique(kinds)
        if len(numbers) == 1:
            distance = _SHAPES[numbers[0]](ux, uy)
        else:
            distance = np.empty_like(ux)
            for number in numbers:
                rows = kinds == number
                distance[rows] = _SHAPES[number](ux[rows], uy[rows])
        # Anti-aliased coverage: one pixel of soft edge, measured in image units; a dropped part covers nothing.
        distance *= (-size * scale / pixel)[:, None, None]
        cover = np.minimum(np.maximum(distance + 0.5, 0, out=distance), 1, out=distance)
        cover[p["alive"][:, slot] == 0] = 0
        cover = cover[:, None]
        paint = p["colour"][:, slot, :, None, None] - image
        paint *= cover
        image += paint
    image = image * p["gain"][:, None, None, None] + p["noise"]
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def render_classes(
    classes: list[int], seed: int = 0, images_per_class: int = IMAGES_PER_CLASS, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Images of the given synthetic classes, class by class: uint8 ``[len(classes) * images_per_class, S, S, 3]``."""

    def render(index: int) -> np.ndarray:
        params = _class_parameters(seed, index, images_per_class, image_size)
        return _render({k: v.astype(np.float32) for k, v in params.items()}, image_size)

    # numpy releases the GIL in array arithmetic, so classes render in parallel on threads.
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        return np.concatenate(list(pool.map(render, classes)))


def generator_identity() -> str:
    """Everything besides seed and image size that decides the content (part of the store's re-run key)."""
    return f"synthetic-v{GENERATOR_VERSION}-{IMAGES_PER_CLASS}-per-class-{SPLIT_CLASSES}"


def synthetic_splits(seed: int = 0, image_size: int = IMAGE_SIZE) -> Iterator[tuple[str, RawSplit]]:
    """The full synthetic dataset as ``(split, RawSplit)`` pairs, the form ``prepare`` writes to a store."""
    first = 0
    for split in SPLIT_NAMES:
        classes = list(range(first, first + SPLIT_CLASSES[split]))
        first += len(classes)
        images = render_classes(classes, seed, IMAGES_PER_CLASS, image_size)
        names = [class_name(c) for c in classes]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), IMAGES_PER_CLASS)
        ids = [f"{name}/{i:04d}" for name in names for i in range(IMAGES_PER_CLASS)]
        yield split, RawSplit(names, labels, ids, load=rows_of(images))
