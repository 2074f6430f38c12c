"""Fixed episode sets: save/load round trip, content hash, tamper detection, checks against a split."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_sla.episodes import SET_CHUNK, CanonicalOrder, EpisodeSampler, EpisodeSet, EpisodeSpec, PositionSampler
from fewshot_sla.errors import UserError
from fewshot_sla.package_data import shipped_episode_sets
from tests.helpers.real_data import REAL_DATA
from tests.unit.episodes.test_episodes import FakeSplit, make_split, reorder

SPEC = EpisodeSpec(ways=3, shots=2, queries=3)


def make_set(split: FakeSplit, count: int = 40, seed: int = 0, spec: EpisodeSpec = SPEC) -> EpisodeSet:
    return EpisodeSet.make(
        CanonicalOrder.of_split(split), dataset="toy", split=split.name, spec=spec, count=count, seed=seed
    )


def rewrite_member(path, member: str, array: np.ndarray) -> None:
    """Replace one array of an .npz in place (as an editor or a damaged copy would), leaving the rest."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    contents[f"{member}.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


def read_member(path, member: str) -> np.ndarray:
    with np.load(path) as npz:
        return npz[member]


def test_round_trip_keeps_everything_and_the_bytes_are_deterministic(tmp_path):
    split = make_split([8, 12, 9, 10, 7], name="test")
    made = make_set(split)
    a = made.save(tmp_path / "a.npz")
    b = make_set(split).save(tmp_path / "b.npz")
    assert a.read_bytes() == b.read_bytes()
    loaded = EpisodeSet.load(a)
    assert loaded.content_hash == made.content_hash
    assert (loaded.dataset, loaded.split, loaded.spec, loaded.seed, loaded.count) == ("toy", "test", SPEC, 0, 40)
    assert loaded.identifiers == made.identifiers and loaded.class_names == made.class_names
    assert np.array_equal(loaded.positions, made.positions) and loaded.positions.dtype == np.dtype("<u2")
    assert loaded.identifiers_fingerprint == CanonicalOrder.of_split(split).fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temporary file left


def test_the_content_hash_is_the_golden_value():
    # The hash names a set in results files and in every shipped set's name: a change must be deliberate.
    made = make_set(make_split([6] * 4, name="test"), count=5)
    assert made.content_hash == "43df2ffc42661347af881e0685f4d757a8e01a24a8218d046cf0828f63736492"


def test_batches_reproduce_the_episodes_from_a_store_in_any_order(tmp_path):
    split = make_split([8, 12, 9, 10, 7], name="test")
    episode_set = EpisodeSet.load(make_set(split, count=10).save(tmp_path / "s.npz"))
    other = reorder(split, seed=3)
    got = {}
    for name, source in (("original", split), ("reordered", other)):
        batches = list(episode_set.batches(source, "toy", batch_size=4))
        assert [b.batch_size for b in batches] == [4, 4, 2]
        ids = []
        for b in batches:
            assert b.support.shape == (b.batch_size, 6, 3, 4, 4) and b.query.shape == (b.batch_size, 9, 3, 4, 4)
            assert torch.equal(b.support, source.images[b.support_index].permute(0, 1, 4, 2, 3))
            rows = torch.cat((b.support_index, b.query_index), 1).tolist()
            ids += [[source.image_ids[i] for i in row] for row in rows]
        got[name] = ids
    assert got["original"] == got["reordered"]
    # And they are exactly the episodes the file names: support of label n = positions[e, n, :K], query = rest.
    p = episode_set.positions.astype(np.int64)
    expected = [
        [episode_set.identifiers[i] for i in np.concatenate((p[e, :, :2].ravel(), p[e, :, 2:].ravel()))]
        for e in range(10)
    ]
    assert got["original"] == expected


def test_a_set_equals_what_the_live_sampler_draws_with_the_same_seed():
    split = make_split([10] * 6, name="test")
    episode_set = make_set(split, count=7, seed=5)
    batch = EpisodeSampler(split, SPEC, seed=5).sample(SET_CHUNK)  # sets are drawn SET_CHUNK at a time
    sampled = [[split.image_ids[i] for i in row] for row in batch.support_index[:7].tolist()]
    p = episode_set.positions.astype(np.int64)
    assert sampled == [[episode_set.identifiers[i] for i in p[e, :, :2].ravel()] for e in range(7)]


def test_sets_with_the_same_seed_are_prefixes_of_each_other():
    order = CanonicalOrder([f"c{i}" for i in range(8)], np.repeat(np.arange(8), 10), [f"i{i:02d}" for i in range(80)])
    short = EpisodeSet.make(order, dataset="toy", split="test", spec=SPEC, count=SET_CHUNK + 5, seed=1)
    long = EpisodeSet.make(order, dataset="toy", split="test", spec=SPEC, count=2 * SET_CHUNK + 3, seed=1)
    assert np.array_equal(long.positions[: short.count], short.positions)


def test_identifier_only_order_gives_the_same_set_as_a_store():
    split = make_split([8, 12, 9], name="test")
    from_lists = CanonicalOrder(list(reversed(split.class_names)), (2 - split.labels).tolist(), split.image_ids)
    a = EpisodeSet.make(from_lists, dataset="toy", split="test", spec=SPEC, count=30, seed=2)
    assert a.content_hash == make_set(split, count=30, seed=2).content_hash
    assert a.content_hash != make_set(split, count=30, seed=3).content_hash


def test_ten_thousand_episodes_of_a_mini_imagenet_sized_split_stay_small(tmp_path):
    order = CanonicalOrder(
        [f"n{c:08d}" for c in range(20)],
        np.repeat(np.arange(20), 600),
        [f"n{c:08d}{i:08d}.jpg" for c in range(20) for i in range(600)],
    )
    path = EpisodeSet.make(order, dataset="toy", split="test", spec=EpisodeSpec(5, 5, 15), count=10000, seed=0).save(
        tmp_path / "big.npz"
    )
    assert path.stat().st_size < 3 * 2**20


def test_tampered_positions_are_rejected(tmp_path):
    path = make_set(make_split([6] * 4, name="test")).save(tmp_path / "s.npz")
    positions = read_member(path, "positions").copy()
    positions[0, 0, 0] = positions[1, 0, 0] if positions[1, 0, 0] != positions[0, 0, 0] else positions[0, 0, 1]
    rewrite_member(path, "positions", positions)
    with pytest.raises(UserError, match="was altered or damaged: its content hash does not match") as err:
        EpisodeSet.load(path)
    assert 'the episodes make action with dataset="toy", split="test", ways=3, shots=2, queries=3' in str(err.value)


def test_tampered_metadata_is_rejected(tmp_path):
    path = make_set(make_split([6] * 4, name="test")).save(tmp_path / "s.npz")
    meta = json.loads(read_member(path, "meta").tobytes())
    meta["seed"] = 1
    rewrite_member(path, "meta", np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with pytest.raises(UserError, match="content hash does not match"):
        EpisodeSet.load(path)


@pytest.mark.parametrize(
    "member, edit",
    [
        ("class_sizes", lambda a: a + 1),
        ("class_sizes", lambda a: -a),
        ("identifiers", lambda a: a[:-3]),
        ("positions", lambda a: a[:, :1]),
    ],
)
def test_inconsistent_tables_are_user_errors(tmp_path, member, edit):
    path = make_set(make_split([6] * 4, name="test")).save(tmp_path / "s.npz")
    rewrite_member(path, member, edit(read_member(path, member)))
    with pytest.raises(UserError, match=r"(was altered or damaged|is not a readable episode set)"):
        EpisodeSet.load(path)


def test_a_consistently_hashed_but_invalid_set_is_rejected(tmp_path):
    split = make_split([6] * 4, name="test")
    good = make_set(split)
    positions = good.positions.copy()
    positions[0, 0, 1] = positions[0, 0, 0]  # the same image twice in one episode
    bad = EpisodeSet(
        dataset="toy",
        split="test",
        spec=SPEC,
        seed=0,
        class_names=good.class_names,
        class_sizes=good.class_sizes,
        identifiers=good.identifiers,
        positions=positions,
    )
    with pytest.raises(UserError, match="is not a valid episode set: an episode repeats a class or an image"):
        EpisodeSet.load(bad.save(tmp_path / "bad.npz"))


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_unreadable_files_are_user_errors(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not a readable episode set"):
        EpisodeSet.load(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no episode set at"):
        EpisodeSet.load(tmp_path / "nope.npz")


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    episode_set = make_set(make_split([6] * 4, name="test"))

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", explode)
    with pytest.raises(RuntimeError):
        episode_set.save(tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


def test_wrong_dataset_split_missing_images_and_wrong_classes(tmp_path):
    split = make_split([8, 9, 10, 8], name="test")
    episode_set = make_set(split)
    with pytest.raises(UserError, match="made for dataset 'toy', not 'other'"):
        episode_set.rows_in(split, "other")
    val = FakeSplit("val", split.images, split.labels, split.class_names, split.image_ids)
    with pytest.raises(UserError, match="is for the 'test' split, not 'val'"):
        episode_set.rows_in(val, "toy")
    used = episode_set.identifiers[int(episode_set.positions[0, 0, 0])]
    renamed = FakeSplit(
        "test", split.images, split.labels, split.class_names, [i + "x" if i == used else i for i in split.image_ids]
    )
    with pytest.raises(UserError, match=f"1 images of this episode set are not in toy/test \\(e.g. '{used}'\\)"):
        episode_set.rows_in(renamed, "toy")
    row = split.image_ids.index(used)
    relabelled = split.labels.clone()
    relabelled[row] = (relabelled[row] + 1) % 4
    moved = FakeSplit("test", split.images, relabelled, split.class_names, split.image_ids)
    with pytest.raises(UserError, match=f"image '{used}' is class"):
        episode_set.rows_in(moved, "toy")


def test_extra_images_in_the_store_do_not_matter():
    split = make_split([8, 9, 10, 8], name="test")
    episode_set = make_set(split)
    extra = FakeSplit(
        "test",
        torch.cat((split.images, split.images[:1])),
        torch.cat((split.labels, split.labels[:1])),
        split.class_names,
        split.image_ids + ["extra"],
    )
    rows = episode_set.rows_in(extra, "toy")  # another identifier list: mapped identifier by identifier
    assert rows.shape == (40, 3, 5)
    named = [[extra.image_ids[r] for r in episode] for episode in rows.reshape(40, -1).tolist()]
    assert named == [[episode_set.identifiers[p] for p in e] for e in episode_set.positions.reshape(40, -1).tolist()]


def test_impossible_sets_fail_before_writing(tmp_path):
    order = CanonicalOrder(["a", "b"], [0, 0, 1, 1], ["1", "2", "3", "4"])
    with pytest.raises(UserError, match="3-way episodes need 3 classes"):
        EpisodeSet.make(order, dataset="toy", split="test", spec=SPEC, count=5, seed=0)
    with pytest.raises(UserError, match="count must be a whole number >= 1"):
        EpisodeSet.make(order, dataset="toy", split="test", spec=EpisodeSpec(2, 1, 1), count=0, seed=0)


def test_position_sampler_is_device_independent_for_sets():
    """Sets are always drawn on the CPU, so where the split lives never changes them."""
    order = CanonicalOrder(["a", "b", "c"], np.repeat(np.arange(3), 7), [f"{i}" for i in range(21)])
    cpu = PositionSampler(order, SPEC, seed=3).sample(SET_CHUNK)[:5]
    made = EpisodeSet.make(order, dataset="toy", split="test", spec=SPEC, count=5, seed=3)
    assert np.array_equal(made.positions.astype(np.int64), cpu.numpy())


# --- The sets shipped with the package (episodes/) --------------------------------------------------------------------

SHIPPED_DIR = shipped_episode_sets()
STANDARD = [
    (dataset, count, shots) for dataset in ("miniimagenet", "synthetic") for count in (1000, 10000) for shots in (1, 5)
]


def test_the_standard_test_sets_are_shipped():
    for dataset, count, shots in STANDARD:
        name = EpisodeSet.default_name(dataset, "test", EpisodeSpec(5, shots, 15), count, 0)
        assert (SHIPPED_DIR / name).is_file(), name


@pytest.fixture(scope="module")
def source_orders(tmp_path_factory) -> dict[str, CanonicalOrder]:
    """Each shipped dataset's test split as the make command sees it: mini-ImageNet's packaged Ravi list,
    and a freshly generated synthetic store (in a temporary data root)."""
    from fewshot_sla.cli.episodes import split_order

    root = tmp_path_factory.mktemp("data")
    return {dataset: split_order(dataset, "test", str(root))[0] for dataset in ("miniimagenet", "synthetic")}


@pytest.mark.parametrize("dataset, count, shots", STANDARD)
def test_regenerating_a_shipped_set_reproduces_its_hash(dataset, count, shots, source_orders):
    spec = EpisodeSpec(5, shots, 15)
    path = SHIPPED_DIR / EpisodeSet.default_name(dataset, "test", spec, count, 0)
    shipped = EpisodeSet.load(path)
    assert (shipped.dataset, shipped.split, shipped.spec, shipped.count, shipped.seed) == (
        dataset,
        "test",
        spec,
        count,
        0,
    )
    order = source_orders[dataset]
    assert shipped.identifiers_fingerprint == order.fingerprint
    again = EpisodeSet.make(order, dataset=dataset, split="test", spec=spec, count=count, seed=0)
    assert again.content_hash == shipped.content_hash
    assert path.stat().st_size < 2 * 2**20


OMNIGLOT_SETS = [(ways, shots, 1000) for ways in (5, 20) for shots in (1, 5)] + [(5, 1, 10000), (5, 5, 10000)]
OMNIGLOT_RELEASE = REAL_DATA / "omniglot"


def _omniglot_set(ways: int, shots: int, count: int) -> tuple[Path, EpisodeSet]:
    path = SHIPPED_DIR / EpisodeSet.default_name("omniglot", "test", EpisodeSpec(ways, shots, 15), count, 0)
    return path, EpisodeSet.load(path)


@pytest.mark.parametrize("ways, shots, count", OMNIGLOT_SETS)
def test_omniglot_sets_rebuild_bit_for_bit_from_their_identifier_lists(ways, shots, count):
    path, shipped = _omniglot_set(ways, shots, count)
    assert (shipped.dataset, shipped.split, shipped.spec, shipped.count, shipped.seed) == (
        "omniglot", "test", EpisodeSpec(ways, shots, 15), count, 0,
    )  # fmt: skip
    # Vinyals et al.'s test split: 423 characters x 4 rotations, 20 drawings each
    assert len(shipped.class_names) == 1692 and set(shipped.class_sizes.tolist()) == {20}
    labels = np.repeat(np.arange(len(shipped.class_names)), shipped.class_sizes)
    order = CanonicalOrder(list(shipped.class_names), labels, list(shipped.identifiers))
    again = EpisodeSet.make(order, dataset="omniglot", split="test", spec=shipped.spec, count=count, seed=0)
    assert again.content_hash == shipped.content_hash
    assert path.stat().st_size < 2 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(
    not OMNIGLOT_RELEASE.is_dir(),
    reason="the Omniglot release is not in $FEWSHOT_SLA_TEST_DATA/omniglot (default ../shared/data)",
)
def test_omniglot_sets_name_exactly_the_test_split_of_a_store_from_the_release(tmp_path):
    from fewshot_sla.cli.episodes import split_order
    from fewshot_sla.data.prepare import prepare

    prepare("omniglot", OMNIGLOT_RELEASE, tmp_path, progress=False)
    order = split_order("omniglot", "test", str(tmp_path))[0]
    for ways, shots, count in OMNIGLOT_SETS:
        assert _omniglot_set(ways, shots, count)[1].identifiers_fingerprint == order.fingerprint
