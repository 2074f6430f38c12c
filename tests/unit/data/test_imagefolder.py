"""Datasets of the user's own images: ``data prepare NAME --source DIR --layout imagefolder``, its class split
(seeded or a split file), and the prepared store in ``data info``, ``run``, episode sets and grids; every bad
input one line, exit code 2, and nothing left in the data root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.config.grid import load_grid
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.importers.imagefolder import DEFAULT_FRACTIONS, seeded_split, split_sizes
from fewshot_sla.data.store import SPLIT_NAMES, DatasetStore
from fewshot_sla.episodes import CanonicalOrder, EpisodeSet, EpisodeSpec
from fewshot_sla.errors import UserError

CLASSES = [f"class{c}" for c in range(8)]
PER_CLASS = 6
SIZE = ["--image-size", "16"]


def colour(c: int, i: int) -> tuple[int, int, int]:
    """A distinct solid colour per image, to recognise it in the store."""
    return (20 + 28 * c, 240 - 36 * i, 60 + 10 * c + 5 * i)


def make_folder(root: Path, classes: list[str] = CLASSES, per_class: int = PER_CLASS) -> dict[str, tuple]:
    """``root/<class>/img<i>.png`` solid-colour images of mixed sizes (plus files that are not images); the
    colour of each identifier."""
    colours: dict[str, tuple] = {}
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rel = f"{name}/img{i}.png" if i < per_class - 1 else f"{name}/nested/img{i}.png"
            (root / rel).parent.mkdir(exist_ok=True)
            Image.new("RGB", (12 + 5 * i, 9 + 3 * c), colour(c, i)).save(root / rel)
            colours[rel] = colour(c, i)
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"not read")
    return colours


def cli(capsys: pytest.CaptureFixture, root: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--data-root", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err.split("\r")[-1]  # what a terminal shows after the progress bar erased itself


def prepare(capsys: pytest.CaptureFixture, root: Path, source: Path, *extra: str, name: str = "mine") -> str:
    code, out, err = cli(
        capsys, root, "data", "prepare", name, "--source", str(source), "--layout", "imagefolder", *extra
    )
    assert code == 0, err
    return out


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, tuple]]:
    folder = tmp_path / "photos"
    return folder, make_folder(folder)


def test_the_store_holds_every_image_once_with_its_class_and_relative_path(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    folder, colours = source
    root = tmp_path / "data"
    Image.new("L", (10, 10), 128).save(folder / "class0" / "grey.png")  # greyscale and palette become RGB
    Image.new("RGB", (10, 10), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "class1" / "palette.gif"
    )
    colours["class0/grey.png"] = (128, 128, 128)
    colours["class1/palette.gif"] = (200, 10, 10)
    prepare(capsys, root, folder, *SIZE)
    store = open_store("mine", root)
    assert store.image_size == 16 and store.attrs["user_dataset"] == "imagefolder"
    seen: list[str] = []
    for split in SPLIT_NAMES:
        loaded = store.split(split)
        assert loaded.images.shape[1:] == (16, 16, 3)
        for row, ident in enumerate(loaded.image_ids):
            assert loaded.class_names[int(loaded.labels[row])] == ident.split("/")[0]
            pixels = loaded.images[row].numpy().reshape(-1, 3).astype(int)
            assert np.abs(pixels - np.array(colours[ident])).max() <= 2, ident
        seen += loaded.image_ids
    assert sorted(seen) == sorted(colours) and len(seen) == len(set(seen)) == 8 * PER_CLASS + 2
    assert "class3/nested/img5.png" in seen  # images in subfolders of a class folder belong to it


def test_the_seeded_split_is_deterministic_and_follows_the_fractions(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    names = [f"c{i}" for i in range(10)]
    # A fixed expectation: the same classes give the same split on every machine (sorted names, default_rng).
    assert seeded_split(names, DEFAULT_FRACTIONS, 0) == {
        "train": ["c2", "c3", "c4", "c5", "c6", "c7"],
        "val": ["c0", "c9"],
        "test": ["c1", "c8"],
    }
    assert seeded_split(list(reversed(names)), DEFAULT_FRACTIONS, 0) == seeded_split(names, DEFAULT_FRACTIONS, 0)
    assert seeded_split(names, DEFAULT_FRACTIONS, 1) != seeded_split(names, DEFAULT_FRACTIONS, 0)
    many = seeded_split([f"k{i:03d}" for i in range(100)], DEFAULT_FRACTIONS, 3)
    assert [len(many[s]) for s in SPLIT_NAMES] == [64, 16, 20]
    assert sorted(name for split in many.values() for name in split) == [f"k{i:03d}" for i in range(100)]
    # Val and test: fraction x classes rounded half up, at least 2 each; train the rest.
    assert split_sizes(10, (0.5, 0.25, 0.25)) == (4, 3, 3)
    assert split_sizes(8, DEFAULT_FRACTIONS) == (4, 2, 2) and split_sizes(6, DEFAULT_FRACTIONS) == (2, 2, 2)
    folder, _ = source
    root = tmp_path / "data"
    out = prepare(capsys, root, folder, *SIZE, "--split-fractions", "0.5,0.25,0.25", "--split-seed", "7")
    assert "seeded 0.5/0.25/0.25 seed 7" in out
    store = DatasetStore(root / "mine.h5")
    expected = seeded_split(CLASSES, (0.5, 0.25, 0.25), 7)
    assert {s: store.split(s).class_names for s in SPLIT_NAMES} == expected
    assert "already prepared" in prepare(
        capsys, root, folder, *SIZE, "--split-fractions", "0.5,0.25,0.25", "--split-seed", "7"
    )
    assert "wrote" in prepare(capsys, root, folder, *SIZE, "--split-seed", "8")  # another split: a new store


def test_the_split_file_is_obeyed(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    folder, _ = source
    split_file = tmp_path / "split.csv"
    split_file.write_text(
        "class,split\n# my split\n\nclass0,test\nclass1,test\nclass2,val\nclass3,val\n"
        + "".join(f"class{c},train\n" for c in range(4, 8))
    )
    root = tmp_path / "data"
    prepare(capsys, root, folder, *SIZE, "--split-file", str(split_file))
    store = DatasetStore(root / "mine.h5")
    assert store.split("test").class_names == ["class0", "class1"]
    assert store.split("val").class_names == ["class2", "class3"]
    assert store.split("train").class_names == ["class4", "class5", "class6", "class7"]
    assert store.attrs["split_convention"] == f"split-file {split_file.resolve()}"


def test_data_info_run_and_episode_sets_use_the_prepared_store(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    folder, _ = source
    root = tmp_path / "data"
    prepare(capsys, root, folder, *SIZE)
    code, out, _ = cli(capsys, root, "data", "info", "mine", "--json")
    assert code == 0 and json.loads(out)["splits"]["train"] == {"classes": 4, "images": 4 * PER_CLASS}
    code, out, _ = cli(capsys, root, "data", "info")
    assert code == 0 and "mine: " in out and "source format imagefolder, image size 16" in out
    # A fixed episode set drawn from the store (what 'episodes make' does), used by a run.
    test = open_store("mine", root).split("test")
    spec = EpisodeSpec(2, 1, 1)
    episodes = EpisodeSet.make(CanonicalOrder.of_split(test), dataset="mine", split="test", spec=spec, count=4, seed=0)
    episodes.save(tmp_path / "set.npz")
    tiny = ["--train-episodes", "2", "--val-episodes", "2", "--ways", "2", "--shots", "1", "--queries", "1"]
    tiny += ["--train-ways", "2", "--train-queries", "1", "--image-size", "16", "--backbone-option", "hidden=8"]
    code, out, err = cli(
        capsys,
        root,
        "run",
        "--dataset",
        "mine",
        *tiny,
        "--episodes-file",
        str(tmp_path / "set.npz"),
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "mine" and results["dataset_fingerprint"] == open_store("mine", root).fingerprint
    code, _, err = cli(
        capsys, root, "run", "--dataset", "notmine", *tiny, "--device", "cpu", "--out", str(tmp_path / "r2")
    )
    assert code == 2 and "unknown dataset 'notmine'" in err and "--layout imagefolder" in err and err.count("\n") == 1
    assert not (tmp_path / "r2").exists()


def test_episodes_make_draws_from_the_store(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    folder, _ = source
    root = tmp_path / "data"
    prepare(capsys, root, folder, *SIZE)
    out = tmp_path / "set.npz"
    code, _, err = cli(
        capsys, root, "episodes", "make", "--dataset", "mine", "--ways", "2", "--queries", "1", "--count", "3",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert EpisodeSet.load(out).dataset == "mine"


def test_identifiers_resolve_in_any_store_of_the_same_collection(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    folder, _ = source
    prepare(capsys, tmp_path / "a", folder, "--image-size", "8")
    prepare(capsys, tmp_path / "b", folder, "--image-size", "12", "--workers", "2")
    small, large = open_store("mine", tmp_path / "a").split("test"), open_store("mine", tmp_path / "b").split("test")
    assert small.image_ids == large.image_ids and small.class_names == large.class_names
    episodes = EpisodeSet.make(
        CanonicalOrder.of_split(small), dataset="mine", split="test", spec=EpisodeSpec(2, 1, 1), count=3, seed=0
    )
    episodes.rows_in(large, "mine")  # raises when an identifier is missing or has another class


def test_a_grid_accepts_a_user_dataset_in_its_data_root(
    tmp_path: Path, source: tuple[Path, dict[str, tuple]], capsys: pytest.CaptureFixture
) -> None:
    folder, _ = source
    prepare(capsys, tmp_path / "data", folder, *SIZE)
    grid = (
        "data_root: data\ndatasets: [DATASET]\nmethods: [protonet]\nbackbones: conv4\n"
        "variants:\n  - {transform: none, objective: baseline}\nshots: [1]\nways: [2]\n"
    )
    path = tmp_path / "grid.yaml"
    path.write_text(grid.replace("DATASET", "mine"))
    assert {cell.config.dataset for cell in load_grid(path).cells} == {"mine"}
    path.write_text(grid.replace("DATASET", "theirs"))
    with pytest.raises(UserError, match=r'unknown dataset \'theirs\'.*prepare_image_folder\("theirs", source="DIR"\)'):
        load_grid(path)


def _folder_with(tmp_path: Path, change: str) -> Path:
    """A source folder with one thing wrong."""
    folder = tmp_path / "photos"
    if change == "missing":
        return folder
    folder.mkdir()
    if change == "empty":
        return folder
    make_folder(folder, CLASSES[:5] if change == "five classes" else CLASSES)
    if change == "class without images":
        (folder / "class9").mkdir()
        (folder / "class9" / "readme.txt").write_text("no images here")
    if change == "unreadable image":
        (folder / "class2" / "broken.jpg").write_bytes(b"not a jpeg")
    if change == "image outside class folders":
        Image.new("RGB", (8, 8)).save(folder / "loose.png")
    return folder


def _split_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "split.csv"
    path.write_text(text)
    return str(path)


_GOOD_ROWS = "class0,train\nclass1,train\nclass2,train\nclass3,train\nclass4,val\nclass5,val\nclass6,test\n"

BAD = {
    "built-in name": ("ok", lambda t: ["--layout", "imagefolder"], "'cub' is a built-in dataset; choose another name"),
    "no --layout": ("ok", lambda t: [], "unknown dataset 'mine': to prepare your own images pass --layout imagefolder"),
    "missing folder": ("missing", lambda t: ["--layout", "imagefolder"], "does not exist"),
    "empty folder": ("empty", lambda t: ["--layout", "imagefolder"], "is empty"),
    "class without images": ("class without images", lambda t: ["--layout", "imagefolder"], "class9 holds no images"),
    "five classes": ("five classes", lambda t: ["--layout", "imagefolder"], "has 5 class folder(s); a dataset needs"),
    "unreadable image": ("unreadable image", lambda t: ["--layout", "imagefolder"], "broken.jpg (cannot decode"),
    "loose image": ("image outside class folders", lambda t: ["--layout", "imagefolder"], "outside class folders"),
    "two fractions": ("ok", lambda t: ["--layout", "imagefolder", "--split-fractions", "0.5,0.5"], "three numbers"),
    "words as fractions": ("ok", lambda t: ["--layout", "imagefolder", "--split-fractions", "a,b,c"], "three numbers"),
    "fractions not summing to 1": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-fractions", "0.6,0.2,0.3"],
        "must sum to 1",
    ),
    "negative fraction": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-fractions", "1.2,-0.1,-0.1"],
        "must all be positive",
    ),
    "fractions leaving train too few": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-fractions", "0.1,0.45,0.45"],
        "leave 0 of 8 classes for the train split",
    ),
    "bad split-file row": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, "class,split\nclass0,train,x\n")],
        "line 2: expected 'class,split'",
    ),
    "unknown split name": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, "class0,training\n")],
        "line 1: expected 'class,split' with split train, val or test",
    ),
    "unknown class": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, _GOOD_ROWS + "dog,test\n")],
        "line 8: no class folder 'dog'",
    ),
    "class in two splits": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, _GOOD_ROWS + "class0,test\n")],
        "line 8: class 'class0' is already listed on line 1",
    ),
    "unlisted class": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, _GOOD_ROWS)],
        "does not list 1 class(es) (class7)",
    ),
    "missing split": (
        "ok",
        lambda t: [
            "--layout",
            "imagefolder",
            "--split-file",
            _split_file(t, "".join(f"class{c},{'train' if c < 5 else 'val'}\n" for c in range(8))),
        ],
        "gives the test split 0 class(es)",
    ),
    "missing split file": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", str(t / "nope.csv")],
        "--split-file",
    ),
    "split file and fractions": (
        "ok",
        lambda t: ["--layout", "imagefolder", "--split-file", _split_file(t, _GOOD_ROWS), "--split-seed", "1"],
        "drop --split-fractions / --split-seed",
    ),
    "seed instead of split seed": ("ok", lambda t: ["--layout", "imagefolder", "--seed", "1"], "--split-seed"),
    "bad name": ("ok", lambda t: ["--layout", "imagefolder"], "must be one word"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    change, extra, message = BAD[case]
    folder = _folder_with(tmp_path, change)
    name = {"built-in name": "cub", "bad name": "../escape"}.get(case, "mine")
    root = tmp_path / "data"
    code, _, err = cli(capsys, root, "data", "prepare", name, "--source", str(folder), *SIZE, *extra(tmp_path))
    assert code == 2 and message in err, err
    assert err.startswith("fewshot-sla: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert leftovers(root) == []
    assert not (tmp_path / "escape.h5").exists()


def test_skip_bad_counts_and_skips_an_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _folder_with(tmp_path, "unreadable image")
    root = tmp_path / "data"
    out = prepare(capsys, root, folder, *SIZE, "--skip-bad")
    assert "skipped 1 unreadable image(s)" in out and "broken.jpg" in out
    store = DatasetStore(root / "mine.h5")
    ids = [i for s in SPLIT_NAMES for i in store.split(s).image_ids]
    assert len(ids) == 8 * PER_CLASS and "class2/broken.jpg" not in ids and store.attrs["skipped_images"] == 1


def test_tiny_imagenet_200s_release_reads_as_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``tiny-imagenet-200/train/<wnid>/images/*.JPEG`` beside ``<wnid>_boxes.txt``: the class folders are the wnids,
    the images sit one folder down, the box files are not images."""
    train = tmp_path / "tiny-imagenet-200" / "train"
    wnids = [f"n0{i:07d}" for i in range(8)]
    for c, wnid in enumerate(wnids):
        (train / wnid / "images").mkdir(parents=True)
        (train / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
        for i in range(3):
            Image.new("RGB", (16, 16), colour(c, i)).save(train / wnid / "images" / f"{wnid}_{i}.JPEG", quality=95)
    args = ["--data-root", str(tmp_path / "data"), "data", "prepare", "tiny200", "--layout", "imagefolder"]
    assert main([*args, "--source", str(train), "--image-size", "16"]) == 0
    store = open_store("tiny200", tmp_path / "data")
    splits = [store.split(name) for name in SPLIT_NAMES]
    assert sorted(n for s in splits for n in s.class_names) == wnids
    assert all(i.split("/")[1] == "images" and i.endswith(".JPEG") for s in splits for i in s.image_ids)
    assert sum(len(s.image_ids) for s in splits) == 24
