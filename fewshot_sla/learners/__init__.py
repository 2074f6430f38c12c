"""Learners (``LEARNERS``): B episodes in, query logits out; importing this package registers them."""

from fewshot_sla.learners import maml, metaoptnet_ridge, metaoptnet_svm, protonet

__all__ = ["maml", "metaoptnet_ridge", "metaoptnet_svm", "protonet"]
