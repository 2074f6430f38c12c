"""Split conventions: which classes (and, for mini-ImageNet, which files) form train / val / test.

The canonical lists ship as package data under ``fewshot_sla/data/splits/`` (copied verbatim from their
MIT-licensed sources, licences beside them); a folder of files in the same format can replace them.
Formats: ``ravi-csv`` ({train,val,test}.csv with ``filename,label``), ``class-json`` (a JSON list of
class names per split), ``superclass-json`` (FC100: a JSON list of CIFAR-100 superclasses per split),
``pair-json`` (CIFAR-FS: a JSON list of ``[superclass, fine class]`` pairs per split) and ``tiered-csv``
(tieredImageNet, Ren et al.'s files: {train,val,test}.csv with one ``wnid,superclass wnid`` row per class);
``omniglot-json`` (torchmeta's Omniglot lists: ``{"background"|"evaluation": {alphabet: [characterNN, ...]}}``, a
class per character, ``Alphabet/characterNN``) and ``omniglot-rotated-json`` (the same lists, each character as four
classes ``Alphabet/characterNN/rotDDD``, rotated by 0, 90, 180 and 270 degrees: Vinyals et al. 2016).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import io_error

if TYPE_CHECKING:
    from importlib.abc import Traversable

SPLIT_FORMATS = (
    "ravi-csv",
    "class-json",
    "superclass-json",
    "pair-json",
    "tiered-csv",
    "omniglot-json",
    "omniglot-rotated-json",
)
OMNIGLOT_ROTATIONS = (0, 90, 180, 270)
# The CIFAR-FS pair lists cover all 100 CIFAR-100 fine classes once: the fine -> superclass table.
_CIFAR_PAIRS = "torchmeta/cifar100/cifar-fs"


@dataclass(frozen=True)
class SplitConvention:
    """The classes of each split (sorted), plus the ordered file names of each class for ``ravi-csv``."""

    name: str
    origin: str
    classes: dict[str, list[str]]
    files: dict[str, dict[str, list[str]]] | None
    digest: str

    def describe(self) -> str:
        """How the store records it: the convention's name, and the folder its files came from if not packaged."""
        return self.name if self.origin == "packaged" else f"{self.name} from {self.origin}"


def packaged_splits() -> Traversable:
    """The folder of split lists shipped inside the package."""
    return resources.files("fewshot_sla.data") / "splits"


def load_convention(
    name: str, split_format: str, packaged: str | None, split_dir: Path | None = None
) -> SplitConvention:
    """Read a convention from the packaged folder ``packaged`` or, when given, from ``split_dir``.

    Split files from ``split_dir`` keep the convention's ``name`` when they are byte-identical to the
    packaged ones (or when the dataset packages none), and are called ``custom`` otherwise.
    """
    if split_format not in SPLIT_FORMATS:
        raise ValueError(f"unknown split format {split_format!r}")
    ext = "csv" if split_format in ("ravi-csv", "tiered-csv") else "json"
    if packaged is None and split_dir is None:
        raise UserError(
            f"the '{name}' split has no packaged split files; the source must hold train/val/test.{ext} "
            f"beside images/, or pass {setting('split_dir')} DIR"
        )
    shipped = packaged_splits() / packaged if packaged is not None else None
    folder: Traversable
    if split_dir is not None:
        folder = split_dir
    else:
        assert shipped is not None  # one of the two is given (checked above)
        folder = shipped
    contents = {split: _read_split_file(folder, split, ext) for split in SPLIT_NAMES}
    digest = _digest(split_format, contents)
    if split_dir is not None and shipped is not None:
        canonical = _digest(split_format, {split: _read_split_file(shipped, split, ext) for split in SPLIT_NAMES})
        name = name if digest == canonical else "custom"
    classes: dict[str, list[str]] = {}
    files: dict[str, dict[str, list[str]]] = {}
    for split, raw in contents.items():
        entry = folder / f"{split}.{ext}"
        if split_format == "ravi-csv":
            files[split] = _parse_ravi_csv(entry, raw)
            classes[split] = sorted(files[split])
        elif split_format == "tiered-csv":
            classes[split] = sorted(parse_superclass_csv(entry, raw))
        else:
            classes[split] = _parse_json_split(entry, raw, split_format)
    _check_disjoint(classes, folder)
    return SplitConvention(
        name=name,
        origin="packaged" if split_dir is None else str(split_dir),
        classes=classes,
        files=files if split_format == "ravi-csv" else None,
        digest=digest,
    )


def _read_split_file(folder: Traversable, split: str, ext: str) -> bytes:
    entry = folder / f"{split}.{ext}"
    if not entry.is_file():
        raise UserError(f"split file {entry} is missing; a split folder needs {{train,val,test}}.{ext}")
    try:
        return entry.read_bytes()
    except OSError as err:
        raise io_error(err, str(entry), "read the split file") from None


def _text(entry: Traversable, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"split file {entry} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8 text"
        ) from None


def _digest(split_format: str, contents: dict[str, bytes]) -> str:
    """sha256 of the split files' bytes: equal digests mean the same split (and part of a store's re-run key)."""
    digest = hashlib.sha256(split_format.encode())
    for raw in contents.values():
        digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def _parse_ravi_csv(entry: Traversable, raw: bytes) -> dict[str, list[str]]:
    """``filename,label`` rows -> class -> file names in file order."""
    reader = csv.reader(io.StringIO(_text(entry, raw)))
    header = next(reader, None)
    if header != ["filename", "label"]:
        raise UserError(f"split file {entry} must start with the header 'filename,label' (Ravi format)")
    per_class: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise UserError(f"split file {entry} line {line}: expected 'filename,label', got {','.join(row)!r}")
        if row[0] in seen:
            raise UserError(f"split file {entry} line {line}: {row[0]} is listed twice; list each image once")
        seen.add(row[0])
        per_class.setdefault(row[1], []).append(row[0])
    if not per_class:
        raise UserError(f"split file {entry} lists no images; fill it or remove {setting('split_dir')}")
    return per_class


def parse_superclass_csv(entry: Traversable, raw: bytes) -> dict[str, str]:
    """``wnid,superclass`` rows (Ren et al.'s tieredImageNet files; no header, blank lines ignored) as
    {class: superclass}."""
    table: dict[str, str] = {}
    for line, row in enumerate(csv.reader(io.StringIO(_text(entry, raw))), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"split file {entry} line {line}: expected 'class,superclass', got {','.join(row)!r}")
        name = row[0].strip()
        if name in table:
            raise UserError(f"split file {entry} line {line}: {name} is listed twice; list each class once")
        table[name] = row[1].strip()
    if not table:
        raise UserError(f"split file {entry} lists no classes")
    return table


def _parse_json_split(entry: Traversable, raw: bytes, split_format: str) -> list[str]:
    try:
        items = json.loads(_text(entry, raw))
    except json.JSONDecodeError as err:
        raise UserError(f"split file {entry} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if split_format.startswith("omniglot-"):
        names = _omniglot_classes(entry, items, rotated=split_format == "omniglot-rotated-json")
    elif split_format == "pair-json":
        ok = isinstance(items, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in items
        )
        if not ok:
            raise UserError(f"split file {entry} must be a JSON list of [superclass, class] pairs")
        names = [fine for _, fine in items]
    else:
        if not (isinstance(items, list) and all(isinstance(s, str) for s in items)):
            raise UserError(f"split file {entry} must be a JSON list of class names")
        names = items
        if split_format == "superclass-json":
            names = cifar100_fine_classes_of(items, entry)
    if not names:
        raise UserError(f"split file {entry} lists no classes")
    if len(set(names)) != len(names):
        raise UserError(f"split file {entry} lists a class twice")
    return sorted(names)


def _omniglot_classes(entry: Traversable, items: object, rotated: bool) -> list[str]:
    """torchmeta's ``{set: {alphabet: [character, ...]}}`` -> ``Alphabet/characterNN`` (``/rotDDD`` x 4 if rotated)."""
    ok = isinstance(items, dict) and all(
        isinstance(alphabets, dict)
        and all(isinstance(chars, list) and all(isinstance(c, str) for c in chars) for chars in alphabets.values())
        for alphabets in items.values()
    )
    if not ok:
        raise UserError(f"split file {entry} must map each image set to {{alphabet: [character, ...]}} (torchmeta)")
    assert isinstance(items, dict)
    characters = [
        f"{alphabet}/{c}" for alphabets in items.values() for alphabet, chars in alphabets.items() for c in chars
    ]
    if not rotated:
        return characters
    return [f"{c}/rot{degrees:03d}" for c in characters for degrees in OMNIGLOT_ROTATIONS]


def _check_disjoint(classes: dict[str, list[str]], folder: Traversable) -> None:
    seen: dict[str, str] = {}
    for split, names in classes.items():
        for name in names:
            if name in seen:
                raise UserError(f"class '{name}' is in both the {seen[name]} and {split} split files of {folder}")
            seen[name] = split


def cifar100_fine_to_coarse() -> dict[str, str]:
    """CIFAR-100 fine class name -> superclass name, read from the packaged CIFAR-FS pair lists."""
    table: dict[str, str] = {}
    for split in SPLIT_NAMES:
        for coarse, fine in json.loads((packaged_splits() / _CIFAR_PAIRS / f"{split}.json").read_bytes()):
            table[fine] = coarse
    return table


def cifar100_fine_names() -> list[str]:
    """The 100 CIFAR-100 fine class names in label order (the dataset numbers them alphabetically)."""
    return sorted(cifar100_fine_to_coarse())


def cifar100_fine_classes_of(superclasses: list[str], entry: Traversable | str) -> list[str]:
    """All fine classes belonging to the given CIFAR-100 superclasses (FC100's split rule)."""
    table = cifar100_fine_to_coarse()
    unknown = sorted(set(superclasses) - set(table.values()))
    if unknown:
        raise UserError(f"split file {entry} names unknown CIFAR-100 superclasses: {', '.join(unknown)}")
    wanted = set(superclasses)
    return [fine for fine, coarse in table.items() if coarse in wanted]
