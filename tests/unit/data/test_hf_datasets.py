"""A Hugging Face datasets folder as a store (``--layout hf``): save_to_disk folders and parquet files, the folder's
own class split when it has one, the seeded split otherwise, and one line for each mistake."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.data.catalog import open_store

datasets = pytest.importorskip("datasets")

NAMES = [f"glyph{c:02d}" for c in range(12)]


def colour(c: int, i: int) -> tuple[int, int, int]:
    return (10 + 20 * c, 40 + 50 * i, 200 - 10 * c)


def split_of(classes: list[int], per_class: int = 3):
    rows = [(c, i) for c in classes for i in range(per_class)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(np.full((10, 12, 3), colour(c, i), dtype=np.uint8)) for c, i in rows],
            "label": [c for c, _ in rows],
        },
        features=features,
    )


def prepare(tmp_path, source, capsys, *extra: str) -> tuple[int, str]:
    args = ["--data-root", str(tmp_path / "data"), "data", "prepare", "glyphs", "--layout", "hf"]
    code = main([*args, "--source", str(source), "--image-size", "8", *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def splits(tmp_path) -> dict:
    store = open_store("glyphs", tmp_path / "data")
    return {name: store.split(name) for name in ("train", "val", "test")}


def test_a_release_with_its_own_class_split_keeps_it(tmp_path, capsys) -> None:
    folder = tmp_path / "release"
    datasets.DatasetDict(
        {"train": split_of(list(range(8))), "validation": split_of([8, 9]), "test": split_of([10, 11])}
    ).save_to_disk(str(folder))
    code, out = prepare(tmp_path, folder, capsys)
    assert code == 0, out
    assert "split: the folder's own train/validation/test classes" in out
    got = splits(tmp_path)
    assert got["val"].class_names == NAMES[8:10] and got["test"].class_names == NAMES[10:]
    for split in got.values():
        for row, ident in enumerate(split.image_ids):
            c = NAMES.index(split.class_names[int(split.labels[row])])
            name, index = ident.split("/")
            assert name in ("train", "validation", "test")
            np.testing.assert_array_equal(
                split.images[row].numpy(), np.broadcast_to(colour(c, int(index) % 3), (8, 8, 3))
            )
    code, out = prepare(tmp_path, folder, capsys)
    assert code == 0 and "already prepared from this source" in out


def test_parquet_files_give_the_store_of_the_saved_folder(tmp_path, capsys) -> None:
    parts = {"train": split_of(list(range(8))), "validation": split_of([8, 9]), "test": split_of([10, 11])}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for name, part in parts.items():
        part.to_parquet(str(tmp_path / "hub" / "data" / f"{name}-00000-of-00001.parquet"))
    assert prepare(tmp_path, tmp_path / "saved", capsys)[0] == 0
    saved = splits(tmp_path)
    assert prepare(tmp_path, tmp_path / "hub", capsys, "--force")[0] == 0
    for name, split in splits(tmp_path).items():
        assert split.image_ids == saved[name].image_ids and split.class_names == saved[name].class_names
        np.testing.assert_array_equal(split.images.numpy(), saved[name].images.numpy())


def test_splits_sharing_classes_are_joined_and_split_by_classes(tmp_path, capsys) -> None:
    folder = tmp_path / "shared"
    datasets.DatasetDict({"train": split_of(list(range(12))), "test": split_of(list(range(12)))}).save_to_disk(
        str(folder)
    )
    code, out = prepare(tmp_path, folder, capsys, "--split-seed", "3")
    assert code == 0 and "split: seeded 0.64/0.16/0.2 seed 3" in out
    got = splits(tmp_path)
    assert sorted(n for s in got.values() for n in s.class_names) == NAMES  # classes are split, never images
    assert all(len(s.image_ids) == 6 * len(s.class_names) for s in got.values())  # 3 from each source split


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("nothing", "holds neither a save_to_disk dataset (dataset_dict.json or state.json) nor parquet files"),
        ("no-images", "has no column of images (feature type Image); its columns: label, pixels"),
        (
            "no-labels",
            "has no label column (a ClassLabel, or one of label, labels, fine_label, target); its columns: img",
        ),
        ("file", "is not a folder; give a save_to_disk folder or a folder of parquet files"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, make: str, expected: str) -> None:
    source = tmp_path / "source"
    if make == "nothing":
        source.mkdir()
    elif make == "no-images":
        datasets.Dataset.from_dict({"label": [0, 1], "pixels": [[1, 2], [3, 4]]}).save_to_disk(str(source))
    elif make == "no-labels":
        split_of(list(range(12))).remove_columns("label").save_to_disk(str(source))
    else:
        source.write_text("not a folder")
    code, out = prepare(tmp_path, source, capsys)
    assert code == 2
    lines = [line for line in out.splitlines() if line.startswith("fewshot-sla: error:")]
    assert len(lines) == 1 and expected in lines[0], out
    assert not (tmp_path / "data" / "glyphs.h5").exists()
