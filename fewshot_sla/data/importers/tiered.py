"""tieredImageNet (Ren et al., 2018) in the three layouts it is distributed in.

- ``tiered-png-pickle``: Ren et al.'s release as learn2learn and torchmeta download it,
  ``{train,val,test}_images_png.pkl`` (a list of PNG-encoded images, numpy uint8 buffers or byte strings) +
  ``{split}_labels.pkl`` (a dict with ``label_specific`` (class number per image), ``label_specific_str`` (class
  names by number), ``label_general``, ``label_general_str``),
  in the source folder or its ``tiered-imagenet/`` subfolder.
- ``tiered-npz``: the decompressed form that MetaOptNet (after Gidaris & Komodakis) and others read,
  ``{split}_images.npz`` (key ``images``, uint8 ``[N, 84, 84, 3]``) + ``{split}_labels.pkl`` (the same keys, or
  MetaOptNet's ``labels`` instead of ``label_specific``), in the source folder or its ``tiered_imagenet/`` or
  ``tiered-imagenet/`` subfolder. Ren et al.'s code wrote these arrays with OpenCV (``cv2.imread`` /
  ``cv2.imdecode``), so their channels are BGR: they are flipped to RGB here, which makes a store read from the npz
  files pixel-for-pixel the one read from the PNG pickles.
- ``tiered-folders``: one folder per split and class, ``{train,val,test}/<wnid>/*.JPEG|jpg|png...`` as
  yaoyao-liu/tiered-imagenet-tools writes it, in the source folder or its ``tiered_imagenet/`` subfolder.

Classes are ImageNet wnids and must match the split convention (Ren et al.'s packaged lists, or ``--split-dir``).
A class name in ``label_specific_str`` that is not a wnid is mapped to one through the ``synsets.txt`` and
``class_names.txt`` (one ImageNet class per line, paired by line) beside the pickles, among the split's wnids.
Identifiers: the pickles record no file names, so an image's identifier is ``<wnid>/<index within class>`` (0-based,
in the order of the source's rows); in the folder layout it is ``<wnid>/<file name>``. The two pickle layouts
therefore give the same identifiers (the npz files are the decompressed PNG pickles, row for row), but a fixed
episode set drawn from a store of one kind resolves only in stores prepared from the same kind of source.
"""

from __future__ import annotations

import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import (
    BadImage,
    Layout,
    RawSplit,
    check_same_classes,
    files_of,
    load_pickle,
    require_files,
    require_labels,
    stack_split,
)
from fewshot_sla.data.importers.imagefolder import image_extensions
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import io_error, read_text

PNG_FILES = {split: (f"{split}_images_png.pkl", f"{split}_labels.pkl") for split in SPLIT_NAMES}
NPZ_FILES = {split: (f"{split}_images.npz", f"{split}_labels.pkl") for split in SPLIT_NAMES}
NAME_FILES = ("synsets.txt", "class_names.txt")  # ImageNet's wnids and class names, paired by line
WNID = re.compile(r"^n\d{8}$")
LABEL_KEYS = ("label_specific", "labels")  # Ren et al.'s key, MetaOptNet's


def _find(source: Path, subfolders: tuple[str, ...], present: Callable[[Path], bool]) -> Path | None:
    for candidate in (source, *(source / name for name in subfolders)):
        if candidate.is_dir() and present(candidate):
            return candidate
    return None


def _pickle_files(files: dict[str, tuple[str, str]], title: str) -> Callable[[Path], list[Path]]:
    def source_files(root: Path) -> list[Path]:
        names = [name for pair in files.values() for name in pair]
        return require_files(root, names, title) + [root / n for n in NAME_FILES if (root / n).is_file()]

    return source_files


# --- labels pickles ---------------------------------------------------------------------------------------


def _name_table(root: Path) -> dict[str, list[str]] | None:
    """ImageNet class name -> wnids, from ``synsets.txt`` + ``class_names.txt`` beside the pickles (None without)."""
    paths = [root / name for name in NAME_FILES]
    if not all(p.is_file() for p in paths):
        return None
    synsets, names = (read_text(p, "ImageNet class list", "replace the damaged file").splitlines() for p in paths)
    if len(synsets) != len(names):
        raise UserError(f"{paths[0]} and {paths[1]} have different numbers of lines; they must pair up line by line")
    table: dict[str, list[str]] = {}
    for wnid, name in zip(synsets, names):
        table.setdefault(name.strip(), []).append(wnid.strip())
    return table


def _class_names(obj: dict, path: Path) -> list[str]:
    names = obj.get("label_specific_str")
    if names is None:
        raise UserError(
            f"{path} names no classes (no 'label_specific_str'), so its labels cannot be matched to wnids; "
            "use the label file of Ren et al.'s release, whose rows are in the same order"
        )
    if isinstance(names, np.ndarray):
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{path}: 'label_specific_str' must be a list of class names; the file is damaged")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _wnids_of(names: list[str], used: list[int], path: Path, root: Path, wanted: set[str]) -> dict[int, str]:
    """label -> wnid for the labels in use: a wnid as it stands, a class name through ``synsets.txt``."""
    if used and (min(used) < 0 or max(used) >= len(names)):
        bad = next(label for label in used if not 0 <= label < len(names))
        raise UserError(
            f"{path}: label {bad} has no entry in 'label_specific_str' ({len(names)} names); the file is damaged"
        )
    table = None if all(WNID.match(names[label]) for label in used) else _name_table(root)
    wnids: dict[int, str] = {}
    for label in used:
        name = names[label]
        if WNID.match(name):
            wnids[label] = name
            continue
        if table is None:
            raise UserError(
                f"{path}: class name {name!r} is not an ImageNet wnid; put the release's synsets.txt and "
                f"class_names.txt beside it to map names to wnids"
            )
        candidates = [w for w in table.get(name, []) if w in wanted] or table.get(name, [])
        if len(candidates) != 1:
            found = "no" if not candidates else f"{len(candidates)} ({', '.join(candidates[:3])})"
            raise UserError(
                f"{path}: class name {name!r} matches {found} wnids in {NAME_FILES[0]}; check {setting('source')}"
            )
        wnids[label] = candidates[0]
    seen: dict[str, int] = {}
    for label, wnid in wnids.items():
        if wnid in seen:
            raise UserError(f"{path}: labels {seen[wnid]} and {label} are both class {wnid}; the file is damaged")
        seen[wnid] = label
    return wnids


def _rows_per_class(
    labels_path: Path, count: int, root: Path, convention: SplitConvention, split: str
) -> dict[str, list[int]]:
    """wnid -> the rows of that class in source order, checked against the split convention."""
    obj = load_pickle(labels_path)
    key = next((k for k in LABEL_KEYS if isinstance(obj, dict) and k in obj), None)
    if key is None:
        raise UserError(
            f"{labels_path} lacks the key(s) {' or '.join(LABEL_KEYS)}; is it the right file for this layout?"
        )
    labels = require_labels(obj[key], count, labels_path, key)
    used = np.unique(labels).tolist()
    wanted = {name for s in SPLIT_NAMES for name in convention.classes[s]}
    wnids = _wnids_of(_class_names(obj, labels_path), used, labels_path, root, wanted)
    rows = {wnids[label]: np.flatnonzero(labels == label).tolist() for label in used}
    check_same_classes(rows, convention.classes[split], labels_path.name, split)
    return rows


def _split_of(rows: dict[str, list[int]], load_row: Callable[[int], np.ndarray]) -> RawSplit:
    class_names = sorted(rows)
    ids = {wnid: [f"{wnid}/{i}" for i in range(len(r))] for wnid, r in rows.items()}
    labels, flat_rows, image_ids = stack_split(class_names, rows, ids)
    return RawSplit(class_names, labels, image_ids, load=lambda i: load_row(flat_rows[i]))


# --- PNG pickles (Ren et al.'s release, learn2learn) ------------------------------------------------------


def _png_loader(images: list, path: Path) -> Callable[[int], np.ndarray]:
    def load(row: int) -> np.ndarray:
        item = images[row]
        where = f"{path} row {row}"
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            data = item.tobytes()
        elif isinstance(item, (bytes, bytearray)):
            data = bytes(item)
        else:
            raise BadImage(where, f"holds {type(item).__name__}, not a PNG-encoded image")
        try:
            with Image.open(BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadImage(where, f"cannot decode ({err})") from None

    return load


def _read_png(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    _pickle_files(PNG_FILES, "tieredImageNet PNG pickle")(root)
    for split in SPLIT_NAMES:
        images_path, labels_path = (root / name for name in PNG_FILES[split])
        images = load_pickle(images_path)
        if isinstance(images, np.ndarray) and images.dtype == object:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            raise UserError(
                f"{images_path} holds {type(images).__name__}; expected a list of PNG-encoded images, one per row"
            )
        rows = _rows_per_class(labels_path, len(images), root, convention, split)
        yield split, _split_of(rows, _png_loader(list(images), images_path))


# --- npz arrays (MetaOptNet, Gidaris & Komodakis) ---------------------------------------------------------


def _npz_images(path: Path) -> np.ndarray:
    """``images`` of an npz file: memory-mapped when stored uncompressed (``np.savez``), else read whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo("images.npy")
            except KeyError:
                raise UserError(f"{path} lacks the key(s) images; is it the right file for this layout?") from None
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    images = np.lib.format.read_array(member, allow_pickle=False)
            else:
                with open(path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise ValueError("bad local file header")
                    name_length, extra_length = struct.unpack("<HH", local[26:30])
                    f.seek(info.header_offset + 30 + name_length + extra_length)
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
                if dtype.hasobject:
                    raise ValueError("the array holds Python objects")
                images = np.memmap(
                    path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
                )
    except UserError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as err:
        raise UserError(f"cannot read {path}: {err}; replace the damaged file") from None
    except OSError as err:
        raise io_error(err, path, "read") from None
    if not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3):
        raise UserError(
            f"{path} holds images of shape {images.shape} and type {images.dtype}; expected uint8 [N, H, W, 3]"
        )
    return images


def _read_npz(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    _pickle_files(NPZ_FILES, "tieredImageNet npz")(root)
    for split in SPLIT_NAMES:
        images_path, labels_path = (root / name for name in NPZ_FILES[split])
        images = _npz_images(images_path)
        rows = _rows_per_class(labels_path, len(images), root, convention, split)

        def load(row: int, images: np.ndarray = images) -> np.ndarray:
            return np.ascontiguousarray(images[row][..., ::-1])  # BGR (OpenCV) -> RGB

        yield split, _split_of(rows, load)


# --- class folders (yaoyao-liu/tiered-imagenet-tools) -----------------------------------------------------


def _folder_root(source: Path) -> Path | None:
    return _find(source, ("tiered_imagenet",), lambda c: all((c / s).is_dir() for s in SPLIT_NAMES))


def _folder_files(root: Path) -> dict[str, dict[str, list[str]]]:
    """split -> wnid -> image file names (sorted; hidden files and non-image files skipped)."""
    extensions = image_extensions()
    found: dict[str, dict[str, list[str]]] = {}
    for split in SPLIT_NAMES:
        try:
            folders = sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith("."))
            found[split] = {
                folder.name: sorted(
                    f.name
                    for f in folder.iterdir()
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
                )
                for folder in folders
            }
        except OSError as err:
            raise io_error(err, root / split, "list") from None
    return found


def _folder_source_files(root: Path) -> list[Path]:
    return [
        root / s / w / f
        for s, per_class in _folder_files(root).items()
        for w, names in per_class.items()
        for f in names
    ]


def _read_folders(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    found = _folder_files(root)
    for split in SPLIT_NAMES:
        check_same_classes(found[split], convention.classes[split], str(root / split), split)
        empty = [wnid for wnid in sorted(found[split]) if not found[split][wnid]]
        if empty:
            raise UserError(f"{root / split / empty[0]} holds no image file; add its images or remove the folder")
    for split in SPLIT_NAMES:
        class_names = convention.classes[split]
        ids = {wnid: [f"{wnid}/{name}" for name in found[split][wnid]] for wnid in class_names}
        paths = {wnid: [root / split / rel for rel in ids[wnid]] for wnid in class_names}
        labels, flat_paths, image_ids = stack_split(class_names, paths, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=files_of(flat_paths))


def _has_any(files: dict[str, tuple[str, str]]) -> Callable[[Path], bool]:
    return lambda folder: any((folder / pair[0]).is_file() for pair in files.values())


PNG_PICKLE = Layout(
    name="tiered-png-pickle",
    summary="{train,val,test}_images_png.pkl + {train,val,test}_labels.pkl (Ren et al., learn2learn)",
    locate=lambda source: _find(source, ("tiered-imagenet",), _has_any(PNG_FILES)),
    source_files=_pickle_files(PNG_FILES, "tieredImageNet PNG pickle"),
    read=_read_png,
)
NPZ = Layout(
    name="tiered-npz",
    summary="{train,val,test}_images.npz + {train,val,test}_labels.pkl (MetaOptNet)",
    locate=lambda source: _find(source, ("tiered_imagenet", "tiered-imagenet"), _has_any(NPZ_FILES)),
    source_files=_pickle_files(NPZ_FILES, "tieredImageNet npz"),
    read=_read_npz,
)
FOLDERS = Layout(
    name="tiered-folders",
    summary="{train,val,test}/<wnid>/ image folders (tiered-imagenet-tools)",
    locate=_folder_root,
    source_files=_folder_source_files,
    read=_read_folders,
)
LAYOUTS = (PNG_PICKLE, NPZ, FOLDERS)
