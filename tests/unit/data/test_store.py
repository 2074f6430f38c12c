"""The HDF5 dataset store: round trip, fingerprint, loading, and the errors a user can meet."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fewshot_sla.atomic import atomic_path
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import (
    FILE_FORMAT,
    DatasetStore,
    Split,
    append_rows,
    create_split,
    finish_store,
    store_path,
    writing,
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
    assert """rebuild it with 'fewshot_sla.api.prepare_dataset("cub", source="<PATH>", force=True)'""" in notes[0]


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
    with pytest.raises(UserError, match=r'never finished.*prepare_dataset\("cub", source="<PATH>", force=True\)'):
        open_store("cub", tmp_path)
    garbage = tmp_path / "fc100.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match=r'unreadable.*prepare_dataset\("fc100", source="<PATH>", force=True\)'):
        open_store("fc100", tmp_path)
    with pytest.raises(UserError, match=r'unreadable.*prepare_dataset\("fc100", force=True\)'):
        DatasetStore(garbage)  # without the catalog's hint: the generic command


def test_open_store_names_the_prepare_command_when_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        open_store("cub", tmp_path)
    message = str(err.value)
    assert 'fewshot_sla.api.prepare_dataset("cub", source="<PATH>")' in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_open_store_generates_the_synthetic_set_on_demand(
    tmp_path: Path, small_synthetic: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fewshot_sla")
    store = open_store("synthetic", tmp_path)
    notices = [r.getMessage() for r in caplog.records if r.name.startswith("fewshot_sla")]
    assert len(notices) == 1 and "generating the synthetic dataset" in notices[0]
    assert store.path == store_path("synthetic", tmp_path) and store.path.is_file()
    assert store.split("test").images.shape == (20 * small_synthetic, 32, 32, 3)
    caplog.clear()
    open_store("synthetic", tmp_path)
    assert [r for r in caplog.records if r.name.startswith("fewshot_sla")] == []  # second time: just opened


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


# --- writing a store on a disk that refuses a write -------------------------------------------------------------


def _big(n: int = 1500) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """More rows than HDF5's chunk cache holds, so that rows are written while they are appended."""
    images = ((np.arange(n * 32 * 32 * 3) * 7) % 251).astype(np.uint8).reshape(n, 32, 32, 3)
    return images, np.arange(n) % 5, [f"{i:05d}.png" for i in range(n)]


def _fill(h5: h5py.File) -> str:
    images, labels, ids = _big()
    group = create_split(h5, "train", [f"c{c}" for c in range(5)], 32)
    for start in range(0, len(labels), 100):
        append_rows(group, images[start : start + 100], labels[start : start + 100], ids[start : start + 100])
    return finish_store(h5, {"dataset": "big", "image_size": 32, "source_format": "test"})


def test_the_guarded_writer_writes_what_hdf5_itself_writes(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "plain.h5", "w", libver=FILE_FORMAT) as h5:
        plain = _fill(h5)
    with writing(tmp_path / "guarded.h5") as store:
        guarded = _fill(store.h5)
    assert guarded == plain  # the same content (the layout differs: HDF5 places metadata per driver)
    written = DatasetStore(tmp_path / "guarded.h5")
    assert written.verify() and written.checked
    assert np.array_equal(written.split("train").images.numpy(), _big()[0])


def _refusing(monkeypatch: pytest.MonkeyPatch, budget: int, effect: Callable[[], None] | None = None) -> None:
    """``os.pwrite`` writes ``budget`` bytes, then fails as on a full disk (or, with ``effect``, calls it once
    there and carries on)."""
    real, left = os.pwrite, [budget]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if left[0] <= 0:
            if effect is None:
                raise OSError(errno.ENOSPC, "No space left on device")
            effect()
            left[0] = 1 << 62
        n = real(fd, memoryview(data)[: max(1, min(len(data), left[0]))], offset)
        left[0] -= n
        return n

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_refused_write_surfaces_once_hdf5_has_closed_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The disk fills in the middle of the rows: HDF5 never sees the failure, so it finishes (its digests read the
    held writes back: the same fingerprint as on a roomy disk) and closes without a word; the error comes after."""
    with h5py.File(tmp_path / "plain.h5", "w") as h5:
        expected = _fill(h5)
    _refusing(monkeypatch, budget=2 << 20)
    with pytest.raises(OSError) as err, writing(tmp_path / "full.h5") as store:
        assert _fill(store.h5) == expected
    assert err.value.errno == errno.ENOSPC
    assert capfd.readouterr().err == ""  # no 'Exception ignored' from h5py, no HDF5 error stack


def test_check_raises_the_refused_write_between_two_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refusing(monkeypatch, budget=1 << 20)
    images, labels, ids = _big()
    batches = 0
    with pytest.raises(OSError, match="No space left"), writing(tmp_path / "full.h5") as store:
        group = create_split(store.h5, "train", [f"c{c}" for c in range(5)], 32)
        for start in range(0, len(labels), 100):
            append_rows(group, images[start : start + 100], labels[start : start + 100], ids[start : start + 100])
            store.check()
            batches += 1
    assert 0 < batches < len(labels) // 100  # it stopped part of the way, at a check


def test_a_ctrl_c_during_a_write_is_held_until_the_next_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C arriving while HDF5 writes must not raise inside the write (HDF5 would see a failed write): it is
    raised by the next check, and the previous handler is back afterwards."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    _refusing(monkeypatch, budget=1 << 20, effect=lambda: os.kill(os.getpid(), signal.SIGINT))
    images, labels, ids = _big()
    reached = []
    with pytest.raises(KeyboardInterrupt), writing(tmp_path / "interrupted.h5") as store:
        group = create_split(store.h5, "train", [f"c{c}" for c in range(5)], 32)
        append_rows(group, images, labels, ids)
        store.h5.flush()  # every row goes through the writes now: the signal arrives in one of them
        reached.append("flushed")
        store.check()
    assert reached == ["flushed"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), writing(tmp_path / "reading.h5") as store, store.released():
        os.kill(os.getpid(), signal.SIGINT)  # reading the source, not HDF5's writing: it acts at once
        time.sleep(1)
        reached.append("not held")
    assert reached == ["flushed"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_split_larger_than_the_free_space_is_refused_before_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewshot_sla.data import store as store_module

    monkeypatch.setattr(store_module, "free_bytes", lambda path: 3 << 20)
    final = tmp_path / "big.h5"
    with pytest.raises(UserError) as err, writing(tmp_path / ".big.h5.1.x.tmp", final) as store:
        store.expect(2 << 20, "val split")
        store.expect(5 << 20, "train split")
    assert str(err.value) == (
        f"cannot write {final}: no space is left on the device for its train split (it needs 5.0 MB, 3.0 MB are "
        "free); free some space (or write elsewhere), then run the command again"
    )
