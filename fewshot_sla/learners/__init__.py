"""Learners (``LEARNERS``): B episodes in, query logits out; importing this package registers them."""

from fewshot_sla.learners import (
    logistic_regression,
    maml,
    matchingnet,
    meta_baseline,
    metaoptnet_ridge,
    metaoptnet_svm,
    nearest_centroid,
    pretrain,
    protonet,
    relationnet,
)

__all__ = [
    "logistic_regression",
    "maml",
    "matchingnet",
    "meta_baseline",
    "metaoptnet_ridge",
    "metaoptnet_svm",
    "nearest_centroid",
    "pretrain",
    "protonet",
    "relationnet",
]
