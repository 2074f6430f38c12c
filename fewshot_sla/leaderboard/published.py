"""Published reference numbers (``published.csv``, shipped beside this module): what the literature reports.

One row per (method, backbone and its options, dataset, ways, shots): mean test accuracy in percent, written with
the digits the source printed (``98.8``, not ``98.80``: the verdicts count its rounding), and its 95% interval
(blank where the source gives none), the test protocol (backbone detail, test episodes, queries per
class when the source states it), the published training budget in episodes (``train_episodes``, blank when
unknown), the source and a reference. Leaderboards show these rows beside measured ones, marked as published,
and compare the runs that match one (``reproduction.py``).

``backbone_options`` holds the backbone's keyword options the source used, as ``key=value`` pairs separated by
``;`` (values read as YAML scalars: ``hidden=32; strided=true``); blank means the backbone's defaults. The columns
``backbone_options``, ``ci95`` values, ``test_episodes``, ``test_queries``, ``train_episodes``, ``backbone_detail``,
``reference`` and ``note`` may be left out or blank, so older tables still load.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from fewshot_sla.errors import UserError, setting
from fewshot_sla.io_errors import read_text
from fewshot_sla.package_data import published_table
from fewshot_sla.yaml_file import parse_yaml

DEFAULT_PUBLISHED = published_table()
COLUMNS = (
    "method",
    "backbone",
    "backbone_detail",
    "backbone_options",
    "dataset",
    "ways",
    "shots",
    "accuracy",
    "ci95",
    "test_episodes",
    "test_queries",
    "train_episodes",
    "source",
    "reference",
    "note",
)
# Columns every table has; all but ``ci95`` (blank: the source published no interval) must be filled in every row.
REQUIRED = ("method", "backbone", "dataset", "ways", "shots", "accuracy", "ci95", "source")
FILLED = tuple(c for c in REQUIRED if c != "ci95")
_OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class PublishedResult:
    """One published accuracy (percent) with the protocol it was measured under; ``ci95`` is None where the
    source gives no interval, ``train_episodes`` (episodes seen in meta-training) None where it is unknown."""

    method: str
    backbone: str
    backbone_detail: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    ci95: float | None
    test_episodes: int | None
    test_queries: int | None
    source: str
    reference: str
    note: str
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    train_episodes: int | None = None
    decimals: int | None = None  # digits after the point of ``accuracy`` as the table prints it (None: unknown)

    @property
    def rounding(self) -> float:
        """Half a unit of the accuracy's last printed digit (0.05 for ``98.8``): the published run's value lies
        within this of the printed one. 0 where the printed precision is unknown."""
        return 0.0 if self.decimals is None else 0.5 * 10.0**-self.decimals

    @property
    def digits(self) -> int:
        """Decimals to show the accuracy and its interval with: the source's (``98.8``: 1), else 2."""
        return 2 if self.decimals is None else self.decimals

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

    def options_text(self) -> str:
        """The backbone options as written in the table (``hidden=32; strided=true``); empty for the defaults."""
        return format_options(self.backbone_options)

    def citation(self) -> str:
        """Source and reference, e.g. ``Snell et al. 2017, arXiv:1703.05175``."""
        return f"{self.source}, {self.reference}" if self.reference else self.source


def load_published(path: str | Path = DEFAULT_PUBLISHED) -> list[PublishedResult]:
    """Read a published-number table; a malformed row is a UserError naming the file and row."""
    path = Path(path)
    text = read_text(
        path, "the published-number table", f"check {setting('published')} or pass {setting('no_published')}"
    )
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
        for column in FILLED:
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
                ci95=_number(row["ci95"], float, where, "ci95") if row["ci95"].strip() else None,
                test_episodes=_optional_int(row.get("test_episodes", ""), where, "test_episodes"),
                test_queries=_optional_int(row.get("test_queries", ""), where, "test_queries"),
                source=row["source"].strip(),
                reference=row.get("reference", "").strip(),
                note=row.get("note", "").strip(),
                backbone_options=parse_options(row.get("backbone_options", ""), where),
                train_episodes=_optional_int(row.get("train_episodes", ""), where, "train_episodes"),
                decimals=_decimals(row["accuracy"]),
            )
        )
    return rows


def _decimals(text: str) -> int | None:
    """Digits after the point as written (``98.8``: 1, ``49.42``: 2, ``98``: 0), None for a form without one."""
    try:
        exponent = Decimal(text.strip()).as_tuple().exponent
    except InvalidOperation:
        return None
    return max(0, -exponent) if isinstance(exponent, int) else None


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


def parse_options(text: str, where: str) -> dict[str, Any]:
    """``hidden=32; strided=true`` -> ``{"hidden": 32, "strided": True}`` (values as YAML scalars)."""
    options: dict[str, Any] = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not _OPTION_KEY.match(key) or not value:
            raise UserError(
                f"{where}: 'backbone_options' must be key=value pairs separated by ';' (e.g. hidden=32; "
                f"strided=true), got {text.strip()!r}"
            )
        if key in options:
            raise UserError(f"{where}: 'backbone_options' gives '{key}' twice")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError:
            parsed = None
        if not isinstance(parsed, (bool, int, float, str)):
            raise UserError(f"{where}: backbone option '{key}' must be a number, true/false or a word, got {value!r}")
        options[key] = parsed
    return options


def format_options(options: Mapping[str, Any]) -> str:
    """Backbone options as ``key=value`` pairs in key order, the way the table writes them."""

    def text(value: Any) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)

    return "; ".join(f"{key}={text(options[key])}" for key in sorted(options))
