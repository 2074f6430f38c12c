"""The learner protocol: a batch of episodes in, query logits out. Learners know nothing about SLA."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch
from torch import nn

UNCONVERGED = "_unconverged"
# The training losses a learner's logits can ask for (``Learner.loss_kind``; the objectives apply them).
CROSS_ENTROPY = "cross_entropy"  # softmax cross-entropy of the logits
MSE_SIGMOID = "mse_sigmoid"  # mean squared error of sigmoid(logits) against one-hot targets (Relation Networks)
# How a learner is trained (``Learner.regime``): on episodes (meta-training), or on shuffled batches of labelled
# images over every training class (pretraining: ``episodes.ImageBatchSampler``, a classifier of its own).
EPISODIC = "episodic"
PRETRAINING = "pretraining"


class Learner(nn.Module):
    """Maps B episodes to query logits, differentiably.

    ``forward(support [B,S,C,H,W] float, support_labels [B,S] int64 in 0..ways-1,
    query [B,Q,C,H,W] float, ways) -> logits [B,Q,ways]``.
    ``self.training`` selects training-time settings (e.g. solver iterations, inner steps).
    """

    # Whether each episode's logits depend on that episode alone, in training mode too (no statistics shared
    # across the episodes of a pass): then a meta-batch split into micro-batches gives the same gradient.
    episodes_independent: ClassVar[bool] = False
    # How the trainer feeds it (EPISODIC or PRETRAINING). A PRETRAINING learner is an EmbeddingLearner whose training
    # batches are B single images with no support, labelled among all ``ways`` training classes, and which gets
    # ``add_classifier(features, classes)`` for each width its objective trains (``Objective.training_ways``).
    regime: ClassVar[str] = EPISODIC
    # Whether the backbone's stages may be checkpointed (recomputed in backward from the module's parameters).
    supports_checkpointing: ClassVar[bool] = True
    # The loss the objectives train the logits with (CROSS_ENTROPY or MSE_SIGMOID); predictions take the arg-max.
    loss_kind: ClassVar[str] = CROSS_ENTROPY
    # Whether relabelling an episode's classes permutes the logits' columns the same way (False for a learner that
    # ties a label to its own parameters by design, such as MAML's learned output layer).
    label_equivariant: bool = True

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def preferred_micro_batch(self) -> int | None:
        """Episodes per backward pass when a run sets none (None: all of a process's episodes at once)."""
        return None

    def settings(self) -> dict[str, object]:
        """Choices that change what the learner computes, recorded in results.json (e.g. a solver)."""
        return {}

    def pop_diagnostics(self) -> dict[str, float]:
        """Statistics of the calls since the last ``pop_diagnostics``, then reset. Keys ending in
        ``UNCONVERGED`` are fractions of episodes whose inner solver stopped short of its tolerance; the engine
        logs every key and warns when such a fraction is above 0."""
        return {}

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
    ) -> torch.Tensor:
        raise NotImplementedError


class EmbeddingLearner(Learner):
    """A learner whose logits depend on the images only through per-image backbone embeddings.

    Such learners split into ``embed`` (one backbone pass over every image of every episode) and
    ``head`` (the per-episode classifier on embeddings), which lets evaluation cache embeddings.
    """

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, R, C, H, W] images -> [B, R, D] embeddings, in one backbone pass."""
        b, r = images.shape[:2]
        features: torch.Tensor = self.backbone(images.flatten(0, 1))
        return features.reshape(b, r, -1)

    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> logits [B,Q,ways]."""
        raise NotImplementedError

    def forward(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
    ) -> torch.Tensor:
        s = support.shape[1]
        features = self.embed(torch.cat([support, query], dim=1))
        return self.head(features[:, :s], support_labels, features[:, s:], ways)


HeadMethod = TypeVar("HeadMethod", bound=Callable[..., torch.Tensor])


def full_precision(head: HeadMethod) -> HeadMethod:
    """Decorator for ``EmbeddingLearner.head``: solve in float32 or wider, even under autocast (AMP).

    Distances and linear solves lose too much in float16/bfloat16; the backbone keeps its mixed
    precision, the per-episode head (cheap) does not.
    """

    @functools.wraps(head)
    def wrapped(
        self: EmbeddingLearner,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        device_type = support_features.device.type
        dtype = torch.promote_types(torch.promote_types(support_features.dtype, query_features.dtype), torch.float32)
        with torch.autocast(device_type, enabled=False):
            return head(self, support_features.to(dtype), support_labels, query_features.to(dtype), ways)

    return wrapped  # type: ignore[return-value]
