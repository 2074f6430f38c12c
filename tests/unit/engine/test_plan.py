"""Planning a run: with ``train_split: train+val`` the training split the trainer gets holds the images and classes
of the store's train and val splits (Snell et al.'s and Lee et al.'s final models), and nothing else changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fewshot_sla.config import RunConfig
from fewshot_sla.data.catalog import open_store
from fewshot_sla.data.store import Split, joined
from fewshot_sla.engine.plan import RunPlan, plan_run
from fewshot_sla.errors import UserError

SETTINGS: dict[str, Any] = dict(
    device="cpu", train_episodes=4, val_episodes=4, eval_episodes=4, backbone_options={"hidden": 8}, image_size=16
)


def _plan(settings: dict[str, Any], data_root: Path, tmp_path: Path) -> RunPlan:
    out = str(tmp_path / "run")
    return plan_run(RunConfig(**settings), overrides=settings, out=out, data_root=data_root, fit_memory="off")


def _split(name: str, classes: list[str], per_class: int, value: int) -> Split:
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    images = torch.full((len(labels), 2, 2, 1), value, dtype=torch.uint8)
    ids = [f"{name}/{i}" for i in range(len(labels))]
    return Split(name, images, labels, classes, ids)


def test_joined_splits_keep_each_image_with_its_own_class() -> None:
    first, second = _split("train", ["a", "b", "c"], 2, 1), _split("val", ["d", "e"], 3, 2)
    both = joined(first, second, "train+val")
    assert both.class_names == ["a", "b", "c", "d", "e"]
    assert both.image_ids == first.image_ids + second.image_ids
    for row in range(len(both.labels)):  # every image's class name is the one its own split gave it
        source, i = (first, row) if row < len(first.labels) else (second, row - len(first.labels))
        assert both.class_names[int(both.labels[row])] == source.class_names[int(source.labels[i])]
        assert torch.equal(both.images[row], source.images[i])


def test_joined_refuses_a_split_left_on_disk(data_root: Path) -> None:
    store = open_store("synthetic", data_root)
    with pytest.raises(UserError, match=r"needs split .val. in memory"):
        joined(store.split("train"), store.split("val", in_memory=False), "train+val")


def test_train_plus_val_hands_the_trainer_both_splits(data_root: Path, tmp_path: Path) -> None:
    settings = dict(SETTINGS, train_split="train+val")
    plan = _plan(settings, data_root, tmp_path)
    store = open_store("synthetic", data_root)
    train, val = store.split("train"), store.split("val")
    trained = plan.splits["train"]
    assert trained.class_names == train.class_names + val.class_names
    assert trained.image_ids == train.image_ids + val.image_ids
    assert torch.equal(trained.images, torch.cat([train.images, val.images]))
    assert plan.splits["val"].image_ids == val.image_ids  # validation still on the val split


def test_train_is_the_default_and_one_grid_cell_with_it(data_root: Path, tmp_path: Path) -> None:
    settings = dict(SETTINGS, train_split="train")
    plan = _plan(settings, data_root, tmp_path)
    assert plan.splits["train"].image_ids == open_store("synthetic", data_root).split("train").image_ids
    assert RunConfig(**settings) == RunConfig(**SETTINGS)


def test_pretraining_on_train_plus_val_classifies_among_both(data_root: Path, tmp_path: Path) -> None:
    settings = dict(SETTINGS, method="pretrain", train_split="train+val", backbone="conv4")
    plan = _plan(settings, data_root, tmp_path)
    store = open_store("synthetic", data_root)
    assert plan.cfg.train_ways == store.split("train").num_classes + store.split("val").num_classes
