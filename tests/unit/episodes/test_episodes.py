"""The batched episode sampler: layout, disjointness, determinism, canonical order, uniformity, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from fewshot_sla.episodes import CanonicalOrder, EpisodeSampler, EpisodeSpec, PositionSampler
from fewshot_sla.errors import UserError

ALPHA = 1e-3  # significance level of the uniformity tests (each runs on a fixed seed)


@dataclass
class FakeSplit:
    """A Split as the store gives it (see fewshot_sla.data.store.Split)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    image_ids: list[str]


def make_split(
    sizes: list[int], *, seed: int = 0, size: int = 4, device: str = "cpu", shuffle: bool = True, name: str = "train"
) -> FakeSplit:
    """Tiny random images; class c is called 'class{c:02d}', its images 'c{c:02d}_{i:03d}'; rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    ids = [f"c{c:02d}_{i:03d}" for c, n in enumerate(sizes) for i in range(n)]
    images = torch.randint(0, 256, (len(ids), size, size, 3), generator=g, dtype=torch.uint8)
    if shuffle:
        perm = torch.randperm(len(ids), generator=g)
        labels, images, ids = labels[perm], images[perm], [ids[i] for i in perm.tolist()]
    return FakeSplit(name, images.to(device), labels.to(device), [f"class{c:02d}" for c in range(len(sizes))], ids)


def reorder(split: FakeSplit, seed: int) -> FakeSplit:
    """The same content with rows shuffled and the class list permuted (labels renumbered to match)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(split.image_ids), generator=g)
    class_perm = torch.randperm(len(split.class_names), generator=g)  # new class j is old class class_perm[j]
    new_label_of_old = torch.empty_like(class_perm)
    new_label_of_old[class_perm] = torch.arange(len(class_perm))
    return FakeSplit(
        split.name,
        split.images[rows],
        new_label_of_old[split.labels[rows]],
        [split.class_names[i] for i in class_perm.tolist()],
        [split.image_ids[i] for i in rows.tolist()],
    )


def identifiers(split: FakeSplit, index: torch.Tensor) -> list:
    return [[split.image_ids[i] for i in row] for row in index.tolist()]


def test_shapes_dtypes_and_label_major_layout():
    split = make_split([10] * 7, size=5)
    spec = EpisodeSpec(ways=4, shots=2, queries=3)
    batch = EpisodeSampler(split, spec, seed=1).sample(6)
    assert batch.support.shape == (6, 8, 3, 5, 5) and batch.query.shape == (6, 12, 3, 5, 5)
    assert batch.support.dtype == batch.query.dtype == torch.uint8
    assert batch.support_labels.dtype == batch.query_labels.dtype == torch.int64
    assert batch.ways == 4 and batch.batch_size == 6
    expected_s = torch.tensor([n for n in range(4) for _ in range(2)])
    expected_q = torch.tensor([n for n in range(4) for _ in range(3)])
    assert torch.equal(batch.support_labels, expected_s.expand(6, -1))
    assert torch.equal(batch.query_labels, expected_q.expand(6, -1))
    # Every row holds exactly the split image its index names, channels first.
    assert torch.equal(batch.support, split.images[batch.support_index].permute(0, 1, 4, 2, 3))
    assert torch.equal(batch.query, split.images[batch.query_index].permute(0, 1, 4, 2, 3))
    third = split.images[batch.support_index.reshape(-1)[3]].permute(2, 0, 1)
    assert torch.equal(batch.support.reshape(-1, 3, 5, 5)[3], third)


def test_classes_consistent_per_label_distinct_across_labels_and_images_disjoint():
    split = make_split([6, 9, 12, 7, 8, 10, 6, 11])
    spec = EpisodeSpec(ways=5, shots=2, queries=4)
    batch = EpisodeSampler(split, spec, seed=3).sample(200)
    s_cls = split.labels[batch.support_index].view(200, 5, 2)
    q_cls = split.labels[batch.query_index].view(200, 5, 4)
    assert (s_cls == s_cls[:, :, :1]).all() and (q_cls == s_cls[:, :, :1]).all()
    per_label = s_cls[:, :, 0].sort(dim=1).values
    assert (per_label[:, 1:] != per_label[:, :-1]).all()
    everything = torch.cat((batch.support_index, batch.query_index), dim=1).sort(dim=1).values
    assert (everything[:, 1:] != everything[:, :-1]).all()  # no image twice: support and query are disjoint


def test_same_seed_same_episodes_other_seed_other_episodes():
    split = make_split([12] * 10)
    spec = EpisodeSpec(5, 1, 5)
    a, b, c = (EpisodeSampler(split, spec, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        ea, eb, ec = a.sample(4), b.sample(4), c.sample(4)
        assert torch.equal(ea.support_index, eb.support_index) and torch.equal(ea.query_index, eb.query_index)
        assert torch.equal(ea.support, eb.support)
        assert not torch.equal(ea.query_index, ec.query_index)


def test_same_episodes_whatever_order_the_store_holds():
    split = make_split([9, 14, 11, 9, 20, 13], shuffle=True)
    other = reorder(split, seed=5)
    assert other.image_ids != split.image_ids and other.class_names != split.class_names
    spec = EpisodeSpec(3, 2, 4)
    ea = EpisodeSampler(split, spec, seed=11).sample(50)
    eb = EpisodeSampler(other, spec, seed=11).sample(50)
    assert identifiers(split, ea.support_index) == identifiers(other, eb.support_index)
    assert identifiers(split, ea.query_index) == identifiers(other, eb.query_index)
    assert torch.equal(ea.support, eb.support) and torch.equal(ea.query, eb.query)
    assert CanonicalOrder.of_split(split).fingerprint == CanonicalOrder.of_split(other).fingerprint


def test_canonical_order_sorts_classes_then_identifiers():
    order = CanonicalOrder(["zebra", "ant", "moth"], [0, 1, 2, 1, 0, 2], ["z2", "a9", "m1", "a1", "z1", "m0"])
    assert order.class_names == ("ant", "moth", "zebra")
    assert order.identifiers == ("a1", "a9", "m0", "m1", "z1", "z2")
    assert order.rows.tolist() == [3, 1, 5, 2, 4, 0]
    assert order.class_sizes.tolist() == [2, 2, 2] and order.class_starts.tolist() == [0, 2, 4]
    other = CanonicalOrder(["moth", "zebra", "ant"], [2, 0, 1, 1, 2], ["a9", "m1", "z2", "z1", "a1"])
    assert other.fingerprint != CanonicalOrder(["x"], [0], ["y"]).fingerprint


def test_class_choice_and_label_assignment_are_uniform():
    sizes = [5, 30, 8, 12, 5, 20, 9, 6, 15, 7]  # unequal sizes must not bias which classes are picked
    split = make_split(sizes)
    spec = EpisodeSpec(ways=3, shots=1, queries=1)
    batch = EpisodeSampler(split, spec, seed=2024).sample(6000)
    chosen = split.labels[batch.support_index]  # [B, 3]: class of label n
    counts = torch.bincount(chosen.reshape(-1), minlength=10).numpy()
    assert chisquare(counts).pvalue > ALPHA
    # Each label position is equally likely to receive each class.
    table = torch.stack([torch.bincount(chosen[:, n], minlength=10) for n in range(3)]).numpy()
    for n in range(3):
        assert chisquare(table[n]).pvalue > ALPHA


def test_image_choice_within_a_class_is_uniform_for_support_and_query():
    sizes = [40, 13, 25]  # the small class pads the index table: padding must never be drawn or bias draws
    split = make_split(sizes)
    spec = EpisodeSpec(ways=3, shots=2, queries=3)
    batch = EpisodeSampler(split, spec, seed=99).sample(4000)
    row_counts = {}
    for role, index in (("support", batch.support_index), ("query", batch.query_index)):
        row_counts[role] = torch.bincount(index.reshape(-1), minlength=len(split.image_ids)).numpy()
    labels = split.labels.numpy()
    for c in range(3):
        for role in ("support", "query"):
            counts = row_counts[role][labels == c]
            assert counts.sum() == 4000 * (2 if role == "support" else 3)
            assert chisquare(counts).pvalue > ALPHA, (c, role)


@pytest.mark.parametrize("sizes", [[7, 30, 9], [6, 6, 6]])
def test_each_slot_of_the_ordered_sample_is_uniform_near_the_class_size_limit(sizes):
    """Classes barely larger than K+Q mix the fast and the exact path; every (image, slot) pair stays equally likely."""
    split = make_split(sizes)
    spec = EpisodeSpec(ways=3, shots=2, queries=4)  # 6 of a class: tight for the classes of 6, 7 and 9
    batch = EpisodeSampler(split, spec, seed=7).sample(6000)
    rows = torch.cat((batch.support_index.view(-1, 3, 2), batch.query_index.view(-1, 3, 4)), dim=2)  # [B, N, 6]
    labels = split.labels.numpy()
    for c in range(3):
        members = np.flatnonzero(labels == c)
        mine = rows[split.labels[rows[:, :, 0]] == c]  # [B, 6]: this class's ordered sample in each episode
        assert len(mine) == 6000
        table = np.stack([np.bincount(mine[:, j].numpy(), minlength=len(labels))[members] for j in range(6)])
        assert chisquare(table.ravel()).pvalue > ALPHA, c


def test_uniformity_check_detects_a_biased_draw():
    """Negative control: the same chi-square test rejects a draw that favours low canonical offsets."""
    g = torch.Generator().manual_seed(0)
    biased = (torch.rand(20000, generator=g) ** 1.3 * 40).long()
    assert chisquare(torch.bincount(biased, minlength=40).numpy()).pvalue < ALPHA


def test_unequal_classes_at_the_limit_use_every_image_of_the_smallest_class():
    split = make_split([4, 50, 7])
    spec = EpisodeSpec(ways=3, shots=1, queries=3)  # 4 images per class: all of class 0
    batch = EpisodeSampler(split, spec, seed=0).sample(30)
    rows = torch.cat((batch.support_index, batch.query_index), dim=1)
    class0 = set(np.flatnonzero(split.labels.numpy() == 0).tolist())
    for episode in rows.tolist():
        assert class0 <= set(episode)


def test_positions_are_valid_and_label_major():
    order = CanonicalOrder(
        [f"k{c}" for c in range(6)], np.repeat(np.arange(6), [3, 9, 4, 5, 12, 6]), [f"id{i:03d}" for i in range(39)]
    )
    positions = PositionSampler(order, EpisodeSpec(4, 1, 2), seed=5).sample(500)
    assert positions.shape == (500, 4, 3)
    class_of = torch.as_tensor(np.repeat(np.arange(6), order.class_sizes))[positions]
    assert (class_of == class_of[:, :, :1]).all()
    assert positions.min() >= 0 and positions.max() < 39


def test_batch_sequence_depends_only_on_seed_and_batch_sizes():
    split = make_split([10] * 6)
    spec = EpisodeSpec(2, 2, 2)
    a = list(EpisodeSampler(split, spec, seed=4).batches(3, count=4))
    b = [EpisodeSampler(split, spec, seed=4).sample(3)]
    assert len(a) == 4 and torch.equal(a[0].support_index, b[0].support_index)


def test_device_agnostic_on_cpu_and_move():
    split = make_split([8] * 5)
    batch = EpisodeSampler(split, EpisodeSpec(2, 1, 1), seed=0).sample(2)
    assert batch.support.device.type == "cpu" and batch.support_index.device.type == "cpu"
    moved = batch.to("cpu")
    assert torch.equal(moved.query, batch.query) and moved.ways == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_and_gathering_happen_on_the_images_device():
    split = make_split([8] * 5, device="cuda")
    batch = EpisodeSampler(split, EpisodeSpec(3, 2, 2), seed=0).sample(4)
    for t in (batch.support, batch.query, batch.support_labels, batch.query_labels, batch.support_index):
        assert t.device.type == "cuda"
    assert torch.equal(batch.support, split.images[batch.support_index].permute(0, 1, 4, 2, 3))


@pytest.mark.parametrize(
    "ways, shots, queries, fragment",
    [
        (0, 1, 1, "ways must be a whole number >= 1"),
        (5, 0, 1, "shots must be a whole number >= 1"),
        (5, 1, -2, "queries must be a whole number >= 1"),
        (5, 1.5, 1, "shots must be a whole number >= 1"),
        (True, 1, 1, "ways must be a whole number >= 1"),
    ],
)
def test_non_positive_numbers_are_user_errors(ways, shots, queries, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        EpisodeSpec(ways, shots, queries)
    assert "\n" not in str(err.value)


def test_too_many_ways_is_a_user_error():
    split = make_split([10] * 4)
    with pytest.raises(UserError, match=r"5-way episodes need 5 classes but split 'train' has 4; use ways 4"):
        EpisodeSampler(split, EpisodeSpec(5, 1, 1), seed=0)


def test_too_many_shots_and_queries_names_the_smallest_class():
    split = make_split([10, 10, 6, 12])
    with pytest.raises(UserError, match=r"need 7 images per class but class 'class02' of split 'train' has 6"):
        EpisodeSampler(split, EpisodeSpec(2, 2, 5), seed=0)
    EpisodeSampler(split, EpisodeSpec(2, 2, 4), seed=0).sample(1)  # 6 fits


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_bad_batch_size_or_seed(bad):
    sampler = EpisodeSampler(make_split([5] * 3), EpisodeSpec(2, 1, 1), seed=0)
    with pytest.raises(UserError, match="batch size must be a whole number >= 1"):
        sampler.sample(bad)
    if bad != 0:
        with pytest.raises(UserError, match="seed must be a whole number >= 0"):
            EpisodeSampler(make_split([5] * 3), EpisodeSpec(2, 1, 1), seed=bad)


def test_duplicate_identifiers_are_a_user_error():
    with pytest.raises(UserError, match="duplicate image identifier 'x'"):
        CanonicalOrder(["a", "b"], [0, 1, 1], ["x", "y", "x"])
