"""Every raw layout, written by the tests in its exact format, imported into a store and checked back."""

from __future__ import annotations

import csv
import json
import pickle
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_sla.data.conventions import packaged_splits
from fewshot_sla.data.prepare import prepare
from fewshot_sla.data.store import DatasetStore
from fewshot_sla.errors import UserError
from tests.helpers.real_data import REAL_DATA

SPLITS = ("train", "val", "test")
# Facts of the CIFAR-100 release: fine label numbers of a few classes (names are numbered alphabetically).
CIFAR_FACTS = {0: "apple", 1: "aquarium_fish", 2: "baby", 3: "bear", 30: "dolphin", 99: "worm"}


# --- writing raw layouts ------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # type: ignore[misc]
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as pickles made by Python 2 hold them (read with latin1)."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj: object, path: Path, protocol: int | str) -> None:
    """Pickle ``obj``: protocol 2 or 4 as Python 3 writes it, or ``"py2"`` (protocol 2, byte-string keys/data)."""
    with open(path, "wb") as f:
        if protocol == "py2":
            _Py2Pickler(f, protocol=2).dump(_as_py2(obj))
        else:
            pickle.dump(obj, f, protocol=protocol)


def _as_py2(obj: object) -> object:
    """Python 2 ``str`` were byte strings: turn str keys and values into bytes, recursively."""
    if isinstance(obj, dict):
        return {_as_py2(k): _as_py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_py2(v) for v in obj]
    return obj.encode() if isinstance(obj, str) else obj


def _code_image(code: int, size: int = 4) -> np.ndarray:
    """A tiny image whose pixels spell ``code``, so an imported image can be traced back to its source row."""
    image = np.full((size, size, 3), 7, dtype=np.uint8)
    image[..., 0], image[..., 1] = code % 251, code // 251 % 251
    return image


def _code_of(image: np.ndarray) -> int:
    return int(image[0, 0, 0]) + 251 * int(image[0, 0, 1])


def _ravi_lists(counts: dict[str, tuple[int, int]] | None = None) -> dict[str, dict[str, list[str]]]:
    """The packaged Ravi split, or the first (classes, images) of each split of it."""
    lists: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        with (packaged_splits() / "miniimagenet_ravi" / f"{split}.csv").open() as f:
            rows = list(csv.DictReader(f))
        per_class: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            per_class[row["label"]].append(row["filename"])
        if counts is not None:
            n_classes, n_images = counts[split]
            per_class = {w: per_class[w][:n_images] for w in sorted(per_class)[:n_classes]}
        lists[split] = dict(per_class)
    return lists


def _write_ravi_csvs(folder: Path, lists: dict[str, dict[str, list[str]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in lists.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"]] + [[n, w] for w in per_class for n in per_class[w]])
    return folder


def _codes(lists: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    return {name: i for i, name in enumerate(n for s in SPLITS for w in lists[s] for n in lists[s][w])}


def _shuffled_rows(
    lists: dict[str, list[str]], seed: int, keep_class_order: bool = False
) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(wnid, file) of every image of a split, and a random storage order (pickles need not be sorted);
    with ``keep_class_order`` classes interleave but each keeps its images in Ravi CSV order."""
    entries = [(w, n) for w in sorted(lists) for n in lists[w]]
    order = np.random.default_rng(seed).permutation(len(entries))
    if keep_class_order:
        for wnid in lists:
            slots = [k for k, e in enumerate(order) if entries[e][0] == wnid]
            order[slots] = sorted(order[slots])
    return entries, order


L2L_FILES = dict(
    zip(SPLITS, ("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-test.pkl"))
)
MOPT_FILES = dict(
    zip(
        SPLITS,
        (
            "miniImageNet_category_split_train_phase_train.pickle",
            "miniImageNet_category_split_val.pickle",
            "miniImageNet_category_split_test.pickle",
        ),
    )
)


def _write_l2l(folder: Path, lists: dict[str, dict[str, list[str]]], protocol: int | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    codes = _codes(lists)
    for split in SPLITS:
        entries, order = _shuffled_rows(lists[split], seed=SPLITS.index(split))
        images = np.stack([_code_image(codes[entries[e][1]]) for e in order])
        row_of = {e: row for row, e in enumerate(order)}
        class_dict: dict[str, list[int]] = defaultdict(list)
        for e, (wnid, _) in enumerate(entries):  # each class lists its rows in Ravi CSV order
            class_dict[wnid].append(row_of[e])
        _dump({"image_data": images, "class_dict": dict(class_dict)}, folder / L2L_FILES[split], protocol)


def _write_metaoptnet_mini(
    folder: Path, lists: dict[str, dict[str, list[str]]], protocol: int | str, with_names: bool = True
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    codes = _codes(lists)
    offset = 0
    for split in SPLITS:
        entries, order = _shuffled_rows(lists[split], seed=3, keep_class_order=True)
        label_of = {w: offset + i for i, w in enumerate(sorted(lists[split]))}
        offset += len(label_of)
        obj = {
            "data": np.stack([_code_image(codes[entries[e][1]]) for e in order]),
            "labels": [label_of[entries[e][0]] for e in order],
        }
        if with_names:
            obj["catname2label"] = label_of
        _dump(obj, folder / MOPT_FILES[split], protocol)


def _assert_codes_follow_ids(store: DatasetStore, lists: dict[str, dict[str, list[str]]]) -> None:
    """Every stored image is the source image its identifier names, in its class, in Ravi order."""
    codes = _codes(lists)
    for split in SPLITS:
        loaded = store.split(split)
        assert loaded.class_names == sorted(lists[split])
        expected_ids = [n for w in sorted(lists[split]) for n in lists[split][w]]
        assert loaded.image_ids == expected_ids
        got = [_code_of(img) for img in loaded.images.numpy()]
        assert got == [codes[n] for n in expected_ids]
        assert [loaded.class_names[y] for y in loaded.labels.tolist()] == [n[:9] for n in expected_ids]


# --- mini-ImageNet ------------------------------------------------------------------------------------


def test_ravi_layout_with_its_own_csvs(tmp_path: Path, ravi_source: Callable) -> None:
    source, colours = ravi_source(per_class=4)
    result = prepare("miniimagenet", source, tmp_path / "data", image_size=8, progress=False)
    store = DatasetStore(result.path)
    assert store.attrs["source_format"] == "ravi-csv" and "from" in store.attrs["split_convention"]
    assert store.image_size == 8
    for split, n_classes in zip(SPLITS, (3, 2, 2)):
        loaded = store.split(split)
        assert loaded.images.shape == (4 * n_classes, 8, 8, 3) and loaded.num_classes == n_classes
        for image, image_id, label in zip(loaded.images.numpy(), loaded.image_ids, loaded.labels.tolist()):
            assert np.abs(image.reshape(-1, 3).mean(0) - colours[image_id]).max() < 4  # solid colour survives
            assert image_id.startswith(loaded.class_names[label])


def test_split_dir_overrides_the_csvs_in_the_source(tmp_path: Path, ravi_source: Callable) -> None:
    source, _ = ravi_source(per_class=3)
    own = {s: list(csv.reader((source / f"{s}.csv").read_text().splitlines()))[1:] for s in SPLITS}
    swapped = {"train": own["test"], "val": own["val"], "test": own["train"]}  # a different split of the same images
    custom = tmp_path / "custom"
    custom.mkdir()
    for split, rows in swapped.items():
        with open(custom / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"], *rows])
    store = DatasetStore(
        prepare("miniimagenet", source, tmp_path / "d", image_size=4, split_dir=custom, progress=False).path
    )
    assert store.split("train").num_classes == 2 and store.split("test").num_classes == 3
    assert store.attrs["split_convention"] == f"custom from {custom}"


def test_without_csvs_the_packaged_ravi_split_applies_and_names_the_missing_classes(
    tmp_path: Path, ravi_source: Callable
) -> None:
    source, _ = ravi_source(csvs=False)
    with pytest.raises(UserError, match=r"has no image of 100 class\(es\) \(n01532829, .*named by the split files"):
        prepare("miniimagenet", source, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("protocol", [2, 4])
def test_learn2learn_pickles_get_ravi_file_names_by_position(tmp_path: Path, protocol: int) -> None:
    lists = _ravi_lists({"train": (3, 5), "val": (2, 4), "test": (2, 3)})
    _write_l2l(tmp_path / "src", lists, protocol)
    splits = _write_ravi_csvs(tmp_path / "splits", lists)
    result = prepare("miniimagenet", tmp_path / "src", tmp_path / "d", image_size=4, split_dir=splits, progress=False)
    assert result.source_format == "l2l-pickle"
    _assert_codes_follow_ids(DatasetStore(result.path), lists)


@pytest.mark.parametrize("protocol", ["py2", 2, 4])
@pytest.mark.parametrize("with_names", [True, False])
def test_metaoptnet_mini_pickles(tmp_path: Path, protocol: int | str, with_names: bool) -> None:
    lists = _ravi_lists({"train": (3, 4), "val": (2, 3), "test": (2, 5)})
    _write_metaoptnet_mini(tmp_path / "src", lists, protocol, with_names)
    splits = _write_ravi_csvs(tmp_path / "splits", lists)
    result = prepare("miniimagenet", tmp_path / "src", tmp_path / "d", image_size=4, split_dir=splits, progress=False)
    assert result.source_format == "metaoptnet-pickle"
    _assert_codes_follow_ids(DatasetStore(result.path), lists)


def test_full_size_learn2learn_cache_matches_the_canonical_ravi_names(tmp_path: Path) -> None:
    lists = _ravi_lists()
    _write_l2l(tmp_path / "src", lists, 4)
    started = time.perf_counter()
    store = DatasetStore(prepare("miniimagenet", tmp_path / "src", tmp_path / "d", image_size=4, progress=False).path)
    print(f"imported 60000 pickled images in {time.perf_counter() - started:.1f} s")
    assert store.attrs["split_convention"] == "ravi"
    assert [store.split(s).num_classes for s in SPLITS] == [64, 16, 20]
    _assert_codes_follow_ids(store, lists)


def test_pickled_class_with_a_different_image_count_is_refused(tmp_path: Path) -> None:
    lists = _ravi_lists({"train": (2, 4), "val": (1, 4), "test": (1, 4)})
    _write_l2l(tmp_path / "src", lists, 4)
    short = {s: dict(v) for s, v in lists.items()}
    wnid = sorted(short["val"])[0]
    short["val"][wnid] = short["val"][wnid] + ["n9999999900000001.jpg"]  # the split lists one more image
    splits = _write_ravi_csvs(tmp_path / "splits", short)
    with pytest.raises(UserError, match=rf"has 4 images of {wnid} but the val split file lists 5"):
        prepare("miniimagenet", tmp_path / "src", tmp_path / "d", image_size=4, split_dir=splits, progress=False)
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


def test_pickled_classes_that_disagree_with_the_split_are_refused(tmp_path: Path) -> None:
    lists = _ravi_lists({"train": (2, 2), "val": (1, 2), "test": (1, 2)})
    _write_metaoptnet_mini(tmp_path / "src", lists, 4)
    other = _ravi_lists({"train": (3, 2), "val": (1, 2), "test": (1, 2)})
    splits = _write_ravi_csvs(tmp_path / "splits", other)
    with pytest.raises(UserError, match=r"lacks 1 class\(es\) .* named by the train split"):
        prepare("miniimagenet", tmp_path / "src", tmp_path / "d", image_size=4, split_dir=splits, progress=False)


def test_a_missing_pickle_of_the_set_is_named(tmp_path: Path) -> None:
    lists = _ravi_lists({"train": (1, 2), "val": (1, 2), "test": (1, 2)})
    _write_l2l(tmp_path / "src", lists, 4)
    (tmp_path / "src" / L2L_FILES["test"]).unlink()
    with pytest.raises(UserError, match=r"lacks mini-imagenet-cache-test.pkl"):
        prepare("miniimagenet", tmp_path / "src", tmp_path / "d", progress=False)


class _Hostile:
    """A pickle payload that would run a shell command when unpickled by a trusting loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["truncated", "wrong keys", "hostile", "string rows"])
def test_damaged_wrong_or_hostile_pickles_are_refused(tmp_path: Path, kind: str) -> None:
    lists = _ravi_lists({"train": (1, 2), "val": (1, 2), "test": (1, 2)})
    _write_l2l(tmp_path / "src", lists, 4)
    marker = tmp_path / "pwned"
    content, message = {
        "truncated": (pickle.dumps({"image_data": np.zeros(9)})[:-20], r"cannot read .*mini-imagenet-cache-train.pkl"),
        "wrong keys": (pickle.dumps({"images": 1}), r"lacks the key\(s\) image_data, class_dict"),
        "hostile": (pickle.dumps(_Hostile(marker)), r"cannot read .*: it references (posix|nt).system"),
        "string rows": (
            pickle.dumps({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"n01": ["0", "1"]}}),
            r"'class_dict' entry 'n01' must be a list of integer row indices, got str32 values such as \['0'\]",
        ),
    }[kind]
    (tmp_path / "src" / L2L_FILES["train"]).write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        prepare(
            "miniimagenet",
            tmp_path / "src",
            tmp_path / "d",
            image_size=4,
            split_dir=_write_ravi_csvs(tmp_path / "splits", lists),
            progress=False,
        )
    assert "\n" not in str(err.value) and not marker.exists()


TINY = REAL_DATA / "tinyimagenet-ravi"
needs_tiny = pytest.mark.skipif(
    not TINY.is_dir(), reason=f"needs {TINY} (set FEWSHOT_SLA_TEST_DATA to the data folder)"
)


def _tiny_rows(split: str) -> list[dict[str, str]]:
    with open(TINY / f"{split}.csv") as f:
        return list(csv.DictReader(f))


def _check_real_import(store: DatasetStore, rows: dict[str, list[dict[str, str]]], size: int) -> None:
    for split in SPLITS:
        loaded = store.split(split)
        assert loaded.images.shape == (len(rows[split]), size, size, 3)
        assert loaded.image_ids == [r["filename"] for r in rows[split]]  # the split files define split and order
        assert [loaded.class_names[y] for y in loaded.labels.tolist()] == [r["label"] for r in rows[split]]
    test = store.split("test")
    for row in (0, len(test.image_ids) // 2, len(test.image_ids) - 1):  # resizing keeps an image's mean colour
        with Image.open(TINY / "images" / test.image_ids[row]) as image:
            original = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
        assert np.abs(test.images[row].numpy().reshape(-1, 3).mean(0) - original).max() < 6


@needs_tiny
def test_real_tinyimagenet_subset_with_a_split_dir(tmp_path: Path) -> None:
    """A few real classes (the split dir wins over the source's own CSVs), fast enough for every run."""
    rows = {}
    for split, n_classes in zip(SPLITS, (4, 2, 2)):
        keep = sorted({r["label"] for r in _tiny_rows(split)})[:n_classes]
        rows[split] = [r for r in _tiny_rows(split) if r["label"] in keep]
    splits = _write_ravi_csvs(
        tmp_path / "splits",
        {
            s: {w: [r["filename"] for r in rows[s] if r["label"] == w] for w in sorted({r["label"] for r in rows[s]})}
            for s in SPLITS
        },
    )
    store = DatasetStore(
        prepare("miniimagenet", TINY, tmp_path / "d", image_size=12, split_dir=splits, progress=False).path
    )
    _check_real_import(store, rows, 12)


@pytest.mark.slow
@needs_tiny
def test_real_tinyimagenet_in_ravi_layout(tmp_path: Path) -> None:
    """All 30000 real JPEGs with the source's own CSVs as the split (about 10-60 s, machine load permitting)."""
    started = time.perf_counter()
    store = DatasetStore(prepare("miniimagenet", TINY, tmp_path, image_size=16, progress=False).path)
    print(f"imported 30000 real JPEGs at 16x16 in {time.perf_counter() - started:.1f} s")
    assert [store.split(s).num_classes for s in SPLITS] == [64, 16, 20]
    _check_real_import(store, {s: _tiny_rows(s) for s in SPLITS}, 16)


# --- CUB ----------------------------------------------------------------------------------------------


def _write_cub(parent: Path, class_names: list[str], per_class: int) -> tuple[Path, dict[str, tuple[int, ...]]]:
    root = parent / "CUB_200_2011"
    colours: dict[str, tuple[int, ...]] = {}
    entries = []
    for c, name in enumerate(class_names):
        (root / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            relative = f"{name}/{name.split('.')[-1]}_{i:04d}_{c}.jpg"
            colour = (40 + 30 * (i % 6), 40 + (c * 7) % 180, 90)
            mode, fill = ("L", colour[0]) if i == 1 else ("RGB", colour)  # a greyscale image among them
            colours[relative] = (fill,) * 3 if mode == "L" else colour
            Image.new(mode, (30 + 5 * i, 22), fill).save(root / "images" / relative, quality=95)
            entries.append((relative, c + 1))
    order = np.random.default_rng(0).permutation(len(entries))  # image ids in no particular order
    (root / "images.txt").write_text("".join(f"{k + 1} {entries[e][0]}\n" for k, e in enumerate(order)))
    (root / "image_class_labels.txt").write_text("".join(f"{k + 1} {entries[e][1]}\n" for k, e in enumerate(order)))
    (root / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(class_names)))
    (root / "bounding_boxes.txt").write_text("".join(f"{k + 1} 0 0 5 5\n" for k in range(len(entries))))
    return root, colours


def test_cub_folder_with_a_custom_split(tmp_path: Path) -> None:
    names = [f"{i:03d}.Bird_{i}" for i in range(1, 7)]
    _, colours = _write_cub(tmp_path / "raw", names, per_class=3)
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, members in zip(SPLITS, (names[:3], names[3:5], names[5:])):
        (splits / f"{split}.json").write_text(json.dumps(members))
    store = DatasetStore(
        prepare("cub", tmp_path / "raw", tmp_path / "d", image_size=6, split_dir=splits, progress=False).path
    )
    train = store.split("train")
    assert train.class_names == names[:3] and train.images.shape == (9, 6, 6, 3)
    assert train.image_ids == sorted(r for r in colours if r.split("/")[0] in names[:3])
    for image, relative in zip(train.images.numpy(), train.image_ids):
        assert np.abs(image.reshape(-1, 3).mean(0) - colours[relative]).max() < 4


def test_cub_canonical_split_follows_the_closer_look_rule(tmp_path: Path) -> None:
    lists = [json.loads((packaged_splits() / "torchmeta/cub" / f"{s}.json").read_text()) for s in SPLITS]
    names = sorted(n for names in lists for n in names)
    assert len(names) == 200
    root, _ = _write_cub(tmp_path, names, per_class=1)
    store = DatasetStore(prepare("cub", root, tmp_path / "d", image_size=4, progress=False).path)
    rule = {
        "train": [n for i, n in enumerate(names) if i % 2 == 0],
        "val": [n for i, n in enumerate(names) if i % 4 == 1],
        "test": [n for i, n in enumerate(names) if i % 4 == 3],
    }
    for split in SPLITS:
        assert store.split(split).class_names == rule[split]
    assert store.attrs["split_convention"] == "closerlook"


def test_cub_malformed_text_file_names_the_line(tmp_path: Path) -> None:
    root, _ = _write_cub(tmp_path, ["001.A", "002.B", "003.C"], per_class=1)
    (root / "classes.txt").write_text("1 001.A\n2\n3 003.C\n")
    with pytest.raises(UserError, match=r"classes.txt line 2: expected '<id> <value>'"):
        prepare("cub", root, tmp_path / "d", progress=False)


# --- CIFAR-100 based: FC100 and CIFAR-FS ---------------------------------------------------------------


def _cifar_names() -> list[str]:
    return sorted(
        f
        for s in SPLITS
        for _, f in json.loads((packaged_splits() / "torchmeta/cifar100/cifar-fs" / f"{s}.json").read_text())
    )


def _write_cifar100_python(parent: Path) -> dict[str, np.ndarray]:
    """cifar-100-python/{train,test,meta} with 2 train and 1 test image per class, as Python 2 pickles."""
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = _cifar_names()
    images = {}
    for part, per_class in (("train", 2), ("test", 1)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        images[part] = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        flat = images[part].transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # CIFAR rows: R plane, G, B
        _dump(
            {
                "data": flat,
                "fine_labels": labels.tolist(),
                "coarse_labels": [0] * len(labels),
                "filenames": [f"img_{i}.png" for i in range(len(labels))],
            },
            root / part,
            "py2",
        )
        images[part + "_labels"] = labels
    _dump({"fine_label_names": names, "coarse_label_names": ["x"] * 20}, root / "meta", "py2")
    return images


def _shared_split_table() -> dict[str, dict[str, str]]:
    table = REAL_DATA / "splits" / "cifar100_fine_coarse_splits.csv"
    if not table.is_file():
        pytest.skip(f"needs {table} (set FEWSHOT_SLA_TEST_DATA to the data folder)")
    with open(table) as f:
        return {row["fine_label_name"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("dataset, column", [("fc100", "fc100_split"), ("cifarfs", "cifar_fs_split")])
def test_cifar100_python_merges_train_and_test_into_the_benchmark_split(
    tmp_path: Path, dataset: str, column: str
) -> None:
    raw = _write_cifar100_python(tmp_path / "raw")
    table = _shared_split_table()
    store = DatasetStore(prepare(dataset, tmp_path / "raw", tmp_path / "d", progress=False).path)
    assert store.image_size == 32 and store.attrs["source_format"] == "cifar-100-python"
    names = _cifar_names()
    for split in SPLITS:
        loaded = store.split(split)
        assert loaded.class_names == sorted(n for n, row in table.items() if row[column] == split)
        for image, image_id, label in zip(loaded.images.numpy(), loaded.image_ids, loaded.labels.tolist()):
            part, row = image_id.split("/")
            assert np.array_equal(image, raw[part][int(row)])
            assert names[raw[part + "_labels"][int(row)]] == loaded.class_names[label]
        assert len(loaded.image_ids) == 3 * loaded.num_classes


@pytest.mark.parametrize("protocol", ["py2", 4])
@pytest.mark.parametrize("dataset, prefix", [("fc100", "FC100"), ("cifarfs", "CIFAR_FS")])
def test_metaoptnet_cifar_pickles_name_classes_by_cifar_number(
    tmp_path: Path, protocol: int | str, dataset: str, prefix: str
) -> None:
    table = _shared_split_table()
    column = "fc100_split" if dataset == "fc100" else "cifar_fs_split"
    names = _cifar_names()
    rng = np.random.default_rng(2)
    (tmp_path / "src").mkdir()
    for split in SPLITS:
        numbers = [names.index(n) for n, row in table.items() if row[column] == split]
        labels = rng.permutation(np.repeat(numbers, 2))
        data = np.stack([_code_image(int(label), 32) for label in labels])
        _dump({"data": data, "labels": labels.tolist()}, tmp_path / "src" / f"{prefix}_{split}.pickle", protocol)
    store = DatasetStore(prepare(dataset, tmp_path / "src", tmp_path / "d", progress=False).path)
    by_name = {}
    for split in SPLITS:
        loaded = store.split(split)
        assert all(i.startswith(f"{prefix}_{split}/") for i in loaded.image_ids)
        for image, label in zip(loaded.images.numpy(), loaded.labels.tolist()):
            by_name[loaded.class_names[label]] = (_code_of(image), split)
    for number, name in CIFAR_FACTS.items():
        assert by_name[name] == (number, table[name][column])


def test_metaoptnet_cifar_pickle_with_labels_outside_cifar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for split in SPLITS:
        _dump(
            {"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [100, 101]},
            tmp_path / "src" / f"FC100_{split}.pickle",
            4,
        )
    with pytest.raises(UserError, match=r"labels must be CIFAR-100 fine class numbers 0..99"):
        prepare("fc100", tmp_path / "src", tmp_path / "d", progress=False)


def test_cifar_fs_split_naming_a_class_cifar_lacks_is_refused(tmp_path: Path) -> None:
    _write_cifar100_python(tmp_path / "raw")
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, pairs in (("train", [["fish", "trout"]]), ("val", [["people", "baby"]]), ("test", [["x", "unicorn"]])):
        (splits / f"{split}.json").write_text(json.dumps(pairs))
    with pytest.raises(UserError, match=r"lacks 1 class\(es\) \(unicorn\) named by the split files"):
        prepare("cifarfs", tmp_path / "raw", tmp_path / "d", split_dir=splits, progress=False)
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


def test_source_csvs_identical_to_the_packaged_ones_keep_the_ravi_name(tmp_path: Path) -> None:
    from fewshot_sla.data.conventions import load_convention

    folder = tmp_path / "copy"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"{split}.csv").write_bytes((packaged_splits() / "miniimagenet_ravi" / f"{split}.csv").read_bytes())
    same = load_convention("ravi", "ravi-csv", "miniimagenet_ravi", folder)
    assert (
        same.describe() == f"ravi from {folder}"
        and same.digest == load_convention("ravi", "ravi-csv", "miniimagenet_ravi").digest
    )
    (folder / "test.csv").write_text("filename,label\nn0000000100000001.jpg,n00000001\n")
    assert load_convention("ravi", "ravi-csv", "miniimagenet_ravi", folder).describe() == f"custom from {folder}"


def test_tinyimagenet_reads_split_from_source_csvs(tmp_path: Path) -> None:
    """A dataset without packaged split lists takes its split from the source's CSVs, and refuses without them."""
    from fewshot_sla.cli import main

    source = tmp_path / "src"
    (source / "images").mkdir(parents=True)
    rows = {"train": ["n001", "n002"], "val": ["n003"], "test": ["n004"]}
    for split, classes in rows.items():
        lines = ["filename,label"]
        for wnid in classes:
            for i in range(3):
                name = f"{wnid}{i:08d}.jpg"
                Image.new("RGB", (8, 8), (i * 40, 10, 200)).save(source / "images" / name)
                lines.append(f"{name},{wnid}")
        (source / f"{split}.csv").write_text("\n".join(lines) + "\n")
    root = tmp_path / "root"
    assert main(["--data-root", str(root), "data", "prepare", "tinyimagenet", "--source", str(source)]) == 0
    store = DatasetStore(root / "tinyimagenet.h5")
    assert store.split("train").class_names == ["n001", "n002"] and store.image_size == 64
    for split in rows:
        (source / f"{split}.csv").unlink()
    assert main(["--data-root", str(root / "other"), "data", "prepare", "tinyimagenet", "--source", str(source)]) == 2
    assert not (root / "other" / "tinyimagenet.h5").exists()
