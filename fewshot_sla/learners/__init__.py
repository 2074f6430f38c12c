"""Learners (``LEARNERS``): B episodes in, query logits out; importing this package registers them."""

from fewshot_sla.learners import maml, matchingnet, metaoptnet_ridge, metaoptnet_svm, protonet, relationnet

__all__ = ["maml", "matchingnet", "metaoptnet_ridge", "metaoptnet_svm", "protonet", "relationnet"]
