"""What every raw-layout importer shares: the ``Layout`` and ``RawSplit`` types, image and pickle reading."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import io_error


class BadImage(Exception):
    """An image file that is missing or cannot be decoded; ``prepare`` names it or, with --skip-bad, skips it."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def rows_of(images: np.ndarray, rows: Sequence[int] | np.ndarray | None = None) -> Callable[[int], np.ndarray]:
    """A ``RawSplit.load``: image ``i`` is ``images[rows[i]]`` (``images[i]`` without ``rows``)."""

    def load(i: int) -> np.ndarray:
        return images[i if rows is None else rows[i]]

    return load


def files_of(paths: Sequence[Path]) -> Callable[[int], np.ndarray]:
    """A ``RawSplit.load``: image ``i`` is decoded from ``paths[i]``."""

    def load(i: int) -> np.ndarray:
        return read_image_file(paths[i])

    return load


@dataclass
class RawSplit:
    """One split as an importer sees it: class names, per-image labels and ids, and a loader by position.

    ``load(i)`` returns image ``i`` as uint8 ``[h, w, C]`` (RGB, or one channel for a greyscale dataset) at any
    size (``prepare`` resizes it) or raises ``BadImage``. Rows come class by class (classes sorted), each class in
    its source listing order. ``quarter_turns`` (optional, per row) rotates the resized image counter-clockwise
    that many times, as ``torch.rot90`` does: a stored rotated copy is then exactly SLA's rotation of the
    stored upright image.
    """

    class_names: list[str]
    labels: np.ndarray
    image_ids: list[str]
    load: Callable[[int], np.ndarray]
    quarter_turns: np.ndarray | None = None


def _no_split_dir(root: Path) -> Path | None:
    return None


@dataclass(frozen=True)
class Layout:
    """One raw format a dataset can come in, and how to find and read it.

    ``locate(source)`` returns the folder holding the layout (``source`` or a known subfolder) or None;
    ``source_files(root)`` lists the inputs (their sizes and times identify a re-run);
    ``read(root, convention)`` yields ``(split, RawSplit)`` for train, val and test, raising UserError on
    inputs that disagree with the split convention; ``split_dir(root)`` names split files shipped with
    the source itself, which then take precedence over the packaged ones.
    """

    name: str
    summary: str
    locate: Callable[[Path], Path | None]
    source_files: Callable[[Path], list[Path]]
    read: Callable[[Path, SplitConvention], Iterator[tuple[str, RawSplit]]]
    split_dir: Callable[[Path], Path | None] = _no_split_dir


def read_image_file(path: Path) -> np.ndarray:
    """Decode an image file as RGB uint8 ``[h, w, 3]`` (greyscale, palette and CMYK are converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise BadImage(path, "file is missing") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(path, f"cannot decode ({err})") from None


# ``data prepare --resize-filter``: Pillow's resampling filters by name; the first is the default.
RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
DEFAULT_RESIZE_FILTER = "lanczos"


def resize_image(image: np.ndarray, size: int, resize_filter: str = DEFAULT_RESIZE_FILTER) -> np.ndarray:
    """Resize a uint8 image ``[h, w, C]`` (RGB or one channel) to ``size x size``, aspect ratio not kept, with
    Pillow's filter ``resize_filter`` (a key of ``RESIZE_FILTERS``).

    Lanczos by default, as for mini-ImageNet and as Finn et al.'s Omniglot script resizes: an antialiasing filter,
    so that a 105 px Omniglot stroke becomes grey edges at 28 px instead of being dropped or doubled as nearest
    would. Nearest is what Snell et al.'s Omniglot code got (Pillow resizes 1-bit images with nearest only).
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    plane = image[:, :, 0] if image.shape[2] == 1 else image
    resized = np.asarray(Image.fromarray(plane).resize((size, size), RESIZE_FILTERS[resize_filter]))
    return resized.reshape(size, size, image.shape[2])


# The only globals a dataset pickle (numpy arrays, lists, dicts; Python 2 or 3) needs.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that builds arrays and containers but refuses any other global (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which no dataset pickle needs")
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file written by Python 2 or 3 (py2 byte strings decoded as latin1)."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise UserError(f"cannot read {path}: {err or 'truncated file'}; replace the damaged file") from None
    except OSError as err:
        raise io_error(err, path, "read") from None


def require_keys(obj: Any, keys: Iterable[str], path: Path) -> dict:
    """``obj`` as a dict that holds every one of ``keys``, else a UserError naming the file."""
    missing = [k for k in keys if not (isinstance(obj, dict) and k in obj)]
    if missing:
        raise UserError(f"{path} lacks the key(s) {', '.join(missing)}; is it the right file for this layout?")
    return obj


def require_files(root: Path, names: Iterable[str], layout: str) -> list[Path]:
    """The paths of ``names`` under ``root``; a UserError naming the missing ones otherwise."""
    paths = [root / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{root} holds a {layout} layout but lacks {', '.join(missing)}; add the missing file(s)")
    return paths


def check_same_classes(found: Iterable[str], expected: Iterable[str], where: str, split: str) -> None:
    """A UserError when a source's classes for ``split`` differ from the split convention's."""
    found_set, expected_set = set(found), set(expected)
    if found_set == expected_set:
        return
    parts = []
    if expected_set - found_set:
        parts.append(f"lacks {some_classes(expected_set - found_set)} named by the {split} split")
    if found_set - expected_set:
        parts.append(f"has {some_classes(found_set - expected_set)} not in the {split} split")
    raise UserError(
        f"{where} {' and '.join(parts)}; check {setting('source')}, or pass {setting('split_dir')} with "
        "matching split files"
    )


def some_classes(names: set[str]) -> str:
    """A short count-and-examples phrase for error messages, e.g. '5 class(es) (a, b, c, ...)'."""
    shown = ", ".join(sorted(names)[:3])
    return f"{len(names)} class(es) ({shown}{', ...' if len(names) > 3 else ''})"


def ravi_ids_by_position(
    convention: SplitConvention, split: str, counts: dict[str, int], where: str
) -> dict[str, list[str]]:
    """Ravi file names for pickled mini-ImageNet images, matched by position within each class.

    The pickles record no file names, so this ASSUMES each class's images appear in the order of its Ravi
    CSV rows (the caches were made from the Ravi release, class by class); it checks what it can, that the
    per-class counts agree, and refuses otherwise.
    """
    assert convention.files is not None
    files = convention.files[split]
    check_same_classes(counts, files, where, split)
    for wnid in sorted(files):
        if counts[wnid] != len(files[wnid]):
            raise UserError(
                f"{where} has {counts[wnid]} images of {wnid} but the {split} split file lists {len(files[wnid])}; "
                f"Ravi file names cannot be matched by position (pass {setting('split_dir')} with the lists it "
                "was built from)"
            )
    return files


def require_images(data: Any, path: Path) -> np.ndarray:
    """A uint8 image array ``[N, H, W, 3]`` from a pickle; CIFAR's flat ``[N, 3*H*W]`` (CHW) rows are unpacked."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2:
        side = round((data.shape[1] / 3) ** 0.5)
        if 3 * side * side == data.shape[1]:
            return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[3] == 3:
        return data
    shape = getattr(data, "shape", None)
    raise UserError(
        f"{path} holds images of shape {shape} and type {getattr(data, 'dtype', type(data).__name__)}; "
        "expected uint8 [N, H, W, 3] (or CIFAR's [N, 3072])"
    )


def require_labels(labels: Any, count: int, path: Path, key: str) -> np.ndarray:
    """Per-image integer labels as int64 ``[count]``, else a UserError naming the file and key."""
    try:
        array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        array = np.zeros(0, dtype=np.int64)
    if array.shape != (count,):
        raise UserError(f"{path}: '{key}' must hold one integer label per image ({count}); got shape {array.shape}")
    return array


def stack_split(
    class_names: list[str], per_class: dict[str, list[Any]], ids: dict[str, list[str]]
) -> tuple[np.ndarray, list[Any], list[str]]:
    """Flatten per-class rows into canonical order: labels, the per-row items and the ids."""
    labels: list[int] = []
    items: list[Any] = []
    image_ids: list[str] = []
    for label, name in enumerate(class_names):
        labels += [label] * len(per_class[name])
        items += per_class[name]
        image_ids += ids[name]
    return np.asarray(labels, dtype=np.int64), items, image_ids
