"""The public contract checks (``fewshot_sla.testing``): every registered backbone, learner, transformation and
objective passes them, and each check fails, naming the problem, on a deliberately broken toy plug-in."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.backbones.conv4 import Conv4
from fewshot_sla.learners.protonet import ProtoNet
from fewshot_sla.objectives import Baseline, LabelAugmentation
from fewshot_sla.prediction_kinds import PLAIN, SLA_SI, PredictionKind
from fewshot_sla.registry import BACKBONES, LEARNERS, OBJECTIVES, TRANSFORMS
from fewshot_sla.sla import Transformation
from fewshot_sla.testing import (
    ContractError,
    check_all_registered,
    check_backbone,
    check_learner,
    check_objective,
    check_transform,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- every registered entry passes


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_registered_backbone_keeps_the_contract(name: str) -> None:
    check_backbone(name)


def test_the_strided_conv4_and_greyscale_backbones_keep_the_contract() -> None:
    check_backbone("conv4", options={"hidden": 4, "strided": True})
    check_backbone("conv4", channels=1, options={"hidden": 4})


@pytest.mark.parametrize("name", LEARNERS.names())
def test_every_registered_learner_keeps_the_contract(name: str) -> None:
    check_learner(name)


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_every_registered_transform_keeps_the_contract(name: str) -> None:
    check_transform(name)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_registered_objective_keeps_the_contract(name: str) -> None:
    check_objective(name)


def test_the_checks_leave_the_callers_random_state_and_grad_mode_alone() -> None:
    state = torch.get_rng_state()
    with torch.no_grad():
        check_learner("protonet", objectives=())
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_maml_is_exempt_from_label_equivariance_only_with_its_learned_head() -> None:
    """MAML's learned head starts class c's classifier from row c, by design; with head='zero' every class starts
    alike, and the check holds it to equivariance."""
    check_learner("maml", options={"head": "zero", "train_steps": 1, "test_steps": 2}, objectives=())


def _raises(call, *fragments: str) -> str:
    with pytest.raises(ContractError) as raised:
        call()
    message = str(raised.value)
    assert isinstance(raised.value, AssertionError)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------- broken backbones


class Small(nn.Module):
    """A backbone that keeps the contract: conv -> ReLU -> spatial mean -> linear, 8 features."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4, 8)

    def feature_dim(self, image_size: int) -> int:
        return 8

    def run(self, conv: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(conv(images)).mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.conv, images)


class ListedLayer(Small):
    """Keeps its convolution in a plain list: not registered, so no tool that copies or replaces the parameters
    sees it."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.layers = [nn.Conv2d(in_channels, 4, 3, padding=1)]
        del self.conv

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.layers[0], images)


class HiddenLayer(Small):
    """The same, out of sight of a scan of plain containers (inside another object)."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.hidden = types.SimpleNamespace(conv=nn.Conv2d(in_channels, 4, 3, padding=1))
        del self.conv

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.hidden.conv, images)


class AliasedStage(Small):
    """A registered convolution that forward runs through a plan object of its own (as Conv-4 once ran its blocks
    from a plain list): a learn2learn clone shares the plan and still runs the original's convolution."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.plan = types.SimpleNamespace(conv=self.conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(self.plan.conv, images)


class BatchMixing(Small):
    """Features centred on the batch mean, in evaluation mode too."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = super().forward(images)
        return features - features.mean(0, keepdim=True)


class WrongFeatureDim(Small):
    def feature_dim(self, image_size: int) -> int:
        return 16


class UnusedParameter(Small):
    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.unused = nn.Parameter(torch.zeros(3))


class CountsInEvaluation(Small):
    """Counts its calls in a buffer, in evaluation mode too."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(in_channels)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(images)


class DropoutInEvaluation(Small):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(images), 0.5, training=True)


def ignores_in_channels(in_channels: int = 3) -> nn.Module:
    """Takes in_channels, builds an RGB backbone anyway."""
    return Small(3)


def rgb_only() -> nn.Module:
    return Small(3)


def test_a_backbone_that_keeps_the_contract_passes_in_rgb_and_greyscale() -> None:
    check_backbone(Small)
    check_backbone(Small, channels=1)
    check_backbone(Small(), image_size=8)


@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        (ListedLayer, ["holds ListedLayer.layers[0] (a Conv2d) outside its registered submodules", "nn.ModuleList"]),
        (HiddenLayer, ["computes with 2 tensor(s) requiring gradients that are not its registered parameters"]),
        (AliasedStage, ["a learn2learn-style clone's output does not depend on its ['conv.weight', 'conv.bias']"]),
        (BatchMixing, ["in evaluation mode an image's features depend on the other images of the batch"]),
        (WrongFeatureDim, ["maps images [4, 3, 16, 16] to [4, 8]", "not [4, feature_dim(16)] = [4, 16]"]),
        (UnusedParameter, ["no gradient reaches ['unused']"]),
        (CountsInEvaluation, ["changes its state in evaluation mode (calls)"]),
        (DropoutInEvaluation, ["gives different features for the same images in evaluation mode"]),
        (ignores_in_channels, ["built with in_channels=1 (honour the in_channels option), the forward pass raised"]),
    ],
    ids=lambda v: getattr(v, "__name__", "") if callable(v) else "",
)
def test_check_backbone_names_what_a_broken_backbone_breaks(factory, fragments) -> None:
    message = _raises(lambda: check_backbone(factory), *fragments)
    assert message.startswith(f"backbone {__name__}.{factory.__qualname__}:")


def test_check_backbone_refuses_greyscale_for_a_backbone_without_in_channels() -> None:
    _raises(lambda: check_backbone(rgb_only, channels=1), "has no in_channels option")


def test_check_backbone_names_a_registered_plugin(monkeypatch) -> None:
    BACKBONES.names()
    monkeypatch.setattr(BACKBONES, "_entries", {**BACKBONES._entries, "listed": ListedLayer})
    _raises(lambda: check_backbone("listed"), f"backbone 'listed' ({__name__}.ListedLayer): holds")


# ----------------------------------------------------------------------------------------- broken learners


class MixingLearner(ProtoNet):
    """Distances scaled by the mean support feature size of the whole batch: the episodes of a batch mix."""

    def head(self, support_features, support_labels, query_features, ways):
        scale = support_features.square().mean()
        return super().head(support_features, support_labels, query_features, ways) / scale


class ClassBias(ProtoNet):
    """A learned bias per label: label c, not class c's images, gets the bias."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.bias = nn.Parameter(torch.linspace(-3.0, 3.0, 64))

    def head(self, support_features, support_labels, query_features, ways):
        return super().head(support_features, support_labels, query_features, ways) + self.bias[:ways]


class DeclaredClassBias(ClassBias):
    label_equivariant = False


class HingeLoss(ProtoNet):
    loss_kind = "hinge"


class ForwardNotHead(ProtoNet):
    """A forward pass that is not head(embed(...)): cached evaluation would compute something else."""

    def forward(self, support, support_labels, query, ways):
        return super().forward(support, support_labels, query, ways) * 2


class ClaimsIndependence(ProtoNet):
    """Declares episodes_independent over a backbone whose BatchNorm pools the batch in training mode."""

    episodes_independent = True


class ExtraColumn(ProtoNet):
    def head(self, support_features, support_labels, query_features, ways):
        logits = super().head(support_features, support_labels, query_features, ways)
        return torch.cat([logits, logits[..., :1]], dim=-1)


class Detached(ProtoNet):
    def head(self, support_features, support_labels, query_features, ways):
        return super().head(support_features.detach(), support_labels, query_features.detach(), ways)


class UnusedScale(ProtoNet):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.unused = nn.Parameter(torch.ones(()))


class NotALearner(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        (MixingLearner, ["in evaluation mode episode 0's logits change when it is run with the other episodes"]),
        (ClassBias, ["relabelling the support classes does not permute the logits' columns"]),
        (HingeLoss, ["declares loss_kind 'hinge'"]),
        (ForwardNotHead, ["head(embed(support), labels, embed(query), ways) differs from the forward pass"]),
        (ClaimsIndependence, ["declares episodes_independent, but in training mode episode 0's logits change"]),
        (ExtraColumn, ["gives logits [3, 6, 4] in evaluation mode", "not [B, N*Q, ways] = [3, 6, 3]"]),
        (Detached, ["gives logits that carry no gradient in training mode"]),
        (UnusedScale, ["in training mode no gradient of the loss reaches ['unused']"]),
        (NotALearner, ["not a fewshot_sla.learners.base.Learner"]),
    ],
    ids=lambda v: getattr(v, "__name__", "") if callable(v) else "",
)
def test_check_learner_names_what_a_broken_learner_breaks(factory, fragments) -> None:
    message = _raises(lambda: check_learner(factory, objectives=()), *fragments)
    assert message.startswith(f"learner {__name__}.{factory.__qualname__}:")


def test_a_learner_that_declares_it_is_not_label_equivariant_is_not_held_to_it() -> None:
    check_learner(DeclaredClassBias, objectives=())


def test_check_learner_trains_it_with_the_sla_objectives() -> None:
    class JointWaysUnsupported(ProtoNet):
        def head(self, support_features, support_labels, query_features, ways):
            if ways > 3:
                raise ValueError("at most 3 ways")
            return super().head(support_features, support_labels, query_features, ways)

    _raises(
        lambda: check_learner(JointWaysUnsupported),
        "objective 'sla+sd' loss (training) raised ValueError: at most 3 ways",
    )


def test_check_learner_takes_a_backbone_factory_or_module() -> None:
    check_learner("protonet", backbone=Conv4(hidden=2), objectives=())
    check_learner("protonet", backbone="relation-conv4", objectives=())
    check_learner("protonet", backbone=Small, objectives=("sla",))


# ------------------------------------------------------------------------------------ broken transformations


class Identity:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images


class Brighten:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images + 0.5


class FlipWidth:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(-1)


class QuarterTurn:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.rot90(images, 1, dims=(-2, -1))


class OpsDisagree(Transformation):
    """Its own __call__ flips the height, while its ops (which cached evaluation applies) flip the width."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images, images.flip(-2)], dim=-4).flatten(-5, -4)


@pytest.mark.parametrize(
    ("transform", "fragments"),
    [
        (Transformation("brighter-first", (Brighten(), Identity())), ["copy 0", "Brighten) is not the identity"]),
        (Transformation("brighten", (Identity(), Brighten())), ["is not closed under composition"]),
        (Transformation("twice", (Identity(), Identity())), ["copies 0 and 1 are the same images"]),
        (OpsDisagree("disagree", (Identity(), FlipWidth())), ["stacks rows other than ops[j](x_r) at row r*M + j"]),
        (
            Transformation("turns", (Identity(), QuarterTurn(), QuarterTurn(), QuarterTurn())),
            ["the transformation of non-square images [2, 2, 3, 8, 10] (declare square=True", "raised RuntimeError"],
        ),
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_check_transform_names_what_a_broken_transformation_breaks(transform, fragments) -> None:
    message = _raises(lambda: check_transform(transform), *fragments)
    assert message.startswith(f"transform '{transform.name}'")


def test_a_transformation_that_is_not_a_group_passes_when_told_so() -> None:
    check_transform(Transformation("brighten", (Identity(), Brighten())), group=False)


def test_check_transform_names_a_registered_plugin(monkeypatch) -> None:
    TRANSFORMS.names()

    def brighter_first() -> Transformation:
        return Transformation("brighter-first", (Brighten(), Identity()))

    monkeypatch.setattr(TRANSFORMS, "_entries", {**TRANSFORMS._entries, "brighter-first": brighter_first})
    _raises(
        lambda: check_transform("brighter-first"),
        f"transform 'brighter-first' ({brighter_first.__module__}.{brighter_first.__qualname__}): copy 0",
    )


# ----------------------------------------------------------------------------------------- broken objectives


class MissingKind(Baseline):
    """Declares SI besides the plain prediction, but predicts only the plain one."""

    kinds = (PLAIN, SLA_SI)


class UndeclaredKind(Baseline):
    def predict_copies(self, classify, copies):
        predictions = super().predict_copies(classify, copies)
        return {**predictions, "extra": predictions["plain"]}


class UnknownKind(Baseline):
    kinds = (PredictionKind("ens", "SLA+ENS", 5),)


class ClashingKind(Baseline):
    kinds = (PredictionKind("si", "something else", 5),)


class PredictsOtherwiseThanCached(LabelAugmentation):
    """``predict`` on images overridden with something ``predict_copies`` (cached evaluation) does not compute."""

    def predict(self, learner, episode):
        return {kind: logits + 1.0 for kind, logits in super().predict(learner, episode).items()}


class NoAccuracy(Baseline):
    def loss(self, learner, episode):
        loss, metrics = super().loss(learner, episode)
        return loss, {"loss": metrics["loss"]}


class NotAnObjective(nn.Module):
    def __init__(self, transform="none", feature_dim=0) -> None:
        super().__init__()


@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        (MissingKind, ["declares kind(s) ['si'] that predict does not give (it gives ['plain'])"]),
        (UndeclaredKind, ["predicts kind(s) ['extra'] it does not declare"]),
        (UnknownKind, ["declares kind 'ens' that prediction_kinds.kind_table() does not know"]),
        (ClashingKind, ["but the table holds", "under the name 'si': choose another name"]),
        (PredictsOtherwiseThanCached, ["cached evaluation (predict_copies on each copy's embeddings) gives another"]),
        (NoAccuracy, ["gives metrics ['loss'] without 'loss' and 'acc'"]),
        (NotAnObjective, ["not a fewshot_sla.objectives.Objective"]),
    ],
    ids=lambda v: getattr(v, "__name__", "") if callable(v) else "",
)
def test_check_objective_names_what_a_broken_objective_breaks(factory, fragments) -> None:
    message = _raises(lambda: check_objective(factory), *fragments)
    assert message.startswith(f"objective {__name__}.{factory.__qualname__}")


def test_a_registered_plugin_objective_with_its_own_kind_passes(monkeypatch) -> None:
    class Ensemble(Baseline):
        kinds = (PredictionKind("ens", "SLA+ENS", 5),)

        def predict_copies(self, classify, copies):
            return {"ens": super().predict_copies(classify, copies)["plain"]}

    OBJECTIVES.names()
    monkeypatch.setattr(OBJECTIVES, "_entries", {**OBJECTIVES._entries, "ensemble": Ensemble})
    check_objective("ensemble")


# ----------------------------------------------------------------------------------- every registered entry


def test_check_all_registered_runs_every_check_and_lists_every_failure(monkeypatch) -> None:
    for registry, keep in ((BACKBONES, "conv4"), (LEARNERS, "protonet"), (TRANSFORMS, "rotation")):
        registry.names()
        monkeypatch.setattr(registry, "_entries", {keep: registry._entries[keep]})
    OBJECTIVES.names()
    monkeypatch.setattr(OBJECTIVES, "_entries", {k: OBJECTIVES._entries[k] for k in ("baseline", "mt", "sla+sd")})
    checked = check_all_registered()
    assert checked == [
        "backbone 'conv4'",
        "learner 'protonet'",
        "transform 'rotation'",
        "objective 'baseline'",
        "objective 'mt'",
        "objective 'sla+sd'",
    ]
    LEARNERS.add("mixing", MixingLearner)
    BACKBONES.add("listed", ListedLayer)
    message = _raises(
        lambda: check_all_registered(["backbones", "learners"]),
        "2 of 4 registered entries break their contract",
        "backbone 'listed' (",
        "learner 'mixing' (",
    )
    assert message.count("\n- ") == 2
    with pytest.raises(ValueError, match="unknown kinds"):
        check_all_registered(["datasets"])
