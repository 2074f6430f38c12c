"""Splits left on disk: direct row reads equal h5py's, and the samplers, evaluation and a whole run give exactly
the episodes and numbers of the in-memory path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.data.disk_images import DiskImages, row_offsets
from fewshot_sla.data.store import DatasetStore, append_rows, create_split, finish_store
from fewshot_sla.engine.build import ImagePipeline
from fewshot_sla.engine.data_placement import data_budget, in_memory, load_splits
from fewshot_sla.engine.evaluate import evaluate
from fewshot_sla.engine.memory import Budget
from fewshot_sla.episodes import CanonicalOrder, EpisodeSampler, EpisodeSet, EpisodeSpec
from fewshot_sla.errors import UserError, render
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES
from tests.helpers.paths import REPO

SIZE = 16
CLASSES, PER_CLASS = 7, 11


def _write_store(path: Path, splits: dict[str, int], seed: int = 0) -> DatasetStore:
    """A finished store with ``splits`` (name -> classes) of PER_CLASS random images each, rows shuffled."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        for name, classes in splits.items():
            group = create_split(h5, name, [f"{name}{c}" for c in range(classes)], SIZE)
            labels = rng.permutation(np.repeat(np.arange(classes), PER_CLASS))
            for start in range(0, len(labels), 10):  # several appends, as importers write
                part = labels[start : start + 10]
                images = rng.integers(0, 256, (len(part), SIZE, SIZE, 3), dtype=np.uint8)
                ids = [f"img{start + i:04d}" for i in range(len(part))]
                append_rows(group, images, part, ids)
        finish_store(h5, {"dataset": "toy", "image_size": SIZE, "source_format": "test", "split_convention": "x"})
    return DatasetStore(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> DatasetStore:
    return _write_store(tmp_path_factory.mktemp("ooc") / "toy.h5", {"train": CLASSES, "val": 5, "test": 6})


@pytest.mark.parametrize("chunks", [(1, SIZE, SIZE, 3), (7, SIZE, SIZE, 3), None])
def test_direct_row_reads_equal_h5py_for_any_unfiltered_layout(tmp_path: Path, chunks) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (30, SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "layout.h5"
    with h5py.File(path, "w") as h5:
        group = h5.create_group("train")
        if chunks is None:  # contiguous
            group.create_dataset("images", data=data)
        else:  # growable, written in pieces (30 is not a multiple of 7: a partial last chunk)
            ds = group.create_dataset(
                "images", (0, SIZE, SIZE, 3), np.uint8, maxshape=(None, SIZE, SIZE, 3), chunks=chunks
            )
            for start in range(0, 30, 8):
                ds.resize(min(30, start + 8), axis=0)
                ds[start : start + 8] = data[start : start + 8]
    with h5py.File(path, "r") as h5:
        offsets = row_offsets(h5["train"]["images"])
    raw = path.read_bytes()
    for row in range(30):  # every offset points at exactly that image's bytes
        start = int(offsets[row])
        assert raw[start : start + data[row].nbytes] == data[row].tobytes()
    reader = DiskImages(path, "train", torch.device("cpu"), "rebuild", threads=3)
    rows = torch.tensor([29, 0, 5, 5, 17, 3, 28, 29, 1])  # any order, repeats
    assert torch.equal(reader.take(rows), torch.from_numpy(data[rows.numpy()]))
    assert reader.take(torch.tensor([], dtype=torch.long)).shape == (0, SIZE, SIZE, 3)
    reader.close()


def test_a_compressed_store_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    path = tmp_path / "packed.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("train").create_dataset(
            "images", data=np.zeros((4, SIZE, SIZE, 3), np.uint8), compression="gzip"
        )
    with pytest.raises(UserError, match=r"compressed.*rebuild it with 'do this'"):
        DiskImages(path, "train", torch.device("cpu"), "do this")


def test_a_store_truncated_under_a_reader_is_one_clear_error(tmp_path: Path) -> None:
    store = _write_store(tmp_path / "toy.h5", {"train": 3})
    split = store.split("train", in_memory=False)
    assert isinstance(split.images, DiskImages)
    last = int(np.argmax(split.images.offsets))
    os.truncate(store.path, int(split.images.offsets[last]) + 10)
    with pytest.raises(UserError, match="truncated; rebuild it"):
        split.images.take(torch.tensor([last]))


def test_a_split_on_disk_is_verified_against_its_digest(tmp_path: Path) -> None:
    store = _write_store(tmp_path / "toy.h5", {"train": 3})
    with h5py.File(store.path, "r+") as h5:
        h5["train"]["images"][4, 0, 0, 0] ^= 1
    with pytest.raises(UserError, match="does not match its checksum"):
        store.split("train", in_memory=False)


def test_the_sampler_draws_the_same_episodes_from_disk_for_any_batch_sizes(store: DatasetStore) -> None:
    spec = EpisodeSpec(3, 2, 4)
    memory = EpisodeSampler(store.split("train"), spec, seed=11)
    disk = EpisodeSampler(store.split("train", in_memory=False), spec, seed=11)
    saved = None
    for i, b in enumerate([4, 4, 4, 2, 5, 5, 1, 4]):
        if i == 5:  # a checkpoint restore in between: both generators go back to an earlier state
            memory.positions.generator.set_state(saved)
            disk.positions.generator.set_state(saved)
        a, c = memory.sample(b), disk.sample(b)
        for field in ("support", "query", "support_labels", "query_labels", "support_index", "query_index"):
            assert torch.equal(getattr(a, field), getattr(c, field)), (i, field)
        # the disk sampler's generator advanced by exactly the batches it returned, not by its read-ahead
        assert torch.equal(memory.positions.generator.get_state(), disk.positions.generator.get_state())
        if i == 2:
            saved = memory.positions.generator.get_state()


@pytest.mark.parametrize(("method", "cache"), [("protonet", True), ("protonet", False), ("metaoptnet-ridge", True)])
def test_evaluation_from_disk_equals_evaluation_in_memory(store: DatasetStore, method: str, cache: bool) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=8)
    learner = LEARNERS.create(method, backbone=backbone).eval()
    objective = OBJECTIVES.create("sla", transform="rotation", feature_dim=backbone.feature_dim(SIZE)).eval()
    test = store.split("test")
    episodes = EpisodeSet.make(
        CanonicalOrder.of_split(test), dataset="toy", split="test", spec=EpisodeSpec(3, 1, 3), count=23, seed=2
    )
    pipeline = ImagePipeline(SIZE, SIZE)
    on_disk = store.split("test", in_memory=False)
    a = evaluate(learner, objective, episodes, test, "toy", pipeline, batch_size=4, use_cache=cache)
    b = evaluate(learner, objective, episodes, on_disk, "toy", pipeline, batch_size=4, use_cache=cache)
    assert a.accuracies.keys() == b.accuracies.keys()
    for kind in a.accuracies:
        np.testing.assert_array_equal(a.accuracies[kind], b.accuracies[kind])
    batches = zip(episodes.batches(test, "toy", 5), episodes.batches(on_disk, "toy", 5), strict=True)
    assert all(torch.equal(x.query, y.query) and torch.equal(x.support, y.support) for x, y in batches)


def test_splits_are_held_smallest_first_while_they_fit() -> None:
    sizes = {"train": 90, "val": 20, "test": 40}
    assert in_memory(sizes, Budget(1000, None, "x")) == {"train": True, "val": True, "test": True}
    assert in_memory(sizes, Budget(60, None, "x")) == {"train": False, "val": True, "test": True}
    assert in_memory(sizes, Budget(59, None, "x")) == {"train": False, "val": True, "test": False}
    assert in_memory(sizes, Budget(0, None, "x")) == {"train": False, "val": False, "test": False}
    assert in_memory(sizes, Budget(None, None, "unknown")) == dict.fromkeys(sizes, True)


def test_the_default_budget_is_half_the_available_ram_and_bad_values_are_refused(monkeypatch) -> None:
    from fewshot_sla.engine import data_placement

    monkeypatch.setattr(data_placement, "host_memory", lambda: (8 << 30, 16 << 30))
    monkeypatch.delenv("FEWSHOT_SLA_CONCURRENT_RUNS", raising=False)
    assert data_budget(torch.device("cpu")).bytes == 4 << 30
    assert data_budget(torch.device("cpu"), local_processes=2).bytes == 2 << 30
    assert data_budget(torch.device("cpu"), budget_gb=1.5).bytes == int(1.5 * 2**30)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"^data_memory must be"):
            data_budget(torch.device("cpu"), budget_gb=bad)


def test_load_splits_names_what_stays_on_disk(store: DatasetStore) -> None:
    budget_gb = (store.image_bytes("val") + store.image_bytes("test")) / 2**30
    placement = load_splits(store, ["train", "val", "test"], torch.device("cpu"), budget_gb=budget_gb)
    assert isinstance(placement.splits["train"].images, DiskImages)
    assert isinstance(placement.splits["val"].images, torch.Tensor)
    assert placement.note is not None and "train" in placement.note and "(data_memory)" in render(placement.note)
    assert load_splits(store, ["val"], torch.device("cpu")).note is None


def _run(capsys, data_root: Path, out: Path, *extra: str) -> dict:
    from tests.integration.cli.test_run_cli import TINY

    code = main(["--data-root", str(data_root), "run", *TINY, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_a_run_with_every_split_on_disk_gives_the_in_memory_numbers(
    capsys, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = _run(capsys, data_root, tmp_path / "memory")
    reads = []
    take = DiskImages.take
    monkeypatch.setattr(DiskImages, "take", lambda self, rows: reads.append(len(rows)) or take(self, rows))
    disk = _run(capsys, data_root, tmp_path / "disk", "--data-memory", "0")
    assert len(reads) > 4  # training, validation and test episodes were all read from disk
    assert memory["evaluation"]["accuracy"] == disk["evaluation"]["accuracy"]
    assert memory["train"]["best_val_accuracy"] == disk["train"]["best_val_accuracy"]

    def curve(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "time" not in k} for line in lines]

    assert curve("memory") == curve("disk") and len(curve("memory")) > 4
    per_episode = [np.load(tmp_path / run / memory["evaluation"]["per_episode_file"]) for run in ("memory", "disk")]
    assert per_episode[0].files == per_episode[1].files
    for name in per_episode[0].files:
        np.testing.assert_array_equal(per_episode[0][name], per_episode[1][name])


def test_eval_reads_the_test_split_from_disk_with_the_same_result(
    capsys, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(capsys, data_root, tmp_path / "run")
    block = first["evaluation"]
    reads = []
    take = DiskImages.take
    monkeypatch.setattr(DiskImages, "take", lambda self, rows: reads.append(len(rows)) or take(self, rows))
    set_file = tmp_path / "run" / block["episode_set"]["file"]
    args = ["eval", str(tmp_path / "run"), "--episodes-file", str(set_file), "--data-memory", "0", "--quiet"]
    assert main(["--data-root", str(data_root), *args]) == 0, capsys.readouterr().err
    assert reads  # the test images came from disk
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    same = [e for e in again["evaluations"] if e["episode_set"]["hash"] == block["episode_set"]["hash"]]
    assert len(same) == 1 and same[0]["accuracy"] == block["accuracy"]


def test_a_bad_data_memory_is_one_line_and_exit_2(capsys, data_root: Path, tmp_path: Path) -> None:
    from tests.integration.cli.test_run_cli import TINY

    code = main(["--data-root", str(data_root), "run", *TINY, "--out", str(tmp_path / "x"), "--data-memory", "-2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data-memory" in err
    assert not (tmp_path / "x").exists()


def test_the_out_of_core_benchmark_runs_and_finds_the_episodes_equal(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "bench_out_of_core.py"
    args = ["--size", "tiny", "--rounds", "1", "--steps", "3", "--dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "equal the in-memory ones: yes" in proc.stdout and "out of core / raw limit" in proc.stdout
