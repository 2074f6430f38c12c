"""A map-style torch ``Dataset`` of ``(image, label)`` items as a dataset of the user's own images (``--layout torch``).

``data prepare NAME --layout torch --source MODULE:FACTORY`` imports ``MODULE`` (found on ``sys.path``, the current
folder first) and calls ``FACTORY()`` for the dataset; ``fewshot_sla.api.prepare_torch_dataset`` takes the dataset
object itself. Every item's first element is the image: a PIL image, a uint8 ``[H, W]`` / ``[H, W, C]`` array, or a
``[C, H, W]`` tensor (uint8, or float in [0, 1] as ``ToTensor`` gives); the second its integer label. A class is
named by ``dataset.classes[label]`` when the dataset lists its classes (torchvision's do), else by the label; an
image by its index in the dataset. Labels are read from ``dataset.targets`` when it has them, else from every item.
Images are stored as RGB, as for image folders. From here on it is a collection like an image folder's: split by
classes (seeded fractions, or a split file naming the classes), resized and stored (``imagefolder.read_splits``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import BadImage, RawSplit, stack_split
from fewshot_sla.data.importers.imagefolder import MIN_CLASSES, SPLIT_NAMES
from fewshot_sla.errors import UserError, setting

LAYOUT = "torch"


def load_factory(spec: str) -> Any:
    """The dataset ``MODULE:FACTORY()`` returns; a bad spec, a missing module or a failing call is one line."""
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise UserError(
            f"{setting('layout')} torch needs {setting('source')} MODULE:FACTORY (a function returning the dataset), "
            f"got {spec!r}"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current folder, as `python -m` has it
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"cannot import {module_name} for {setting('source')} {spec}: {err}; check the module name"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no function {factory_name} for {setting('source')} {spec}; check the name")
    try:
        return factory()
    except Exception as err:
        raise UserError(f"{spec}() failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None


def to_image(item: Any, index: int) -> np.ndarray:
    """A dataset item's image as RGB uint8 ``[H, W, 3]``; anything else is ``BadImage``."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    where = f"item {index}"
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # a torch tensor [C, H, W]
        array = image.detach().cpu().numpy()
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise BadImage(where, f"a tensor image must be [C, H, W] with C = 1 or 3, got {list(array.shape)}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
                raise BadImage(where, "a float tensor image must hold values in [0, 1] (as ToTensor gives)")
            array = np.rint(array * 255).astype(np.uint8)
        image = array.transpose(1, 2, 0)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        planes = image if image.ndim == 3 else image[:, :, None]
        if planes.shape[2] == 1:
            return np.repeat(planes, 3, axis=2)
        if planes.shape[2] == 3:
            return np.ascontiguousarray(planes)
    raise BadImage(where, f"its image is a {type(image).__name__}; give a PIL image, a uint8 array or a tensor")


@dataclass(frozen=True)
class DatasetCollection:
    """A torch dataset's images by class: ``indices[class]`` the dataset indices of that class, in order."""

    dataset: Any
    indices: dict[str, list[int]]
    source: str
    identifier: Callable[[int], str]  # an item's identifier in the store

    @property
    def classes(self) -> list[str]:
        """The class names, sorted."""
        return sorted(self.indices)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` of the dataset as RGB uint8."""
        try:
            item = self.dataset[index]
        except Exception as err:
            raise BadImage(f"item {index}", f"reading it failed: {type(err).__name__}: {err}") from None
        return to_image(item, index)


def collect(dataset: Any, source: str, identifier: Callable[[int], str] | None = None) -> DatasetCollection:
    """Group a map-style dataset's indices by class; a dataset that is not one is one line. ``identifier``: an
    item's identifier (default: its index, zero-padded)."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise UserError(f"{source} is a {type(dataset).__name__}, not a map-style dataset (with __len__, __getitem__)")
    count = len(dataset)
    targets = getattr(dataset, "targets", None)
    labels = [int(t) for t in targets] if targets is not None and len(targets) == count else None
    if labels is None:
        labels = []
        for index in range(count):
            item = dataset[index]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise UserError(f"{source}: item {index} is not an (image, label) pair; return (image, label) items")
            labels.append(int(item[1]))
    names: Sequence[Any] | None = getattr(dataset, "classes", None)
    indices: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        if names is not None and not 0 <= label < len(names):
            raise UserError(f"{source}: item {index} has label {label}, outside its {len(names)} classes")
        name = str(names[label]) if names is not None else str(label)
        indices.setdefault(name, []).append(index)
    if len(indices) < MIN_CLASSES:
        raise UserError(f"{source} has {len(indices)} class(es); a dataset needs at least {MIN_CLASSES}")
    width = len(str(count - 1))
    return DatasetCollection(dataset, indices, source, identifier or (lambda index: f"{index:0{width}d}"))


def read_splits(collection: DatasetCollection, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    """``(split, RawSplit)`` for train, val and test: each split's classes sorted, each class's items in order."""
    for split in SPLIT_NAMES:
        names = convention.classes[split]
        rows = {name: collection.indices[name] for name in names}
        ids = {name: [collection.identifier(i) for i in rows[name]] for name in names}
        labels, flat, image_ids = stack_split(names, rows, ids)
        yield split, RawSplit(names, labels, image_ids, load=_loader(collection, flat))


def _loader(collection: DatasetCollection, rows: list[int]) -> Callable[[int], np.ndarray]:
    """A ``RawSplit.load``: image ``i`` is dataset item ``rows[i]``."""

    def load(i: int) -> np.ndarray:
        return collection.load(rows[i])

    return load


def describe_source(dataset: Any, spec: str | None) -> str:
    """What the store records as the source: the factory, or the dataset's class."""
    kind = type(dataset)
    return spec if spec is not None else f"<{kind.__module__}.{kind.__qualname__} object>"
