"""mini-ImageNet in the Ravi & Larochelle layout: ``images/<file>.jpg`` plus ``{train,val,test}.csv``.

The CSVs beside ``images/`` (when present) define the split; otherwise the packaged Ravi CSVs do. Image
identifiers are the file names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fewshot_sla.data.conventions import SplitConvention
from fewshot_sla.data.importers.common import (
    Layout,
    RawSplit,
    files_of,
    some_classes,
    stack_split,
)
from fewshot_sla.data.store import SPLIT_NAMES
from fewshot_sla.errors import UserError, setting

CSV_NAMES = tuple(f"{s}.csv" for s in SPLIT_NAMES)


def _locate(source: Path) -> Path | None:
    return source if (source / "images").is_dir() else None


def _split_dir(root: Path) -> Path | None:
    present = [n for n in CSV_NAMES if (root / n).is_file()]
    if not present:
        return None
    if len(present) < len(CSV_NAMES):
        missing = ", ".join(n for n in CSV_NAMES if n not in present)
        raise UserError(f"{root} has {', '.join(present)} but not {missing}; add the missing split file(s)")
    return root


def _source_files(root: Path) -> list[Path]:
    return [root / n for n in CSV_NAMES if (root / n).is_file()] + sorted((root / "images").iterdir())


def _read(root: Path, convention: SplitConvention) -> Iterator[tuple[str, RawSplit]]:
    assert convention.files is not None
    images = root / "images"
    available = set(os.listdir(images))
    lacking = {
        wnid
        for split in SPLIT_NAMES
        for wnid, names in convention.files[split].items()
        if not any(name in available for name in names)
    }
    if lacking:
        raise UserError(
            f"{images} has no image of {some_classes(lacking)} named by the split files; "
            f"check {setting('source')}, or pass {setting('split_dir')} with matching split files"
        )
    for split in SPLIT_NAMES:
        class_names = convention.classes[split]
        ids = {wnid: convention.files[split][wnid] for wnid in class_names}
        paths = {wnid: [images / name for name in names] for wnid, names in ids.items()}
        labels, flat_paths, image_ids = stack_split(class_names, paths, ids)
        yield split, RawSplit(class_names, labels, image_ids, load=files_of(flat_paths))


RAVI = Layout(
    name="ravi-csv",
    summary="images/ with train.csv, val.csv, test.csv (Ravi & Larochelle)",
    locate=_locate,
    source_files=_source_files,
    read=_read,
    split_dir=_split_dir,
)
