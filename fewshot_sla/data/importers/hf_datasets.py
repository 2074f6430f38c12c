"""A Hugging Face ``datasets`` folder as a dataset of the user's own images (``--layout hf``; the ``hf`` extra).

``--source DIR`` is a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``) or a folder of parquet
files (as the hub's dataset repositories hold them, e.g. ``data/train-00000-of-00001.parquet``; a file's split is the
word its name or folder starts with: train, validation/val/valid, test). The image column is the one of feature type
``Image``; the label column the one of type ``ClassLabel`` (its names name the classes), else an integer column
called ``label``, ``labels``, ``fine_label`` or ``target``. When the folder holds train, validation and test splits
whose classes are disjoint (a few-shot release, as mini-ImageNet's on the hub), that is the class split; otherwise
the splits are joined and split by classes as image folders are (seeded fractions or a split file). An image's
identifier is ``<split>/<row>`` (``<row>`` for a single ``Dataset``). Images are stored as RGB.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.imagefolder import MIN_SPLIT_CLASSES, SPLIT_NAMES
from fewshot_sla.errors import UserError, setting

LAYOUT = "hf"
LABEL_COLUMNS = ("label", "labels", "fine_label", "target")
SPLIT_WORDS = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


def _datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise UserError(
            f"{setting('layout')} hf needs the datasets package; install it with pip install 'fewshot-sla[hf]'"
        ) from None


def source_files(root: Path) -> list[Path]:
    """The files of the folder (their sizes and times identify a re-run)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _split_of(path: Path, root: Path) -> str | None:
    for part in [path.name, *reversed(path.relative_to(root).parts[:-1])]:
        word = part.split("-")[0].split("_")[0].split(".")[0].lower()
        if word in SPLIT_WORDS:
            return word
    return None


def load(root: Path) -> dict[str, Any]:
    """The folder's splits, name -> ``datasets.Dataset`` (one named ``all`` for a single dataset)."""
    datasets = _datasets()
    if not root.is_dir():
        raise UserError(
            f"{setting('source')} {root} is not a folder; give a save_to_disk folder or a folder of parquet files"
        )
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(root))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the datasets folder {root}: {err}") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"all": loaded}
    parquet = sorted(root.rglob("*.parquet"))
    if not parquet:
        raise UserError(
            f"{root} holds neither a save_to_disk dataset (dataset_dict.json or state.json) nor parquet files; "
            "give the folder datasets wrote"
        )
    files: dict[str, list[str]] = {}
    for path in parquet:
        files.setdefault(_split_of(path, root) or "all", []).append(str(path))
    if "all" in files and len(files) > 1:
        raise UserError(
            f"{root}: some parquet files name their split (train, validation, test) and some do not "
            f"(e.g. {files['all'][0]}); keep one kind"
        )
    try:
        loaded = datasets.load_dataset("parquet", data_files=files)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the parquet files of {root}: {err}") from None
    return dict(loaded)


def _columns(split: Any, where: str) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the class names (None: name classes by label)."""
    datasets = _datasets()
    features = split.features
    images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    if not images:
        raise UserError(f"{where} has no column of images (feature type Image); its columns: {', '.join(features)}")
    labelled = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if labelled:
        return images[0], labelled[0], list(features[labelled[0]].names)
    named = [name for name in LABEL_COLUMNS if name in features]
    if not named:
        raise UserError(
            f"{where} has no label column (a ClassLabel, or one of {', '.join(LABEL_COLUMNS)}); its columns: "
            f"{', '.join(features)}"
        )
    return images[0], named[0], None


class Items:
    """The rows of one or more ``datasets`` splits as a map-style dataset of ``(PIL image, label)`` items, with
    ``classes`` and ``targets`` (what ``importers/torch_dataset.py`` reads) and each row's identifier."""

    def __init__(self, splits: dict[str, Any], where: str) -> None:
        self.splits: dict[str, tuple[Any, str]] = {}
        self.classes: list[str] | None = None
        self.targets: list[int] = []
        self.rows: list[tuple[str, int]] = []
        for split_name, split in splits.items():
            image, label, classes = _columns(split, f"{where} ({split_name})")
            if self.splits and classes != self.classes:
                raise UserError(f"{where}: the splits name their classes differently; give them one ClassLabel")
            self.classes = classes
            self.splits[split_name] = (split, image)
            self.targets += [int(t) for t in split[label]]
            self.rows += [(split_name, i) for i in range(len(split))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        split_name, row = self.rows[index]
        split, image = self.splits[split_name]
        return split[row][image], self.targets[index]

    def identifier(self, index: int) -> str:
        """``<split>/<row>``, or ``<row>`` for a single dataset."""
        split_name, row = self.rows[index]
        return str(row) if split_name == "all" else f"{split_name}/{row}"


def source_split(items: Items, where: str) -> SplitConvention | None:
    """The folder's own class split, when it holds train, val and test splits with disjoint classes; else None."""
    by_split: dict[str, set[str]] = {}
    for (split_name, _), label in zip(items.rows, items.targets, strict=True):
        word = SPLIT_WORDS.get(split_name)
        if word is None:
            return None
        by_split.setdefault(word, set()).add(items.classes[label] if items.classes else str(label))
    if set(by_split) != set(SPLIT_NAMES):
        return None
    if any(by_split[a] & by_split[b] for a, b in (("train", "val"), ("train", "test"), ("val", "test"))):
        return None
    small = [s for s in SPLIT_NAMES if len(by_split[s]) < MIN_SPLIT_CLASSES]
    if small:
        raise UserError(f"{where}: the {small[0]} split has fewer than {MIN_SPLIT_CLASSES} classes")
    classes = {split: sorted(by_split[split]) for split in SPLIT_NAMES}
    digest = hashlib.sha256(json.dumps({"name": "source", "classes": classes}, sort_keys=True).encode()).hexdigest()
    return SplitConvention(name="source", origin=where, classes=classes, files=None, digest=digest)
