"""The pretraining regime's learner (``pretrain``): the backbone plus a classifier over every training class, trained
on shuffled mini-batches of images (Baseline / Baseline++, Chen et al. ICLR 2019; RFS, Tian et al. ECCV 2020; the
first stage of Meta-Baseline, Chen et al. ICCV 2021; SLA's reference code, Lee et al. ICML 2020), and tested on
few-shot episodes with a head on its embeddings.

Training (``regime = "pretraining"``): the trainer hands it batches of single labelled images with no support
(``episodes.ImageBatchSampler``), ``ways`` the number of training classes C, or C*M under SLA's joint labels
``y*M + j`` (the objective relabels the copies; the learner knows nothing about SLA). It keeps one classifier per
width the objective uses (``add_classifier``; SLA+SD uses C*M and C, as the reference code's joint and single
heads): ``linear`` (``nn.Linear``, as RFS and SLA) or ``cosine`` (Baseline++'s ``distLinear``: L2-normalised
features times per-class weight vectors of learnable norm, ``weight_norm`` on a bias-free linear layer, times a
scale of 2 for at most 200 classes and 10 above, as Chen et al.'s code).

Evaluation (episodes of novel classes, in eval mode): ``eval_head`` on the embeddings, a learner without
parameters of its own: ``nearest-centroid`` (SimpleShot / Meta-Baseline's test, the default), ``logistic-regression``
(RFS) or ``protonet``; ``eval_options`` its options. With SLA the objective hands the support's transformed copies
as N*M joint classes and aggregates the queries' copies (SLA+SI, SLA+AG), as for every episodic learner.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import PRETRAINING, EmbeddingLearner
from fewshot_sla.registry import LEARNERS

CLASSIFIERS = ("linear", "cosine")
EVAL_HEADS = ("nearest-centroid", "logistic-regression", "protonet")
DEFAULT_EVAL_HEAD = "nearest-centroid"


class CosineClassifier(nn.Module):
    """Baseline++'s classifier (Chen et al.'s ``distLinear``): ``scale * <x/(|x|+1e-5), g_c v_c/|v_c|>`` per class c,
    with ``v`` a bias-free linear layer's weights and ``g_c`` their learnable norms (``weight_norm``, dim 0)."""

    def __init__(self, features: int, classes: int, scale: float | None = None) -> None:
        super().__init__()
        self.linear = nn.utils.parametrizations.weight_norm(nn.Linear(features, classes, bias=False), dim=0)
        self.scale = float(scale) if scale is not None else (2.0 if classes <= 200 else 10.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normalized = features / (features.norm(dim=-1, keepdim=True) + 1e-5)
        logits: torch.Tensor = self.linear(normalized)
        return self.scale * logits


@LEARNERS.register("pretrain")
class Pretrain(EmbeddingLearner):
    """A backbone and a classifier over all training classes (see the module docstring).

    Options: ``classifier`` (``linear`` or ``cosine``), ``scale`` (the cosine classifier's; default Chen et al.'s),
    ``eval_head`` (``nearest-centroid``, ``logistic-regression`` or ``protonet``), ``eval_options`` (its options).
    """

    regime: ClassVar[str] = PRETRAINING
    label_equivariant = False  # a training label is a row of the classifier

    def __init__(
        self,
        backbone: nn.Module,
        classifier: str = "linear",
        scale: float | None = None,
        eval_head: str = DEFAULT_EVAL_HEAD,
        eval_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(backbone)
        if classifier not in CLASSIFIERS:
            raise UserError(f"pretrain's classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise UserError(f"pretrain's scale must be a number > 0 (the cosine classifier's), got {scale!r}")
        if eval_head not in EVAL_HEADS:
            raise UserError(f"pretrain's eval_head must be one of {', '.join(EVAL_HEADS)}, got {eval_head!r}")
        if eval_options is not None and not isinstance(eval_options, dict):
            raise UserError(f"pretrain's eval_options must be a mapping of the head's options, got {eval_options!r}")
        self.classifier = classifier
        self.scale = scale
        self.eval_head = eval_head
        self.eval_options = dict(eval_options or {})
        # The head of novel-class episodes has no parameters; kept outside the module tree so that the state dict
        # holds the backbone and the classifiers only.
        self.__dict__["evaluator"] = LEARNERS.create(eval_head, backbone=nn.Identity(), **self.eval_options)
        self.classifiers = nn.ModuleDict()

    @property
    def evaluator(self) -> EmbeddingLearner:
        """The evaluation head of novel-class episodes (outside the module tree: no parameters of its own)."""
        head: EmbeddingLearner = self.__dict__["evaluator"]
        return head

    def add_classifier(self, features: int, classes: int) -> None:
        """A classifier for ``classes``-way training batches (once per width), on ``features``-dim embeddings."""
        key = str(classes)
        if key in self.classifiers:
            return
        head = (
            CosineClassifier(features, classes, self.scale)
            if self.classifier == "cosine"
            else nn.Linear(features, classes)
        )
        like = next(self.backbone.parameters(), None)  # on the backbone's device, in its dtype
        self.classifiers[key] = head if like is None else head.to(like)

    def settings(self) -> dict[str, object]:
        """The classifier and the evaluation head (recorded in results.json)."""
        return {
            "classifier": self.classifier,
            "classifier_widths": sorted(int(k) for k in self.classifiers),
            "eval_head": self.eval_head,
            "eval_settings": self.evaluator.settings(),
        }

    def pop_diagnostics(self) -> dict[str, float]:
        return self.evaluator.pop_diagnostics()

    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """Training: the ``ways``-way classifier's logits of the queries ``[B, Q, ways]`` (the support, empty, is
        ignored). Evaluation: the evaluation head on the episode."""
        if not self.training:
            return self.evaluator.head(support_features, support_labels, query_features, ways)
        if str(ways) not in self.classifiers:
            widths = ", ".join(sorted(self.classifiers, key=int)) or "none"
            raise UserError(
                f"pretrain has no {ways}-way classifier (it has: {widths}); it is trained on batches of every "
                "training class, built by the pretraining regime"
            )
        logits: torch.Tensor = self.classifiers[str(ways)](query_features)
        return logits
