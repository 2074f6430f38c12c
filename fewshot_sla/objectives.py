"""Training objectives: how an episode becomes a loss, and which N-way predictions a method offers.

The comparisons of the SLA paper, for any learner mapping ``(support, support_labels, query, ways)``
to query logits: ``baseline`` (plain episode), ``da`` (transformed copies keep their label), ``mt``
(plain task plus a transformation-prediction head), ``sla`` (joint N*M-way labels; SI and AG
predictions) and ``sla+sd`` (``sla`` plus a plain prediction distilled from the aggregated one).

Every loss on the learner's logits is the one the learner declares (``Learner.loss_kind``): cross-entropy, or for
``relationnet`` the mean squared error of sigmoid scores against one-hot targets ("cross-entropy" below means it).

An objective may hold parameters (``mt``'s head): the optimiser must include ``objective.parameters()``.
For an ``EmbeddingLearner``, ``mt`` and ``sla+sd`` take the plain (t_1) embeddings from the rows of the
transformed batch instead of a second backbone pass; in training mode the plain rows then share
batch-norm statistics with their transformed copies, as in the reference implementation.

Prediction is written once per objective, in ``predict_copies(classify, copies)``: ``copies`` holds every
support and query image with its ``prediction_copies`` transformed copies (sample-major), either as images or
as per-copy embeddings, and ``classify`` is the matching learner call (the learner itself, or an
``EmbeddingLearner``'s ``head``). ``predict`` feeds it images; cached evaluation feeds it stored embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import MSE_SIGMOID, EmbeddingLearner, Learner
from fewshot_sla.prediction_kinds import PLAIN, SLA_AG, SLA_SD, SLA_SI, PredictionKind
from fewshot_sla.registry import OBJECTIVES
from fewshot_sla.sla import (
    Episode,
    Transformation,
    aggregate_ag,
    aggregate_si,
    augment_episode,
    joint_labels,
    resolve_transform,
    self_distillation_loss,
    transformation_labels,
)

# The objective every other one is compared with (paired differences in leaderboards, ``compare``).
BASELINE = "baseline"

# (support [B,S,...], support_labels [B,S], query [B,Q,...], ways) -> logits [B,Q,ways]: a learner on images,
# or an EmbeddingLearner's head on embeddings.
Classify = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class CopiedEpisode:
    """B episodes whose images come with ``m`` transformed copies each, as images or as per-copy embeddings.

    ``support`` ``[B, S*m, ...]`` and ``query`` ``[B, Q*m, ...]`` are sample-major (row ``r*m + j`` is copy j of
    row r, copy 0 the identity); ``support_labels`` ``[B, S]`` and ``query_labels`` ``[B, Q]`` are the N-way labels.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    ways: int
    m: int

    def identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The identity copies: support ``[B, S, ...]`` and query ``[B, Q, ...]``."""
        if self.m == 1:
            return self.support, self.query
        return _identity_rows(self.support, self.m), _identity_rows(self.query, self.m)


def _forward(learner: Learner, episode: Episode) -> torch.Tensor:
    """The learner's query logits ``[B, Q, ways]`` on ``episode`` as it is."""
    logits: torch.Tensor = learner(episode.support, episode.support_labels, episode.query, episode.ways)
    return logits


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[..., C]`` against labels ``[...]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _task_loss(learner: Learner, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the learner declares (``loss_kind``) of logits ``[..., C]`` against labels ``[...]``: cross-entropy,
    or the mean squared error of sigmoid scores against one-hot targets over every query and class."""
    if learner.loss_kind == MSE_SIGMOID:
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.mse_loss(torch.sigmoid(logits), targets)
    return _cross_entropy(logits, labels)


def _distillation_loss(
    learner: Learner, single: torch.Tensor, aggregated: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """SLA+SD's loss of the plain prediction: CE + KL towards the aggregated one, or for MSE_SIGMOID learners the
    same in their own loss: MSE to one-hot targets + MSE to the aggregated sigmoid scores (detached)."""
    if learner.loss_kind == MSE_SIGMOID:
        target = torch.sigmoid(aggregated.detach())
        return _task_loss(learner, single, labels) + F.mse_loss(torch.sigmoid(single), target)
    return self_distillation_loss(single, aggregated, labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the label (a tensor, to be synchronised once)."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def _metrics(**values: torch.Tensor) -> dict[str, float]:
    """Scalar tensors -> floats, with a single device synchronisation."""
    numbers = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return dict(zip(values, numbers))


def _embed_transformed(
    learner: EmbeddingLearner, support: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of transformed support and query ``[B, R*M, D]`` in one backbone pass."""
    features = learner.embed(torch.cat([support, query], dim=1))
    return features[:, : support.shape[1]], features[:, support.shape[1] :]


def _identity_rows(rows: torch.Tensor, m: int) -> torch.Tensor:
    """Rows of the identity copies t_1 of sample-major rows ``[B, R*M, ...]`` -> ``[B, R, ...]``."""
    return rows[:, ::m].contiguous()


class Objective(nn.Module):
    """A training objective over any learner: ``loss`` for meta-training, ``predict`` for evaluation.

    ``loss(learner, episode) -> (scalar loss, metrics)`` and ``predict(learner, episode) -> {kind:
    logits [B, N*Q, N]}`` take a normalised float episode; the default prediction is the learner on the
    plain episode (kind ``plain``). Metrics always hold ``loss`` and ``acc`` (the training accuracy of the
    logits the loss is computed on: N*M-way joint labels for ``sla``), plus per-objective extras.

    ``kinds`` declares the predictions (see ``prediction_kinds``); ``uses_copies`` says whether they need the
    transformed copies of every image (else the identity copy alone).
    """

    kinds: ClassVar[tuple[PredictionKind, ...]] = (PLAIN,)
    uses_copies: ClassVar[bool] = False

    def __init__(self, transform: Transformation | str = "none", feature_dim: int = 0) -> None:
        super().__init__()
        self.transform = resolve_transform(transform)
        self.feature_dim = feature_dim

    def learner_ways(self, ways: int) -> int:
        """The ways of the episodes this objective hands the learner in training, for N-way training episodes."""
        return ways

    def training_ways(self, ways: int) -> tuple[int, ...]:
        """Every width of logits this objective asks of the learner in training, for N-way training episodes (a
        pretraining learner keeps one classifier per width)."""
        return (self.learner_ways(ways),)

    @property
    def prediction_copies(self) -> int:
        """How many copies of each image (the first ones of the transformation) the predictions use."""
        return self.transform.m if self.uses_copies else 1

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss on one batch of episodes, and float metrics for logging."""
        raise NotImplementedError

    def predict_copies(self, classify: Classify, copies: CopiedEpisode) -> dict[str, torch.Tensor]:
        """N-way query logits ``[B, Q, N]`` of each declared kind, from images or embeddings with their copies."""
        support, query = copies.identity()
        return {PLAIN.name: classify(support, copies.support_labels, query, copies.ways)}

    def predict(self, learner: Learner, episode: Episode) -> dict[str, torch.Tensor]:
        """N-way query logits ``[B, N*Q, N]`` of each prediction this objective offers, from images."""
        m = self.prediction_copies
        support, query = episode.support, episode.query
        if m > 1:
            support, query = self.transform(support), self.transform(query)
        classify: Classify = learner
        if isinstance(learner, EmbeddingLearner):
            support, query = _embed_transformed(learner, support, query)
            classify = learner.head
        copies = CopiedEpisode(support, episode.support_labels, query, episode.query_labels, episode.ways, m)
        return self.predict_copies(classify, copies)


@OBJECTIVES.register(BASELINE)
class Baseline(Objective):
    """Cross-entropy on the plain N-way episode; the transformation is not used."""

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        logits = _forward(learner, episode)
        loss = _task_loss(learner, logits, episode.query_labels)
        return loss, _metrics(loss=loss, acc=_accuracy(logits, episode.query_labels))


@OBJECTIVES.register("da")
class DataAugmentation(Objective):
    """Plain data augmentation: support and query are transformed M ways and keep the original label.

    Prediction (``plain``) uses the untransformed episode, the usual test protocol for augmentation.
    """

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.transform.m
        query_labels = episode.query_labels.repeat_interleave(m, dim=-1)
        logits = learner(
            self.transform(episode.support),
            episode.support_labels.repeat_interleave(m, dim=-1),
            self.transform(episode.query),
            episode.ways,
        )
        loss = _task_loss(learner, logits, query_labels)
        return loss, _metrics(loss=loss, acc=_accuracy(logits, query_labels))


@OBJECTIVES.register("mt")
class MultiTask(Objective):
    """Multi-task: the plain N-way loss plus a linear head predicting the transformation index j.

    The head reads ``learner.backbone`` features of every transformed support and query image; the two
    cross-entropies are summed. Prediction (``plain``) is the learner on the plain episode.
    """

    def __init__(self, transform: Transformation | str = "none", feature_dim: int = 0) -> None:
        super().__init__(transform, feature_dim)
        if feature_dim < 1:
            raise UserError(
                f"objective 'mt' needs feature_dim >= 1 (got {feature_dim}); "
                "pass the backbone's output size, backbone.feature_dim(image_size)"
            )
        self.transform_head = nn.Linear(feature_dim, self.transform.m)

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.transform.m
        support, query = self.transform(episode.support), self.transform(episode.query)
        if isinstance(learner, EmbeddingLearner):
            support_features, query_features = _embed_transformed(learner, support, query)
            logits = learner.head(
                _identity_rows(support_features, m),
                episode.support_labels,
                _identity_rows(query_features, m),
                episode.ways,
            )
            features = torch.cat([support_features, query_features], dim=1)
        else:
            logits = _forward(learner, episode)
            features = learner.backbone(torch.cat([support, query], dim=1).flatten(0, 1))
        features = features.reshape(-1, features.shape[-1])
        if features.shape[-1] != self.feature_dim:
            raise UserError(
                f"objective 'mt' was built with feature_dim={self.feature_dim} but the backbone gives "
                f"{features.shape[-1]} features; pass feature_dim=backbone.feature_dim(image_size)"
            )
        transform_logits = self.transform_head(features)
        transform_targets = transformation_labels(features.shape[0] // m, m, device=features.device)
        task_loss = _task_loss(learner, logits, episode.query_labels)
        transform_loss = F.cross_entropy(transform_logits, transform_targets)
        loss = task_loss + transform_loss
        return loss, _metrics(
            loss=loss,
            loss_task=task_loss,
            loss_transform=transform_loss,
            acc=_accuracy(logits, episode.query_labels),
            acc_transform=_accuracy(transform_logits, transform_targets),
        )


@OBJECTIVES.register("sla")
class LabelAugmentation(Objective):
    """SLA: cross-entropy over the N*M joint labels of the transformed queries (N*M-way episode).

    Predictions: ``si`` (identity copy, its own N columns) and ``ag`` (logits averaged over copies).
    """

    kinds: ClassVar[tuple[PredictionKind, ...]] = (SLA_SI, SLA_AG)
    uses_copies = True

    def learner_ways(self, ways: int) -> int:
        """N*M: the learner sees the joint (class, transformation) labels."""
        return ways * self.transform.m

    def _joint(self, learner: Learner, episode: Episode) -> tuple[Episode, torch.Tensor]:
        augmented = augment_episode(episode, self.transform)
        return augmented, _forward(learner, augmented)

    def _joint_copies(self, classify: Classify, copies: CopiedEpisode) -> torch.Tensor:
        """Joint logits ``[B, Q*M, N*M]`` of the N*M-way episode the copies form."""
        m = copies.m
        return classify(copies.support, joint_labels(copies.support_labels, m), copies.query, copies.ways * m)

    def _sla_terms(
        self, learner: Learner, joint: torch.Tensor, augmented: Episode, episode: Episode
    ) -> dict[str, torch.Tensor]:
        """The joint loss and the training accuracies of the joint, SI and AG predictions."""
        m = self.transform.m
        return {
            "loss_sla": _task_loss(learner, joint, augmented.query_labels),
            "acc": _accuracy(joint, augmented.query_labels),
            "acc_si": _accuracy(aggregate_si(joint, m), episode.query_labels),
            "acc_ag": _accuracy(aggregate_ag(joint, m), episode.query_labels),
        }

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        augmented, joint = self._joint(learner, episode)
        terms = self._sla_terms(learner, joint, augmented, episode)
        loss = terms.pop("loss_sla")
        return loss, _metrics(loss=loss, **terms)

    def predict_copies(self, classify: Classify, copies: CopiedEpisode) -> dict[str, torch.Tensor]:
        joint = self._joint_copies(classify, copies)
        return {SLA_SI.name: aggregate_si(joint, copies.m), SLA_AG.name: aggregate_ag(joint, copies.m)}


@OBJECTIVES.register("sla+sd")
class SelfDistillation(LabelAugmentation):
    """SLA plus self-distillation: a plain N-way prediction (the learner on the untransformed episode)
    trained with CE + KL towards the detached aggregated prediction. Predictions: ``si``, ``ag``, ``sd``.
    """

    kinds: ClassVar[tuple[PredictionKind, ...]] = (SLA_SI, SLA_AG, SLA_SD)

    def training_ways(self, ways: int) -> tuple[int, ...]:
        """N*M (the joint prediction) and N (the distilled plain one)."""
        return (self.learner_ways(ways), ways)

    def _joint_and_single(self, learner: Learner, episode: Episode) -> tuple[Episode, torch.Tensor, torch.Tensor]:
        """The augmented episode, its joint logits, and the plain logits (sharing one backbone pass
        when the learner is an EmbeddingLearner)."""
        augmented = augment_episode(episode, self.transform)
        if not isinstance(learner, EmbeddingLearner):
            return augmented, _forward(learner, augmented), _forward(learner, episode)
        m = self.transform.m
        support_features, query_features = _embed_transformed(learner, augmented.support, augmented.query)
        joint = learner.head(support_features, augmented.support_labels, query_features, augmented.ways)
        single = learner.head(
            _identity_rows(support_features, m),
            episode.support_labels,
            _identity_rows(query_features, m),
            episode.ways,
        )
        return augmented, joint, single

    def loss(self, learner: Learner, episode: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        augmented, joint, single = self._joint_and_single(learner, episode)
        terms = self._sla_terms(learner, joint, augmented, episode)
        aggregated = aggregate_ag(joint, self.transform.m)
        sd_loss = _distillation_loss(learner, single, aggregated, episode.query_labels)
        loss = terms["loss_sla"] + sd_loss
        return loss, _metrics(loss=loss, loss_sd=sd_loss, acc_sd=_accuracy(single, episode.query_labels), **terms)

    def predict_copies(self, classify: Classify, copies: CopiedEpisode) -> dict[str, torch.Tensor]:
        joint = self._joint_copies(classify, copies)
        support, query = copies.identity()
        single = classify(support, copies.support_labels, query, copies.ways)
        m = copies.m
        return {SLA_SI.name: aggregate_si(joint, m), SLA_AG.name: aggregate_ag(joint, m), SLA_SD.name: single}
