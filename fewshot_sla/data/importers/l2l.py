"""mini-ImageNet as learn2learn caches: ``mini-imagenet-cache-{train,validation,test}.pkl``.

Each pickle is a dict with ``image_data`` uint8 ``[N, 84, 84, 3]`` and ``class_dict`` {wnid: [row, ...]}.
Image identifiers are the Ravi file names, matched by position within each class (see
``ravi_ids_by_position`` for the assumption and the check).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import (
    Layout,
    RawSplit,
    load_pickle,
    ravi_ids_by_position,
    require_files,
    require_images,
    require_keys,
    rows_of,
    stack_split,
)
from fewshot_sla.errors import UserError

FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}


def _locate(source: Path) -> Path | None:
    return source if any((source / name).is_file() for name in FILES.values()) else None


def _source_files(root: Path) -> list[Path]:
    return require_files(root, FILES.values(), "learn2learn")


def _class_rows(class_dict: object, count: int, path: Path) -> dict[str, list[int]]:
    """``class_dict`` checked: str keys, integer rows within ``0..count-1``, each row used once."""
    if not isinstance(class_dict, dict) or not all(isinstance(k, str) for k in class_dict):
        raise UserError(f"{path}: 'class_dict' must map class names to lists of row indices")
    rows = {}
    for name, value in class_dict.items():
        array = np.asarray(value)
        if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
            raise UserError(
                f"{path}: 'class_dict' entry {name!r} must be a list of integer row indices, got "
                f"{array.dtype.name} values such as {array.reshape(-1)[:1].tolist()}; the file is damaged"
            )
        rows[name] = [int(i) for i in array.astype(np.int64).reshape(-1)]
    flat = [i for r in rows.values() for i in r]
    if any(not 0 <= i < count for i in flat) or len(set(flat)) != len(flat):
        raise UserError(f"{path}: 'class_dict' has row indices outside 0..{count - 1} or repeated; the file is damaged")
    return rows


def _read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    paths = require_files(root, FILES.values(), "learn2learn")
    for (split, _), path in zip(FILES.items(), paths):
        cache = require_keys(load_pickle(path), ("image_data", "class_dict"), path)
        images = require_images(cache["image_data"], path)
        rows = _class_rows(cache["class_dict"], len(images), path)
        ids = ravi_ids_by_position(convention, split, {k: len(v) for k, v in rows.items()}, path.name)
        class_names = sorted(rows)
        labels, flat_rows, image_ids = stack_split(class_names, rows, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=rows_of(images, flat_rows))


L2L = Layout(
    name="l2l-pickle",
    summary="mini-imagenet-cache-{train,validation,test}.pkl (learn2learn)",
    locate=_locate,
    source_files=_source_files,
    read=_read,
)
