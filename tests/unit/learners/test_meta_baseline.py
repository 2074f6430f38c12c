"""Meta-Baseline's meta-stage head: the cosine of each query to each class centroid times a learnable temperature,
against a per-query loop; the temperature learns; its recipe is the paper's meta stage; a chain from a pretrain run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewshot_sla.cli import main
from fewshot_sla.config import RunConfig
from fewshot_sla.config.recipes import apply_recipe
from fewshot_sla.errors import UserError
from fewshot_sla.registry import LEARNERS


def test_logits_are_the_temperature_times_the_cosine_to_each_centroid() -> None:
    torch.manual_seed(0)
    head = LEARNERS.create("meta-baseline", backbone=torch.nn.Identity(), temperature=3.0).double()
    support = torch.randn(2, 6, 5, dtype=torch.float64)
    query = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    logits = head.head(support, labels, query, 3)
    for b in range(2):
        for c in range(3):
            centroid = support[b][labels[b] == c].mean(0)
            for q in range(4):
                cosine = torch.dot(query[b, q], centroid) / (query[b, q].norm() * centroid.norm())
                assert logits[b, q, c].item() == pytest.approx(3.0 * cosine.item(), abs=1e-12)


def test_the_temperature_learns() -> None:
    head = LEARNERS.create("meta-baseline", backbone=torch.nn.Identity())
    support, query = torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    logits = head.head(support, torch.tensor([[0, 0, 1, 1]]), query, 2)
    torch.nn.functional.cross_entropy(logits[0], torch.tensor([0, 1])).backward()
    assert head.temperature.grad is not None and head.temperature.grad.abs() > 0
    with pytest.raises(UserError, match="temperature > 0"):
        LEARNERS.create("meta-baseline", backbone=torch.nn.Identity(), temperature=0)


def test_the_recipe_is_the_papers_meta_stage() -> None:
    cfg = apply_recipe(RunConfig(method="meta-baseline", dataset="miniimagenet", shots=5))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.001, 0.9, 0.0005)
    assert (cfg.meta_batch, cfg.train_episodes, cfg.train_shots, cfg.train_queries) == (4, 16000, 5, 15)
    assert cfg.backbone == "resnet12" and cfg.lr_milestones == []


def test_meta_baseline_starts_from_a_pretraining_run(data_root: Path, tmp_path: Path) -> None:
    common = ["--device", "cpu", "--quiet", "--eval-episodes", "8", "--val-episodes", "4", "--image-size", "16"]
    common += ["--backbone-option", "hidden=8", "--transform", "none", "--objective", "baseline"]
    source, started = tmp_path / "pretrain", tmp_path / "meta"
    root = ["--data-root", str(data_root), "run", *common]
    assert (
        main([*root, "--method", "pretrain", "--train-episodes", "64", "--val-every", "64", "--out", str(source)]) == 0
    )
    args = ["--method", "meta-baseline", "--train-episodes", "4", "--val-every", "2", "--init-from", str(source)]
    assert main([*root, *args, "--out", str(started)]) == 0
    results = json.loads((started / "results.json").read_text())
    assert results["init_from"]["run_dir"] == str(source) and results["recipe"]["name"] == "meta-baseline"
