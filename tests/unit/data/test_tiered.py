"""tieredImageNet: the packaged Ren et al. split, and each raw layout written by the test in its exact format
(learn2learn / Ren PNG pickles, MetaOptNet npz + labels pickle, tiered-imagenet-tools class folders)."""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.cli import main
from fewshot_sla.data.conventions import packaged_splits
from fewshot_sla.data.importers.tiered import _npz_images
from fewshot_sla.data.prepare import prepare
from fewshot_sla.data.store import DatasetStore
from fewshot_sla.errors import UserError
from fewshot_sla.registry import DATASETS
from tests.unit.data.test_importers import _Py2Pickler

SPLITS = ("train", "val", "test")
SIZE = 8  # tiny images, stored at this size (no resizing: pixels are compared exactly)
PER_CLASS = 3


# --- the packaged split ---------------------------------------------------------------------------------


def _packaged_rows(split: str) -> list[list[str]]:
    text = (packaged_splits() / "tieredimagenet" / f"{split}.csv").read_text()
    return [row for row in csv.reader(io.StringIO(text)) if row]


def test_packaged_split_is_ren_et_al_351_97_160_classes_in_20_6_8_superclasses() -> None:
    counts = {}
    for split in SPLITS:
        rows = _packaged_rows(split)
        assert all(len(row) == 2 and row[0].startswith("n") and row[1].startswith("n") for row in rows)
        counts[split] = (len({r[0] for r in rows}), len({r[1] for r in rows}), len(rows))
    assert counts == {"train": (351, 20, 351), "val": (97, 6, 97), "test": (160, 8, 160)}
    classes = [{r[0] for r in _packaged_rows(s)} for s in SPLITS]
    supers = [{r[1] for r in _packaged_rows(s)} for s in SPLITS]
    assert len(set.union(*classes)) == 608 and len(set.union(*supers)) == 34  # disjoint splits
    info = DATASETS.get("tieredimagenet")
    assert info.image_size == 84 and info.split_format == "tiered-csv"


# --- writing raw layouts ------------------------------------------------------------------------------


def _as_py2(obj: object) -> object:
    if isinstance(obj, dict):
        return {_as_py2(k): _as_py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_py2(v) for v in obj]
    return obj.encode() if isinstance(obj, str) else obj


def _dump(obj: object, path: Path, py2: bool = False) -> None:
    with open(path, "wb") as f:
        if py2:
            _Py2Pickler(f, protocol=2).dump(_as_py2(obj))
        else:
            pickle.dump(obj, f, protocol=4)


def _rgb(code: int) -> np.ndarray:
    """A tiny RGB image whose pixels spell ``code`` (distinct channels, so a channel swap shows)."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = code % 251, code // 251 % 251, 200
    return image


def _code_of(image: np.ndarray) -> int:
    assert int(image[0, 0, 2]) == 200
    return int(image[0, 0, 0]) + 251 * int(image[0, 0, 1])


def _tiny_split(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """A --split-dir with the first 2 classes of each packaged split (rows verbatim)."""
    folder = tmp_path / "splits"
    folder.mkdir()
    classes = {}
    for split in SPLITS:
        rows = _packaged_rows(split)[:2]
        (folder / f"{split}.csv").write_text("".join(f"{a},{b}\n" for a, b in rows))
        classes[split] = [r[0] for r in rows]
    return folder, classes


def _rows(classes: dict[str, list[str]], split: str) -> list[tuple[str, int]]:
    """The source rows of a split: (wnid, global code), classes interleaved (the source is not sorted by class)."""
    offset = {"train": 0, "val": 100, "test": 200}[split]
    order = [classes[split][i % 2] for i in range(2 * PER_CLASS)][::-1]  # second class first, interleaved
    return [(wnid, offset + i) for i, wnid in enumerate(order)]


def _labels_dict(rows: list[tuple[str, int]], key: str = "label_specific") -> dict:
    wnids = sorted({w for w, _ in rows}, reverse=True)  # class numbers in the source's own (unsorted) order
    return {
        key: np.asarray([wnids.index(w) for w, _ in rows], dtype=np.int32),
        "label_general": np.zeros(len(rows), dtype=np.int32),
        "label_specific_str": wnids,
        "label_general_str": ["a superclass"],
    }


def _png_bytes(image: np.ndarray) -> np.ndarray:
    """As ``cv2.imencode('.png', ...)[1]`` returns it: a uint8 array [n, 1] of the PNG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(-1, 1).copy()


def _write_png_pickles(root: Path, classes: dict[str, list[str]], py2: bool = False) -> Path:
    folder = root / "tiered-imagenet"  # learn2learn's folder
    folder.mkdir(parents=True)
    for split in SPLITS:
        rows = _rows(classes, split)
        _dump([_png_bytes(_rgb(code)) for _, code in rows], folder / f"{split}_images_png.pkl", py2)
        labels = _labels_dict(rows)
        _dump(labels, folder / f"{split}_labels.pkl", py2)
    return folder


def _write_npz(
    root: Path, classes: dict[str, list[str]], compressed: bool = False, key: str = "label_specific"
) -> Path:
    folder = root / "tiered_imagenet"
    folder.mkdir(parents=True)
    save = np.savez_compressed if compressed else np.savez
    for split in SPLITS:
        rows = _rows(classes, split)
        bgr = np.stack([_rgb(code)[..., ::-1] for _, code in rows])  # as OpenCV wrote them
        save(folder / f"{split}_images.npz", images=bgr)
        _dump(_labels_dict(rows, key), folder / f"{split}_labels.pkl", py2=True)
    return folder


def _write_folders(root: Path, classes: dict[str, list[str]]) -> Path:
    folder = root / "tiered_imagenet"
    for split in SPLITS:
        for wnid, code in _rows(classes, split):
            path = folder / split / wnid / f"{wnid}_{code:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(code)).save(path)
    (folder / "train" / classes["train"][0] / "notes.txt").write_text("not an image")
    return folder


def _prepare(tmp_path: Path, source: Path, split_dir: Path, **kwargs: object) -> DatasetStore:
    result = prepare(
        "tieredimagenet", source, tmp_path / "data", image_size=SIZE, split_dir=split_dir, progress=False, **kwargs
    )
    return DatasetStore(result.path)


def _check_store(store: DatasetStore, classes: dict[str, list[str]], ids: str) -> None:
    for split in SPLITS:
        loaded = store.split(split)
        assert loaded.class_names == sorted(classes[split])
        rows = _rows(classes, split)
        expected = []  # class by class (sorted), each class in source order
        for wnid in sorted(classes[split]):
            codes = [code for w, code in rows if w == wnid]
            expected += [(wnid, code, i) for i, code in enumerate(codes)]
        got = [(loaded.class_names[y], _code_of(img.numpy())) for y, img in zip(loaded.labels.tolist(), loaded.images)]
        assert got == [(w, c) for w, c, _ in expected]  # every image in its split and class, in RGB order
        if ids == "index":
            assert loaded.image_ids == [f"{w}/{i}" for w, _, i in expected]
        else:
            assert loaded.image_ids == [f"{w}/{w}_{c:05d}.png" for w, c, _ in expected]


# --- the three layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [False, True], ids=["py3", "py2"])
def test_png_pickles_land_in_their_split_and_class_with_index_ids(tmp_path: Path, py2: bool) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    _write_png_pickles(tmp_path / "src", classes, py2)
    store = _prepare(tmp_path, tmp_path / "src", split_dir)
    assert store.attrs["source_format"] == "tiered-png-pickle"
    _check_store(store, classes, "index")


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_npz_images_are_flipped_to_rgb_and_get_the_ids_of_the_pickles(tmp_path: Path, compressed: bool) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    _write_npz(tmp_path / "npz", classes, compressed)
    store = _prepare(tmp_path, tmp_path / "npz", split_dir)
    assert store.attrs["source_format"] == "tiered-npz"
    _check_store(store, classes, "index")
    # np.savez stores members uncompressed: read through a memory map, not loaded whole
    assert isinstance(_npz_images(tmp_path / "npz" / "tiered_imagenet" / "train_images.npz"), np.memmap) != compressed
    _write_png_pickles(tmp_path / "png", classes)
    png = prepare(
        "tieredimagenet", tmp_path / "png", tmp_path / "d2", image_size=SIZE, split_dir=split_dir, progress=False
    )
    other = DatasetStore(png.path)
    for split in SPLITS:  # the two pickle layouts give the same store content
        a, b = store.split(split), other.split(split)
        assert (
            a.image_ids == b.image_ids and bool((a.images == b.images).all()) and a.labels.tolist() == b.labels.tolist()
        )


def test_metaoptnet_labels_key_is_read(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    _write_npz(tmp_path / "src", classes, key="labels")
    _check_store(_prepare(tmp_path, tmp_path / "src", split_dir), classes, "index")


def test_class_folders_get_file_name_ids_and_skip_non_images(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    _write_folders(tmp_path / "src", classes)
    store = _prepare(tmp_path, tmp_path / "src", split_dir)
    assert store.attrs["source_format"] == "tiered-folders"
    _check_store(store, classes, "files")


def test_class_names_map_to_wnids_through_the_release_name_files(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    folder = _write_png_pickles(tmp_path / "src", classes)
    all_wnids = [w for s in SPLITS for w in classes[s]]
    names = {w: f"name of {w}" for w in all_wnids}
    for split in SPLITS:
        labels = _labels_dict(_rows(classes, split))
        labels["label_specific_str"] = [names[w] for w in labels["label_specific_str"]]
        _dump(labels, folder / f"{split}_labels.pkl", py2=True)
    with pytest.raises(UserError, match=r"class name 'name of n\d+' is not an ImageNet wnid; put .*synsets.txt"):
        _prepare(tmp_path, tmp_path / "src", split_dir)
    # ImageNet's own lists: one name twice (as 'crane' is), only one of its wnids in the split
    (folder / "synsets.txt").write_text("\n".join(["n99999999", *all_wnids]) + "\n")
    (folder / "class_names.txt").write_text("\n".join([names[all_wnids[0]], *names.values()]) + "\n")
    _check_store(_prepare(tmp_path, tmp_path / "src", split_dir), classes, "index")


# --- refusals: one line, naming the file ------------------------------------------------------------------


def test_a_class_outside_the_split_is_refused_in_one_line(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    _write_png_pickles(tmp_path / "src", classes)
    wrong = dict(classes, train=[classes["train"][0], classes["test"][0]])
    (split_dir / "train.csv").write_text("".join(f"{w},n00000001\n" for w in wrong["train"]))
    (split_dir / "test.csv").write_text(f"{classes['test'][1]},n00000002\n")
    with pytest.raises(UserError) as err:
        _prepare(tmp_path, tmp_path / "src", split_dir)
    message = str(err.value)
    assert "\n" not in message
    assert f"train_labels.pkl lacks 1 class(es) ({classes['test'][0]}) named by the train split" in message
    assert f"has 1 class(es) ({classes['train'][1]}) not in the train split" in message


def test_a_class_folder_outside_the_split_is_refused_in_one_line(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    folder = _write_folders(tmp_path / "src", classes)
    (folder / "val" / classes["val"][0]).rename(folder / "val" / "n00000042")
    with pytest.raises(
        UserError,
        match=r"val lacks 1 class\(es\) \(n\d+\) named by .* and has 1 class\(es\) \(n00000042\) not in the val split",
    ) as err:
        _prepare(tmp_path, tmp_path / "src", split_dir)
    assert "\n" not in str(err.value)


def test_the_full_canonical_split_is_checked_by_default(tmp_path: Path) -> None:
    _, classes = _tiny_split(tmp_path)
    _write_png_pickles(tmp_path / "src", classes)
    with pytest.raises(UserError, match=r"train_labels.pkl lacks 349 class\(es\) .* named by the train split"):
        prepare("tieredimagenet", tmp_path / "src", tmp_path / "data", progress=False)


@pytest.mark.parametrize(
    "case",
    ["truncated labels", "truncated images", "wrong keys", "no names", "label without name", "truncated npz"],
)
def test_damaged_input_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    if case == "truncated npz":
        folder = _write_npz(tmp_path / "src", classes)
        path = folder / "val_images.npz"
        path.write_bytes(path.read_bytes()[:200])
        message = r"cannot read .*val_images.npz: .*; replace the damaged file"
    else:
        folder = _write_png_pickles(tmp_path / "src", classes)
        labels = _labels_dict(_rows(classes, "train"))
        target, content, message = {
            "truncated labels": ("train_labels.pkl", pickle.dumps(labels)[:-30], r"cannot read .*train_labels.pkl"),
            "truncated images": ("train_images_png.pkl", b"\x80\x02]q\x00(", r"cannot read .*train_images_png.pkl"),
            "wrong keys": (
                "train_labels.pkl",
                pickle.dumps({"data": 1}),
                r"train_labels.pkl lacks the key\(s\) label_specific or labels",
            ),
            "no names": (
                "train_labels.pkl",
                pickle.dumps({k: v for k, v in labels.items() if k != "label_specific_str"}),
                r"train_labels.pkl names no classes \(no 'label_specific_str'\)",
            ),
            "label without name": (
                "train_labels.pkl",
                pickle.dumps({**labels, "label_specific_str": labels["label_specific_str"][:1]}),
                r"train_labels.pkl: label 1 has no entry in 'label_specific_str' \(1 names\)",
            ),
        }[case]
        (folder / target).write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        _prepare(tmp_path, tmp_path / "src", split_dir)
    assert "\n" not in str(err.value)


def test_an_undecodable_png_is_named_and_skip_bad_skips_it(tmp_path: Path) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    folder = _write_png_pickles(tmp_path / "src", classes)
    rows = _rows(classes, "val")
    images = [_png_bytes(_rgb(code)) for _, code in rows]
    images[0] = np.frombuffer(b"\x89PNG not really", dtype=np.uint8).copy()
    _dump(images, folder / "val_images_png.pkl")
    with pytest.raises(UserError, match=r"cannot read image .*val_images_png.pkl row 0 \(cannot decode") as err:
        _prepare(tmp_path, tmp_path / "src", split_dir)
    assert "pass skip_bad" in str(err.value) and "\n" not in str(err.value)
    result = prepare(
        "tieredimagenet",
        tmp_path / "src",
        tmp_path / "d",
        image_size=SIZE,
        split_dir=split_dir,
        progress=False,
        skip_bad=True,
    )
    assert len(result.skipped) == 1 and result.skipped[0].endswith("val_images_png.pkl row 0")
    assert len(DatasetStore(result.path).split("val").labels) == 2 * PER_CLASS - 1


def test_cli_damaged_pickle_is_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split_dir, classes = _tiny_split(tmp_path)
    folder = _write_png_pickles(tmp_path / "src", classes)
    (folder / "test_labels.pkl").write_bytes(b"\x80\x04garbage")
    root = tmp_path / "data"
    code = main(
        ["--data-root", str(root), "data", "prepare", "tieredimagenet", "--source", str(tmp_path / "src"),
         "--split-dir", str(split_dir), "--image-size", str(SIZE)]
    )  # fmt: skip
    err = capsys.readouterr().err.split("\r")[-1]
    assert code == 2 and err.startswith("fewshot-sla: error: ") and err.count("\n") == 1
    assert "test_labels.pkl" in err and "Traceback" not in err
    assert not root.exists() or [p for p in root.rglob("*") if p.suffix == ".h5"] == []


def test_no_layout_lists_the_three_it_reads(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match=r"no tieredImageNet layout recognised .*images_png.pkl.*images.npz.*<wnid>"):
        prepare("tieredimagenet", tmp_path / "src", tmp_path / "data", progress=False)
