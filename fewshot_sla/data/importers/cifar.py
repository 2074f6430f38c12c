"""FC100 and CIFAR-FS from the CIFAR-100 python release: ``cifar-100-python/{train,test,meta}``.

Both benchmarks regroup CIFAR-100's 100 fine classes into their own splits, merging CIFAR's train and
test images (600 per class). Class names are the fine class names; identifiers ``train/<row>`` and
``test/<row>`` are rows of the original ``train`` and ``test`` files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import (
    Layout,
    RawSplit,
    load_pickle,
    require_files,
    require_images,
    require_keys,
    require_labels,
    some_classes,
    stack_split,
)
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting

FILES = ("train", "test", "meta")
FOLDER = "cifar-100-python"


def _locate(source: Path) -> Path | None:
    for candidate in (source, source / FOLDER):
        if any((candidate / name).is_file() for name in FILES):
            return candidate
    return None


def _source_files(root: Path) -> list[Path]:
    return require_files(root, FILES, FOLDER)


def _read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    train, test, meta = require_files(root, FILES, FOLDER)
    listed = require_keys(load_pickle(meta), ("fine_label_names",), meta)["fine_label_names"]
    if not isinstance(listed, (list, tuple)):
        raise UserError(f"{meta}: 'fine_label_names' must be a list of class names; the file is damaged")
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in listed]
    wanted = {name for split in SPLIT_NAMES for name in convention.classes[split]}
    if wanted - set(names):
        raise UserError(
            f"{meta} lacks {some_classes(wanted - set(names))} named by the split files; "
            f"check {setting('source')}, or pass {setting('split_dir')} with matching split files"
        )
    parts = []
    for path in (train, test):
        obj = require_keys(load_pickle(path), ("data", "fine_labels"), path)
        images = require_images(obj["data"], path)
        labels = require_labels(obj["fine_labels"], len(images), path, "fine_labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise UserError(f"{path}: 'fine_labels' must lie in 0..{len(names) - 1}; the file is damaged")
        parts.append((path.name, images, labels))
    for split in SPLIT_NAMES:
        class_names = convention.classes[split]
        rows: dict[str, list[tuple[int, int]]] = {}
        ids: dict[str, list[str]] = {}
        for name in class_names:
            fine = names.index(name)
            found = [(p, int(r)) for p, (_, _, labels) in enumerate(parts) for r in np.flatnonzero(labels == fine)]
            if not found:
                raise UserError(
                    f"{root} has no image of class '{name}' named by the {split} split; check {setting('source')}"
                )
            rows[name] = found
            ids[name] = [f"{parts[p][0]}/{r}" for p, r in found]
        labels, flat, image_ids = stack_split(class_names, rows, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=_rows_of_parts(parts, flat))


def _rows_of_parts(
    parts: list[tuple[str, np.ndarray, np.ndarray]], flat: list[tuple[int, int]]
) -> Callable[[int], np.ndarray]:
    """A ``RawSplit.load``: image ``i`` is row ``flat[i][1]`` of the images of file ``flat[i][0]``."""

    def load(i: int) -> np.ndarray:
        part, row = flat[i]
        return parts[part][1][row]

    return load


CIFAR100_PYTHON = Layout(
    name="cifar-100-python",
    summary="cifar-100-python/ with train, test, meta (CIFAR-100 python release)",
    locate=_locate,
    source_files=_source_files,
    read=_read,
)
