"""The HDF5 dataset store: round trip, fingerprint, loading, and the errors a user can meet."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import (
    DatasetStore,
    Split,
    append_rows,
    create_split,
    finish_store,
    store_path,
)
from fewshot_sla.errors import UserError


def _content() -> dict[str, tuple[np.ndarray, np.ndarray, list[str], list[str]]]:
    """Small splits whose pixels and labels are arithmetic (no RNG, so the same on every numpy)."""
    content = {}
    for offset, (split, (classes, n)) in enumerate({"train": (3, 11), "val": (2, 6), "test": (2, 5)}.items()):
        images = ((np.arange(n * 6 * 6 * 3) * 37 + 11 * offset) % 256).astype(np.uint8).reshape(n, 6, 6, 3)
        labels = np.arange(n) * classes // n
        names = [f"{split}_class{c}" for c in range(classes)]
        ids = [f"{split}/{i:03d}.jpg" for i in range(n)]
        content[split] = (images, labels, names, ids)
    return content


def _write(path: Path, content: dict, batch: int = 4) -> str:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for split, (images, labels, names, ids) in content.items():
            group = create_split(h5, split, names, images.shape[1])
            for start in range(0, len(labels), batch):
                end = start + batch
                append_rows(group, images[start:end], labels[start:end], ids[start:end])
        return finish_store(h5, {"dataset": path.stem, "image_size": images.shape[1], "source_format": "test"})


def test_round_trip_keeps_every_field_and_order(tmp_path: Path) -> None:
    content = _content()
    _write(tmp_path / "toy.h5", content)
    store = DatasetStore(tmp_path / "toy.h5")
    assert store.split_names == ["train", "val", "test"]
    assert store.image_size == 6 and store.dataset == "toy"
    for name, (images, labels, names, ids) in content.items():
        split = store.split(name)
        assert isinstance(split, Split) and split.name == name
        assert split.images.dtype == torch.uint8 and split.images.shape == images.shape
        assert np.array_equal(split.images.numpy(), images)
        assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
        assert split.class_names == names and split.image_ids == ids and split.num_classes == len(names)


# The fingerprint of _content(): runs record it and refuse a store that differs, so a change must be deliberate.
GOLDEN_FINGERPRINT = "ba79fb7a200193deedb0234bdd22d7c573e2031526a301dedb5882b000b3366b"


def test_fingerprint_is_the_golden_value_whatever_the_write_batching(tmp_path: Path) -> None:
    content = _content()
    one = _write(tmp_path / "a.h5", content, batch=1)
    many = _write(tmp_path / "b.h5", content, batch=100)
    assert one == many == DatasetStore(tmp_path / "a.h5").fingerprint == GOLDEN_FINGERPRINT


def test_verify_detects_a_changed_pixel(tmp_path: Path) -> None:
    path = tmp_path / "toy.h5"
    _write(path, _content())
    assert DatasetStore(path).verify()
    with h5py.File(path, "r+") as h5:
        h5["val/images"][2, 3, 4, 1] ^= 1
    store = DatasetStore(path)
    assert not store.verify()


@pytest.mark.parametrize(
    "damage",
    [
        lambda h5: h5["test/images"].__setitem__((4, 5, 5, 2), h5["test/images"][4, 5, 5, 2] ^ 128),
        lambda h5: h5["train/labels"].__setitem__(0, 2),
        lambda h5: h5["val/image_ids"].__setitem__(1, b"val/999.jpg"),
        lambda h5: h5["train/class_names"].__setitem__(1, b"renamed"),
    ],
    ids=["pixel", "label", "image id", "class name"],
)
def test_every_load_refuses_a_split_whose_content_changed(tmp_path: Path, damage) -> None:
    path = tmp_path / "toy.h5"
    _write(path, _content())
    with h5py.File(path, "r+") as h5:
        damage(h5)
    store = DatasetStore(path, rebuild="fewshot-sla data prepare toy --force")
    assert store.checked
    damaged = [name for name in store.split_names if _refused(store, name)]
    assert len(damaged) == 1, damaged  # only the damaged split, and it is named
    with pytest.raises(
        UserError,
        match=rf"'{damaged[0]}' split of store .* does not match its checksum.*"
        r"rebuild it with 'fewshot-sla data prepare toy --force'",
    ):
        store.split(damaged[0])


def _refused(store: DatasetStore, name: str) -> bool:
    try:
        store.split(name)
    except UserError:
        return True
    return False


def test_a_store_without_checksums_loads_with_a_note_on_upgrading_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    content = _content()
    path = tmp_path / "cub.h5"
    _write(path, content)
    with h5py.File(path, "r+") as h5:  # as an older fewshot-sla wrote it
        for name in list(h5.attrs):
            if name.startswith("digest_"):
                del h5.attrs[name]
    caplog.set_level(logging.INFO, logger="fewshot_sla")
    for _ in range(2):
        store = open_store("cub", tmp_path)
        assert not store.checked
        assert np.array_equal(store.split("val").images.numpy(), content["val"][0])
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("fewshot_sla")]
    assert len(notes) == 1 and "has no content checksums" in notes[0]  # once per store and process
    assert "rebuild it with 'fewshot-sla data prepare cub --source <PATH> --force'" in notes[0]


def test_summary_counts_classes_and_images(tmp_path: Path) -> None:
    _write(tmp_path / "toy.h5", _content())
    summary = DatasetStore(tmp_path / "toy.h5").summary()
    assert summary["splits"] == {
        "train": {"classes": 3, "images": 11},
        "val": {"classes": 2, "images": 6},
        "test": {"classes": 2, "images": 5},
    }
    assert summary["image_size"] == 6 and len(summary["fingerprint"]) == 64


def test_unknown_split_is_one_line_naming_the_valid_ones(tmp_path: Path) -> None:
    _write(tmp_path / "toy.h5", _content())
    with pytest.raises(UserError, match=r"no split 'validation'; choose one of: train, val, test") as err:
        DatasetStore(tmp_path / "toy.h5").split("validation")
    assert "\n" not in str(err.value)


def test_an_unfinished_or_foreign_file_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    unfinished = tmp_path / "cub.h5"
    with h5py.File(unfinished, "w") as h5:
        create_split(h5, "train", ["a"], 4)
    with pytest.raises(UserError, match=r"never finished.*fewshot-sla data prepare cub --source <PATH> --force"):
        open_store("cub", tmp_path)
    garbage = tmp_path / "fc100.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match=r"unreadable.*fewshot-sla data prepare fc100 --source <PATH> --force"):
        open_store("fc100", tmp_path)
    with pytest.raises(UserError, match=r"unreadable.*fewshot-sla data prepare fc100 --force"):
        DatasetStore(garbage)  # without the catalog's hint: the generic command


def test_open_store_names_the_prepare_command_when_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        open_store("cub", tmp_path)
    message = str(err.value)
    assert "fewshot-sla data prepare cub --source <PATH>" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_open_store_generates_the_synthetic_set_on_demand(
    tmp_path: Path, small_synthetic: int, capsys: pytest.CaptureFixture
) -> None:
    store = open_store("synthetic", tmp_path)
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "generating the synthetic dataset" in notice
    assert store.path == store_path("synthetic", tmp_path) and store.path.is_file()
    assert store.split("test").images.shape == (20 * small_synthetic, 32, 32, 3)
    open_store("synthetic", tmp_path)
    assert capsys.readouterr().err == ""  # second time: just opened


def test_open_store_uses_the_environment_data_root(
    tmp_path: Path, small_synthetic: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEWSHOT_SLA_DATA", str(tmp_path / "env-root"))
    assert open_store("synthetic").path == tmp_path / "env-root" / "synthetic.h5"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_split_loads_onto_the_gpu_unchanged(tmp_path: Path) -> None:
    content = _content()
    _write(tmp_path / "toy.h5", content)
    split = DatasetStore(tmp_path / "toy.h5").split("train", device="cuda")
    assert split.images.is_cuda and split.labels.is_cuda
    assert np.array_equal(split.images.cpu().numpy(), content["train"][0])
