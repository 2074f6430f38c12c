"""Shared pytest fixtures."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on small tensors more threads only add overhead, and their OpenMP
    workers stall badly when another job holds the second core of the CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data: raw-layout fixtures and a small synthetic set ------------------------------------------------


def _colour_of(index: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust solid colour for fixture image ``index`` (< 216), to recognise it after import."""
    return (20 + 40 * (index % 6), 20 + 40 * (index // 6 % 6), 20 + 40 * (index // 36 % 6))


@pytest.fixture
def ravi_source(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, tuple[int, int, int]]]]:
    """Factory: write a mini-ImageNet Ravi layout (``images/*.jpg`` + optional CSVs) of solid-colour JPEGs.

    ``make(classes={"train": [...], ...}, per_class=4, csvs=True)`` returns the source folder and the
    colour of every image file name.
    """

    def make(
        classes: dict[str, list[str]] | None = None, per_class: int = 4, csvs: bool = True, name: str = "ravi"
    ) -> tuple[Path, dict[str, tuple[int, int, int]]]:
        classes = classes or {
            "train": ["n00000001", "n00000002", "n00000003"],
            "val": ["n00000004", "n00000005"],
            "test": ["n00000006", "n00000007"],
        }
        source = tmp_path / name
        (source / "images").mkdir(parents=True)
        colours: dict[str, tuple[int, int, int]] = {}
        for split, wnids in classes.items():
            rows = []
            for wnid in wnids:
                for i in range(per_class):
                    file = f"{wnid}{2 * i + 1:08d}.jpg"  # odd numbers: indices need not be contiguous
                    colours[file] = _colour_of(len(colours))
                    size = (24 + 4 * (i % 3), 20)  # not square, and not all the same size
                    Image.new("RGB", size, colours[file]).save(source / "images" / file, quality=95)
                    rows.append([file, wnid])
            if csvs:
                with open(source / f"{split}.csv", "w", newline="") as f:
                    csv.writer(f).writerows([["filename", "label"], *rows])
        return source, colours

    return make


@pytest.fixture(scope="session", autouse=True)
def every_results_file_follows_the_schema(tmp_path_factory: pytest.TempPathFactory):
    """After the last test: every results.json the suite wrote (in this process or in subprocesses, all below
    pytest's temporary folder) is strict JSON that the shipped schema accepts. Files that are not JSON at all
    are the ones tests damage on purpose; files without the ``schema_version`` that ``write_results`` stamps are
    stand-ins that tests write by hand (e.g. the executors' fake cells)."""
    yield
    import json

    import jsonschema

    from fewshot_sla.results import SCHEMA_FILE

    def no_constants(constant: str) -> None:
        raise jsonschema.ValidationError(f"{constant} is not JSON")

    schema = json.loads(SCHEMA_FILE.read_text())
    wrong = []
    for path in sorted(tmp_path_factory.getbasetemp().rglob("results.json")):
        try:
            written = json.loads(path.read_text())
        except ValueError:
            continue
        if not isinstance(written, dict) or "schema_version" not in written:
            continue
        try:
            jsonschema.validate(json.loads(path.read_text(), parse_constant=no_constants), schema)
        except jsonschema.ValidationError as err:
            wrong.append(f"{path}: {err.message}")
    assert not wrong, "results.json files that break the schema:\n" + "\n".join(wrong)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the full synthetic store, generated once per test session."""
    from fewshot_sla.data.catalog import open_store

    root = tmp_path_factory.getbasetemp() / "synthetic-data"
    open_store("synthetic", root)
    return root


@pytest.fixture
def small_synthetic(monkeypatch: pytest.MonkeyPatch) -> int:
    """Make the synthetic set tiny (4 images per class) so tests that build its store run fast."""
    from fewshot_sla.data import synthetic

    monkeypatch.setattr(synthetic, "IMAGES_PER_CLASS", 4)
    return 4


@pytest.fixture
def two_datasets(tmp_path: Path, data_root: Path, ravi_source) -> Path:
    """A data root with the session's synthetic store and a small 'tinyimagenet' store (5 classes per split, 8
    images per class, 64x64)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "synthetic.h5").symlink_to(data_root / "synthetic.h5")
    wnids = [f"n{i:08d}" for i in range(1, 16)]
    source, _ = ravi_source(classes={"train": wnids[:5], "val": wnids[5:10], "test": wnids[10:]}, per_class=8)
    from fewshot_sla.cli import main

    assert main(["--data-root", str(root), "data", "prepare", "tinyimagenet", "--source", str(source)]) == 0
    return root
