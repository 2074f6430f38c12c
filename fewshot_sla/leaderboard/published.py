"""Published reference numbers (``published.csv``, shipped beside this module): what the literature reports.

One row per (method, backbone, dataset, ways, shots): mean test accuracy and 95% interval in percent, the
test protocol (backbone detail, test episodes, queries per class when the source states it), the source
and a reference. Leaderboards show these rows beside measured ones, marked as published.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from fewshot_sla.errors import UserError
from fewshot_sla.io_errors import read_text
from fewshot_sla.package_data import published_table

DEFAULT_PUBLISHED = published_table()
COLUMNS = (
    "method",
    "backbone",
    "backbone_detail",
    "dataset",
    "ways",
    "shots",
    "accuracy",
    "ci95",
    "test_episodes",
    "test_queries",
    "source",
    "reference",
    "note",
)
REQUIRED = ("method", "backbone", "dataset", "ways", "shots", "accuracy", "ci95", "source")


@dataclass(frozen=True)
class PublishedResult:
    """One published accuracy (percent) with the protocol it was measured under."""

    method: str
    backbone: str
    backbone_detail: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    ci95: float
    test_episodes: int | None
    test_queries: int | None
    source: str
    reference: str
    note: str

    def protocol(self) -> str:
        """Backbone, test episodes and queries, e.g. ``Conv-4 (64 filters), 600 test episodes``."""
        parts = [self.backbone_detail or self.backbone]
        if self.test_episodes:
            parts.append(f"{self.test_episodes} test episodes")
        if self.test_queries:
            parts.append(f"{self.test_queries} queries/class")
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def citation(self) -> str:
        """Source and reference, e.g. ``Snell et al. 2017, arXiv:1703.05175``."""
        return f"{self.source}, {self.reference}" if self.reference else self.source


def load_published(path: str | Path = DEFAULT_PUBLISHED) -> list[PublishedResult]:
    """Read a published-number table; a malformed row is a UserError naming the file and row."""
    path = Path(path)
    text = read_text(path, "the published-number table", "check --published or pass --no-published")
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; its header must be {','.join(COLUMNS)}")
    rows = []
    for line, row in enumerate(reader, start=2):
        where = f"{path} line {line}"
        if None in row or any(v is None for v in row.values()):
            raise UserError(f"{where}: wrong number of fields; the header has {len(header)}")
        for column in REQUIRED:
            if not row[column].strip():
                raise UserError(f"{where}: '{column}' is empty")
        rows.append(
            PublishedResult(
                method=row["method"].strip(),
                backbone=row["backbone"].strip(),
                backbone_detail=row.get("backbone_detail", "").strip(),
                dataset=row["dataset"].strip(),
                ways=int(_number(row["ways"], int, where, "ways")),
                shots=int(_number(row["shots"], int, where, "shots")),
                accuracy=_number(row["accuracy"], float, where, "accuracy"),
                ci95=_number(row["ci95"], float, where, "ci95"),
                test_episodes=_optional_int(row.get("test_episodes", ""), where, "test_episodes"),
                test_queries=_optional_int(row.get("test_queries", ""), where, "test_queries"),
                source=row["source"].strip(),
                reference=row.get("reference", "").strip(),
                note=row.get("note", "").strip(),
            )
        )
    return rows


def _number(text: str, kind: type, where: str, column: str) -> float | int:
    try:
        value = kind(text.strip())
    except ValueError:
        raise UserError(
            f"{where}: '{column}' must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{where}: '{column}' must be a non-negative number, got {text!r}")
    return value


def _optional_int(text: str, where: str, column: str) -> int | None:
    return int(_number(text, int, where, column)) if text and text.strip() else None
