"""A map-style torch Dataset as a store (``--layout torch``, ``api.prepare_torch_dataset``): classes, labels, images
and identifiers as the dataset gives them, the split by classes, every image type, and one line for each mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_sla import api
from fewshot_sla.cli import main
from fewshot_sla.data.catalog import open_store
from fewshot_sla.errors import UserError

CLASSES = [f"shape{c}" for c in range(12)]
PER_CLASS = 5


def colour(index: int) -> tuple[int, int, int]:
    return (10 + 20 * (index % 12), 10 + 40 * (index // 12 % 6), 200 - 30 * (index % 5))


class Shapes(torch.utils.data.Dataset):
    """12 classes x 5 solid-colour images, classes interleaved; ``kind`` picks the image type of the items."""

    def __init__(self, kind: str = "pil", targets: bool = True, names: bool = True) -> None:
        self.kind = kind
        self.labels = [i % len(CLASSES) for i in range(len(CLASSES) * PER_CLASS)]
        if targets:
            self.targets = list(self.labels)
        if names:
            self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        array = np.zeros((20, 24, 3), dtype=np.uint8) + np.array(colour(index), dtype=np.uint8)
        if self.kind == "tensor":  # as torchvision's ToTensor gives it
            image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        elif self.kind == "array":
            image = array
        else:
            image = Image.fromarray(array)
        return image, self.labels[index]


def stored(tmp_path, name: str = "shapes") -> dict:
    store = open_store(name, tmp_path)
    return {split: store.split(split) for split in ("train", "val", "test")}


def test_the_store_holds_the_datasets_classes_images_and_indices(tmp_path) -> None:
    api.prepare_torch_dataset("shapes", Shapes(), data_root=tmp_path, image_size=8)
    splits = stored(tmp_path)
    names = sorted(n for split in splits.values() for n in split.class_names)
    assert names == sorted(CLASSES)
    for split in splits.values():
        for row, ident in enumerate(split.image_ids):
            index = int(ident)
            assert split.class_names[int(split.labels[row])] == CLASSES[index % len(CLASSES)]
            np.testing.assert_array_equal(split.images[row].numpy(), np.broadcast_to(colour(index), (8, 8, 3)))
    assert sum(len(s.image_ids) for s in splits.values()) == len(CLASSES) * PER_CLASS


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_tensors_and_arrays_give_the_store_of_pil_images(tmp_path, kind: str) -> None:
    api.prepare_torch_dataset("shapes", Shapes(), data_root=tmp_path / "pil", image_size=8)
    api.prepare_torch_dataset("shapes", Shapes(kind), data_root=tmp_path / kind, image_size=8)
    assert open_store("shapes", tmp_path / "pil").fingerprint == open_store("shapes", tmp_path / kind).fingerprint


def test_without_targets_or_class_names_labels_come_from_the_items(tmp_path) -> None:
    api.prepare_torch_dataset("shapes", Shapes(targets=False, names=False), data_root=tmp_path, image_size=8)
    names = sorted(n for split in stored(tmp_path).values() for n in split.class_names)
    assert names == sorted(str(c) for c in range(len(CLASSES)))


def test_a_split_file_names_the_classes(tmp_path) -> None:
    split_file = tmp_path / "split.csv"
    rows = [f"{name},{'train' if c < 6 else 'val' if c < 9 else 'test'}" for c, name in enumerate(CLASSES)]
    split_file.write_text("\n".join(rows) + "\n")
    api.prepare_torch_dataset("shapes", Shapes(), data_root=tmp_path, image_size=8, split_file=split_file)
    assert stored(tmp_path)["test"].class_names == sorted(CLASSES[9:])


FACTORY = """\
import numpy as np
from PIL import Image

class Pairs:
    classes = [f"c{i}" for i in range(9)]
    def __len__(self):
        return 27
    def __getitem__(self, i):
        return Image.fromarray(np.full((6, 6, 3), 9 * i, dtype=np.uint8)), i % 9

def make():
    return Pairs()

def broken():
    raise RuntimeError("no data here")

def not_a_dataset():
    return 42
"""


def test_the_cli_reads_a_factory_and_trains_on_the_store(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "my_data.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    root = ["--data-root", str(tmp_path / "data")]
    prepare = [*root, "data", "prepare", "pairs", "--layout", "torch", "--source", "my_data:make", "--image-size", "8"]
    assert main(prepare) == 0
    assert "reading 27 images of 9 classes from my_data:make (torch)" in capsys.readouterr().out
    run = ["run", "--dataset", "pairs", "--ways", "2", "--train-ways", "2", "--queries", "1", "--train-queries", "1"]
    run += ["--train-episodes", "2", "--val-every", "2", "--image-size", "16"]
    run += ["--val-episodes", "2", "--eval-episodes", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r")]
    assert main([*root, *run]) == 0


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("my_data", "--layout torch needs --source MODULE:FACTORY (a function returning the dataset), got 'my_data'"),
        ("nowhere:make", "cannot import nowhere for --source nowhere:make"),
        ("my_data:absent", "my_data has no function absent for --source my_data:absent; check the name"),
        ("my_data:broken", "my_data:broken() failed: RuntimeError: no data here"),
        ("my_data:not_a_dataset", "my_data:not_a_dataset is a int, not a map-style dataset"),
    ],
    ids=["no-factory", "no-module", "no-function", "failing", "not-a-dataset"],
)
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, source: str, expected: str) -> None:
    (tmp_path / "my_data.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    args = ["--data-root", str(tmp_path / "data"), "data", "prepare", "pairs", "--layout", "torch", "--source", source]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "data" / "pairs.h5").exists()


def test_a_bad_item_is_named_and_can_be_skipped(tmp_path) -> None:
    class OneBad(Shapes):
        def __getitem__(self, index: int):
            image, label = super().__getitem__(index)
            return ("not an image" if index == 7 else image), label

    with pytest.raises(UserError, match=r"cannot read image item 7 \(its image is a str; give a PIL image"):
        api.prepare_torch_dataset("shapes", OneBad(), data_root=tmp_path, image_size=8)
    result = api.prepare_torch_dataset("shapes", OneBad(), data_root=tmp_path, image_size=8, skip_bad=True)
    assert result.skipped == ["item 7"]
