"""Published training recipes (optimizer, LR schedule, training ways/shots/queries, meta-batch, budget).

``apply_recipe`` fills every field a configuration leaves ``None``. Schedules are stored as fractions of
the episode budget, so a recipe keeps its shape at any ``--train-episodes``. On real datasets the default
budget is the published one. On the embedded ``synthetic`` set (32x32) the recipes are scaled to a CPU: a
short budget (ProtoNet: 300 episodes, measured at about 1 minute on a 2-core CPU including the synthetic set's
generation and the 1000 test episodes), training on the test ways, and ProtoNet with 5 training queries per class instead of 15
(the published higher-way, 15-query training would cost 18x more per episode there; on this set 5 queries
reach the accuracy of 15 at a third of the cost).

Plug-in learners without an entry here train with ``GENERIC`` (Adam 1e-3, test ways/shots); a plug-in
package may add its own: ``RECIPES["my-learner"] = my_recipe_function``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fewshot_sla.config import RunConfig

QUICK_DATASETS = ("synthetic",)

RecipeFunction = Callable[[RunConfig], dict[str, Any]]


def _quick(cfg: RunConfig) -> bool:
    return cfg.dataset in QUICK_DATASETS


# Adam at 1e-3 without momentum or weight decay (ProtoNet, MAML and the generic recipe start from it).
ADAM = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def protonet(cfg: RunConfig) -> dict[str, Any]:
    """Snell et al. 2017: Adam 1e-3 halved every 2000 of 20,000 episodes; 30-way (1-shot) / 20-way training.

    With a ResNet-12 backbone, the MetaOptNet paper's ProtoNet instead: MetaOptNet's recipe and the scaled head.
    """
    if cfg.backbone == "resnet12":
        return {**metaoptnet(cfg), "backbone": "resnet12", "learner_options": {"scaled": True}}
    higher_way = 30 if cfg.shots == 1 else 20
    return {
        "backbone": "conv4",
        **ADAM,
        "lr_milestones": [k / 10 for k in range(1, 10)],
        "lr_factors": [0.5**k for k in range(1, 10)],
        "train_ways": cfg.ways if _quick(cfg) else higher_way,
        "train_shots": cfg.shots,
        "train_queries": 5 if _quick(cfg) else 15,
        "meta_batch": 1,
        "augment": False,
        "train_episodes": 300 if _quick(cfg) else 20000,
    }


def maml(cfg: RunConfig) -> dict[str, Any]:
    """Finn et al. 2017: conv4 with 32 filters, Adam 1e-3, meta-batch 4 (1-shot) / 2 (5-shot), 60,000 steps."""
    meta_batch = 4 if cfg.shots == 1 else 2
    return {
        "backbone": "conv4",
        "backbone_options": {"hidden": 32} if cfg.backbone in (None, "conv4") and not cfg.backbone_options else {},
        **ADAM,
        "lr_milestones": [],
        "lr_factors": [],
        "train_ways": cfg.ways,
        "train_shots": cfg.shots,
        "train_queries": 15,
        "meta_batch": meta_batch,
        "augment": False,
        "train_episodes": 400 if _quick(cfg) else 60000 * meta_batch,
    }


def metaoptnet(cfg: RunConfig) -> dict[str, Any]:
    """Lee et al. 2019: SGD Nesterov 0.9, wd 5e-4, lr 0.1 x {0.06, 0.012, 0.0024} at epochs 20/40/50 of 60,
    8 episodes per batch, 15-shot (5 on CIFAR-FS) 6-query training, crop/flip/jitter augmentation."""
    return {
        "backbone": "conv4",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "lr_milestones": [20 / 60, 40 / 60, 50 / 60],
        "lr_factors": [0.06, 0.012, 0.0024],
        "train_ways": cfg.ways,
        "train_shots": 5 if cfg.dataset in ("cifarfs", "synthetic") else 15,
        "train_queries": 6,
        "meta_batch": 8,
        "augment": True,
        "train_episodes": 240 if _quick(cfg) else 60 * 1000 * 8,
    }


def generic(cfg: RunConfig) -> dict[str, Any]:
    """For plug-in learners without a recipe: Adam 1e-3, constant, training on the test ways/shots."""
    return {
        "backbone": "conv4",
        **ADAM,
        "lr_milestones": [],
        "lr_factors": [],
        "train_ways": cfg.ways,
        "train_shots": cfg.shots,
        "train_queries": cfg.queries,
        "meta_batch": 1,
        "augment": False,
        "train_episodes": 300 if _quick(cfg) else 20000,
    }


GENERIC: RecipeFunction = generic
RECIPES: dict[str, RecipeFunction] = {
    "protonet": protonet,
    "maml": maml,
    "maml-fo": maml,
    "metaoptnet-svm": metaoptnet,
    "metaoptnet-ridge": metaoptnet,
}


def default_val_every(train_episodes: int) -> int:
    """Validate every 500 episodes, or 20 times per run on long budgets, never beyond the budget."""
    return min(train_episodes, max(500, train_episodes // 20))


def apply_recipe(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every ``None`` field (and empty backbone options where the recipe sets some) filled in."""
    recipe = RECIPES.get(cfg.method, GENERIC)(cfg)
    values: dict[str, Any] = {}
    for name, value in recipe.items():
        current = getattr(cfg, name)
        if name in ("backbone_options", "learner_options"):
            if not current and value:
                values[name] = value
        elif current is None:
            values[name] = value
    if (cfg.lr_milestones is None) != (cfg.lr_factors is None):  # half a schedule: let validate() say so
        values.pop("lr_milestones", None)
        values.pop("lr_factors", None)
    out = dataclasses.replace(cfg, **values)
    if out.val_every is None:
        out = dataclasses.replace(out, val_every=default_val_every(out.train_episodes or 1))
    return out.validate()
