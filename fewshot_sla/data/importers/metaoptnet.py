"""The pickles MetaOptNet (after Gidaris & Komodakis) ships for mini-ImageNet, FC100 and CIFAR-FS.

All are Python 2 pickles of dicts with ``data`` uint8 ``[N, H, W, 3]`` and ``labels`` (a list of ints).
- mini-ImageNet ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``: classes come from
  ``catname2label`` {wnid: label} when present, else sorted labels map to the split's sorted wnids;
  identifiers are the Ravi file names matched by position within class (see ``ravi_ids_by_position``).
- ``FC100_{train,val,test}.pickle`` / ``CIFAR_FS_{train,val,test}.pickle``: labels are CIFAR-100 fine
  class numbers (0..99, named in CIFAR-100's alphabetical order); identifiers are ``<file stem>/<row>``.
  These pickles do not record which CIFAR-100 image each row was, so their identifiers cannot match those
  of a store built from ``cifar-100-python`` (fixed episode files do not carry over between the two).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fewshot_sla.data.conventions import SplitConvention, cifar100_fine_names
from fewshot_sla.data.importers.common import (
    Layout,
    RawSplit,
    check_same_classes,
    load_pickle,
    ravi_ids_by_position,
    require_files,
    require_images,
    require_keys,
    require_labels,
    rows_of,
    stack_split,
)
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting

MINI_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}


def _rows_by_label(labels: np.ndarray) -> dict[int, list[int]]:
    return {int(label): np.flatnonzero(labels == label).tolist() for label in np.unique(labels)}


def _mini_class_names(obj: dict, by_label: dict[int, list[int]], expected: list[str], path: Path) -> dict[int, str]:
    """label -> wnid, from ``catname2label`` when the pickle has it, else sorted labels onto sorted wnids."""
    if "catname2label" in obj:
        try:
            names = {int(label): str(name) for name, label in dict(obj["catname2label"]).items()}
        except (TypeError, ValueError):
            raise UserError(
                f"{path}: 'catname2label' must map class names to integer labels; the file is damaged"
            ) from None
        unnamed = sorted(set(by_label) - set(names))
        if unnamed:
            raise UserError(f"{path}: labels {unnamed[:3]} have no entry in 'catname2label'; the file is damaged")
        return {label: names[label] for label in by_label}
    if len(by_label) != len(expected):
        raise UserError(
            f"{path} has {len(by_label)} classes but its split lists {len(expected)}; check {setting('source')}"
        )
    return dict(zip(sorted(by_label), expected))


def _read_mini(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    paths = require_files(root, MINI_FILES.values(), "MetaOptNet mini-ImageNet")
    for split, path in zip(SPLIT_NAMES, paths):
        obj = require_keys(load_pickle(path), ("data", "labels"), path)
        images = require_images(obj["data"], path)
        by_label = _rows_by_label(require_labels(obj["labels"], len(images), path, "labels"))
        wnids = _mini_class_names(obj, by_label, convention.classes[split], path)
        rows = {wnids[label]: r for label, r in by_label.items()}
        ids = ravi_ids_by_position(convention, split, {k: len(v) for k, v in rows.items()}, path.name)
        class_names = sorted(rows)
        labels, flat_rows, image_ids = stack_split(class_names, rows, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=rows_of(images, flat_rows))


def _cifar_layout(prefix: str, title: str) -> Layout:
    """The MetaOptNet pickle layout ``<prefix>_{train,val,test}.pickle`` of a CIFAR-100-based dataset."""
    files = [f"{prefix}_{split}.pickle" for split in SPLIT_NAMES]

    def locate(source: Path) -> Path | None:
        return source if any((source / name).is_file() for name in files) else None

    def source_files(root: Path) -> list[Path]:
        return require_files(root, files, f"MetaOptNet {title}")

    def read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
        fine_names = cifar100_fine_names()
        for split, path in zip(SPLIT_NAMES, require_files(root, files, f"MetaOptNet {title}")):
            obj = load_pickle(path)
            key = "fine_labels" if isinstance(obj, dict) and "fine_labels" in obj else "labels"
            obj = require_keys(obj, ("data", key), path)
            images = require_images(obj["data"], path)
            by_label = _rows_by_label(require_labels(obj[key], len(images), path, key))
            if min(by_label) < 0 or max(by_label) >= len(fine_names):
                raise UserError(f"{path}: labels must be CIFAR-100 fine class numbers 0..99; is it a {title} pickle?")
            rows = {fine_names[label]: r for label, r in by_label.items()}
            check_same_classes(rows, convention.classes[split], path.name, split)
            ids = {name: [f"{path.stem}/{row}" for row in r] for name, r in rows.items()}
            class_names = sorted(rows)
            labels, flat_rows, image_ids = stack_split(class_names, rows, ids)
            yield split, RawSplit(class_names, labels, image_ids, load=rows_of(images, flat_rows))

    return Layout(
        name="metaoptnet-pickle",
        summary=f"{prefix}_{{train,val,test}}.pickle (MetaOptNet)",
        locate=locate,
        source_files=source_files,
        read=read,
    )


MINI = Layout(
    name="metaoptnet-pickle",
    summary="miniImageNet_category_split_{train_phase_train,val,test}.pickle (MetaOptNet)",
    locate=lambda source: source if any((source / n).is_file() for n in MINI_FILES.values()) else None,
    source_files=lambda root: require_files(root, MINI_FILES.values(), "MetaOptNet mini-ImageNet"),
    read=_read_mini,
)
FC100 = _cifar_layout("FC100", "FC100")
CIFAR_FS = _cifar_layout("CIFAR_FS", "CIFAR-FS")
