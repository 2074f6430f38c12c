"""Your own images as a dataset: the ``imagefolder`` layout, ``DIR/<class>/<image>``, and its class split.

- **Classes** are the names of the subfolders of ``DIR`` (hidden ones, starting with ``.``, are ignored); each
  needs at least one image, and a dataset at least ``MIN_CLASSES`` classes (two per split, with room to spare).
- **Images** are the files below a class folder (at any depth) whose extension Pillow recognises (``.jpg``,
  ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.tif``, ``.webp``, ...; see ``image_extensions``); other and hidden
  files are ignored, and an image directly in ``DIR`` is refused (it belongs to no class). Each is converted to
  RGB and resized to the store's square size (default ``DEFAULT_IMAGE_SIZE``, aspect ratio not kept, as for the
  built-in datasets); one that does not decode stops the prepare, or is counted and skipped with ``--skip-bad``.
- **Identifiers** are the image paths relative to ``DIR`` (``cat/001.jpg``, ``/``-separated on every system),
  so a fixed episode set drawn from one store resolves in any store of the same collection.
- **Split** (classes, never images, are split): a split file (``read_split_file``: CSV rows ``class,split``), or
  a seeded split of the sorted class names with stated fractions (``seeded_split``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import Layout, RawSplit, files_of, some_classes, stack_split
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import io_error

LAYOUT = "imagefolder"
DEFAULT_IMAGE_SIZE = 84
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
DEFAULT_SEED = 0
MIN_CLASSES = 6
MIN_SPLIT_CLASSES = 2
SPLIT_FILE_HEADER = ["class", "split"]


def image_extensions() -> frozenset[str]:
    """The file extensions (lower case, with the dot) Pillow can open here."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with ``.``): ignored, never read or counted."""
    return name.startswith(".")


def is_image_file(path: Path, extensions: frozenset[str] | None = None) -> bool:
    """Whether ``path`` is read as an image: its extension (any case) is one Pillow recognises
    (``image_extensions()``, or ``extensions`` when given); other files are not images and are skipped.

    The one rule for ``data prepare`` (``scan``) and ``fewshot-sla predict``; whether an image then decodes is
    ``read_image_file``'s question (``BadImage``; skipped with ``--skip-bad``)."""
    return path.suffix.lower() in (image_extensions() if extensions is None else extensions)


@dataclass(frozen=True)
class Collection:
    """A scanned image folder: ``files[class]`` lists that class's images, relative to ``root``, sorted."""

    root: Path
    files: dict[str, list[str]]

    @property
    def classes(self) -> list[str]:
        """The class names, sorted."""
        return sorted(self.files)

    def paths(self) -> list[Path]:
        """Every image file, class by class."""
        return [self.root / rel for name in self.classes for rel in self.files[name]]


def scan(root: Path) -> Collection:
    """The classes and images of ``root``; a UserError for a layout that is not usable as a dataset."""
    extensions = image_extensions()
    try:
        entries = sorted(root.iterdir())
    except OSError as err:
        raise io_error(err, root, "list the image folder") from None
    stray = [p.name for p in entries if p.is_file() and not is_hidden(p.name) and is_image_file(p, extensions)]
    if stray:
        raise UserError(
            f"{root} holds image(s) outside class folders (e.g. {stray[0]}); put every image in {root}/<class>/"
        )
    files: dict[str, list[str]] = {}
    for folder in (p for p in entries if p.is_dir() and not is_hidden(p.name)):
        images = sorted(
            path.relative_to(root).as_posix()
            for path in folder.rglob("*")
            if is_image_file(path, extensions)
            and not any(is_hidden(part) for part in path.relative_to(folder).parts)
            and path.is_file()
        )
        if not images:
            raise UserError(
                f"class folder {folder} holds no images (files Pillow opens: .jpg, .png, ...); "
                "add images or remove the folder"
            )
        files[folder.name] = images
    if len(files) < MIN_CLASSES:
        raise UserError(
            f"{root} has {len(files)} class folder(s); a dataset needs at least {MIN_CLASSES} "
            f"({MIN_SPLIT_CLASSES} per split): add class folders {root}/<class>/"
        )
    return Collection(root, files)


def _locate(source: Path) -> Path | None:
    try:
        return source if any(p.is_dir() and not is_hidden(p.name) for p in source.iterdir()) else None
    except OSError:
        return None


def _source_files(root: Path) -> list[Path]:
    return scan(root).paths()


def read_splits(collection: Collection, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    """``(split, RawSplit)`` for train, val and test: each split's classes sorted, each class's images sorted."""
    for split in SPLIT_NAMES:
        class_names = convention.classes[split]
        ids = {name: collection.files[name] for name in class_names}
        paths = {name: [collection.root / rel for rel in rels] for name, rels in ids.items()}
        labels, flat_paths, image_ids = stack_split(class_names, paths, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=files_of(flat_paths))


def _read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    return read_splits(scan(root), convention)


IMAGEFOLDER = Layout(
    name=LAYOUT,
    summary="one subfolder of images per class (DIR/<class>/*.jpg, *.png, ...)",
    locate=_locate,
    source_files=_source_files,
    read=_read,
)


# ----- the class split -----


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``--split-fractions TRAIN,VAL,TEST``: three positive numbers summing to 1."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UserError(
            f"{setting('split_fractions')} must be three numbers TRAIN,VAL,TEST such as 0.64,0.16,0.20, got {text!r}"
        )
    if any(v <= 0 for v in values):
        raise UserError(f"{setting('split_fractions')} must all be positive (every split needs classes), got {text!r}")
    if abs(sum(values) - 1) > 1e-6:
        raise UserError(f"{setting('split_fractions')} must sum to 1, got {text!r} (sum {sum(values):g})")
    return values[0], values[1], values[2]


def split_sizes(count: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Classes per split: val and test get ``fraction * count`` rounded half up, at least ``MIN_SPLIT_CLASSES``
    each; train gets the rest, and must have at least ``MIN_SPLIT_CLASSES`` too."""
    val, test = (max(MIN_SPLIT_CLASSES, math.floor(f * count + 0.5)) for f in fractions[1:])
    train = count - val - test
    if train < MIN_SPLIT_CLASSES:
        raise UserError(
            f"{setting('split_fractions')} {','.join(f'{f:g}' for f in fractions)} leave {max(train, 0)} of "
            f"{count} classes "
            f"for the train split (val {val}, test {test}); each split needs at least {MIN_SPLIT_CLASSES}: "
            "raise the train fraction or add classes"
        )
    return train, val, test


def seeded_split(classes: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """A deterministic class split: the sorted class names permuted by ``numpy.random.default_rng(seed)``; the
    first ``train`` of them form train, the next ``val`` val, the rest test (sizes from ``split_sizes``)."""
    names = sorted(classes)
    sizes = split_sizes(len(names), fractions)
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    bounds = np.cumsum((0, *sizes))
    return {split: sorted(shuffled[bounds[i] : bounds[i + 1]]) for i, split in enumerate(SPLIT_NAMES)}


def read_split_file(path: Path, classes: Sequence[str]) -> dict[str, list[str]]:
    """A split file: UTF-8 CSV, one row ``class,split`` per class folder (``split`` one of train, val, test), an
    optional header row ``class,split``, blank lines and ``#`` comment lines ignored. Every class folder must be
    listed exactly once, and each split needs at least ``MIN_SPLIT_CLASSES`` classes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{setting('split_file')} {path} does not exist; give the CSV of 'class,split' rows") from None
    except IsADirectoryError:
        raise UserError(f"{setting('split_file')} {path} is a folder; give the CSV of 'class,split' rows") from None
    except OSError as err:
        raise io_error(err, path, "read the split file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"split file {path} is not UTF-8 text (byte offset {err.start}); save it as UTF-8") from None
    known = set(classes)
    where: dict[str, int] = {}
    splits: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in row]
        if not cells or cells == [""] or cells[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in cells] == SPLIT_FILE_HEADER:
            continue
        if len(cells) != 2 or not cells[0] or cells[1] not in SPLIT_NAMES:
            raise UserError(
                f"split file {path} line {number}: expected 'class,split' with split train, val or test, "
                f"got {','.join(row)!r}"
            )
        name, split = cells
        if name not in known:
            raise UserError(
                f"split file {path} line {number}: no class folder '{name}' in the source; "
                "fix the name or add the folder"
            )
        if name in where:
            raise UserError(
                f"split file {path} line {number}: class '{name}' is already listed on line {where[name]}; "
                "list each class once, in one split"
            )
        where[name] = number
        splits[split].append(name)
    unlisted = known - set(where)
    if unlisted:
        raise UserError(
            f"split file {path} does not list {some_classes(unlisted)} of the source; "
            "add a 'class,split' row for every class folder"
        )
    for split, names in splits.items():
        if len(names) < MIN_SPLIT_CLASSES:
            raise UserError(
                f"split file {path} gives the {split} split {len(names)} class(es); "
                f"each split needs at least {MIN_SPLIT_CLASSES}"
            )
    return {split: sorted(names) for split, names in splits.items()}


def convention(
    class_names: Sequence[str],
    split_file: Path | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> SplitConvention:
    """The class split of a collection's classes as a ``SplitConvention`` (its digest covers the split it gives)."""
    if split_file is not None:
        classes = read_split_file(split_file, class_names)
        name, origin = "split-file", str(split_file.resolve())
    else:
        classes = seeded_split(class_names, fractions, seed)
        name, origin = f"seeded {'/'.join(f'{f:g}' for f in fractions)} seed {seed}", "seeded"
    digest = hashlib.sha256(json.dumps({"name": name, "classes": classes}, sort_keys=True).encode()).hexdigest()
    return SplitConvention(name=name, origin=origin, classes=classes, files=None, digest=digest)


def describe(split: SplitConvention) -> str:
    """How a store records its split: ``seeded 0.64/0.16/0.2 seed 0`` or ``split-file <absolute path>``."""
    return split.name if split.origin == "seeded" else f"{split.name} {split.origin}"
