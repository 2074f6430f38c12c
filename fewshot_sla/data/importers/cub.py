"""CUB-200-2011 as released: ``CUB_200_2011/`` with ``images/<class folder>/*.jpg``, ``images.txt``,
``classes.txt`` and ``image_class_labels.txt`` (``bounding_boxes.txt`` is not used: whole images are kept).

Class names are the class folder names (``001.Black_footed_Albatross``); identifiers are image paths
relative to ``images/``. Images are resized to a square without keeping the aspect ratio.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import (
    Layout,
    RawSplit,
    files_of,
    require_files,
    some_classes,
    stack_split,
)
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import read_text

FOLDER = "CUB_200_2011"
TXT_FILES = ("images.txt", "classes.txt", "image_class_labels.txt")


def _locate(source: Path) -> Path | None:
    for candidate in (source, source / FOLDER):
        if (candidate / "images").is_dir() and any((candidate / name).is_file() for name in TXT_FILES):
            return candidate
    return None


def _source_files(root: Path) -> list[Path]:
    return require_files(root, TXT_FILES, FOLDER) + sorted((root / "images").rglob("*"))


def _read_table(path: Path) -> dict[str, str]:
    """A CUB ``<id> <value>`` text file as {id: value}; a malformed line is a UserError naming it."""
    table: dict[str, str] = {}
    for number, line in enumerate(
        read_text(path, "CUB metadata file", "replace the damaged file").splitlines(), start=1
    ):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] in table:
            raise UserError(f"{path} line {number}: expected '<id> <value>' with a new id, got {line!r}")
        table[parts[0]] = parts[1].strip()
    return table


def _read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    images_txt, classes_txt, labels_txt = require_files(root, TXT_FILES, FOLDER)
    image_paths, class_names, image_labels = (_read_table(p) for p in (images_txt, classes_txt, labels_txt))
    if set(image_paths) != set(image_labels):
        raise UserError(f"{images_txt} and {labels_txt} list different image ids; the release is damaged")
    unknown = sorted(set(image_labels.values()) - set(class_names))
    if unknown:
        raise UserError(f"{labels_txt} uses class ids missing from {classes_txt} (e.g. {unknown[0]})")
    per_class: dict[str, list[str]] = {name: [] for name in class_names.values()}
    for image_id, relative in image_paths.items():
        per_class[class_names[image_labels[image_id]]].append(relative)
    wanted = {name for split in SPLIT_NAMES for name in convention.classes[split]}
    lacking = {name for name in wanted if not per_class.get(name)}
    if lacking:
        raise UserError(
            f"{root} has no image of {some_classes(lacking)} named by the split files; "
            f"check {setting('source')}, or pass {setting('split_dir')} with matching split files"
        )
    images = root / "images"
    for split in SPLIT_NAMES:
        split_classes = convention.classes[split]
        ids = {name: sorted(per_class[name]) for name in split_classes}
        paths = {name: [images / rel for rel in rels] for name, rels in ids.items()}
        labels, flat_paths, image_ids = stack_split(split_classes, paths, ids)
        yield split, RawSplit(split_classes, labels, image_ids, load=files_of(flat_paths))


CUB = Layout(
    name="cub-folder",
    summary="CUB_200_2011/ with images/, images.txt, classes.txt, image_class_labels.txt",
    locate=_locate,
    source_files=_source_files,
    read=_read,
)
