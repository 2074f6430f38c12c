"""Backbones: conv4/resnet12/DropBlock specifics (published sizes, reference formulations, checkpointing, option
errors). The contract every registered backbone keeps (shapes, modes, gradients, deepcopy / functional_call /
learn2learn-style clones) is ``fewshot_sla.testing.check_backbone``, run over the registry in
tests/unit/test_testing.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.backbones.checkpointing import enable
from fewshot_sla.backbones.resnet12 import DropBlock, ResNet12, dropblock_size_for
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_builtin_backbones_reject_too_small_images(name: str) -> None:
    backbone = BACKBONES.create(name)
    with pytest.raises(UserError, match="at least 16x16"):
        backbone.feature_dim(8)
    with pytest.raises(UserError, match="at least 16x16"):
        backbone(torch.randn(2, 3, 12, 12))


def test_published_feature_sizes() -> None:
    # ProtoNet's Conv-4 gives 1600 features at 84x84; MetaOptNet's ResNet-12 16,000 (640 x 5 x 5), 640 pooled.
    assert BACKBONES.create("conv4").feature_dim(84) == 1600
    assert BACKBONES.create("conv4", hidden=32).feature_dim(84) == 800
    assert BACKBONES.create("resnet12").feature_dim(84) == 16000
    assert BACKBONES.create("resnet12").feature_dim(32) == 640 * 2 * 2
    assert BACKBONES.create("resnet12", avg_pool=True).feature_dim(84) == 640


def test_conv4_channels_last_layout_keeps_the_channel_major_features() -> None:
    # Independent formulation: the same weights in the default (NCHW) layout, flattened with a plain reshape.
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=8).eval()
    assert backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(backbone).to(memory_format=torch.contiguous_format)
    assert reference.features[0].weight.is_contiguous()
    images = torch.randn(3, 3, 36, 36)
    with torch.no_grad():
        expected = reference.features(images).contiguous().reshape(3, -1)
        torch.testing.assert_close(backbone(images), expected, rtol=1e-5, atol=1e-6)


def _randomise_batch_norms(backbone: nn.Module) -> None:
    """Non-trivial BatchNorm scales, offsets and running statistics, so that using them wrongly shows."""
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)


def _finn_omniglot_reference(images: torch.Tensor, backbone: nn.Module, training: bool) -> torch.Tensor:
    """Finn et al. 2017's Omniglot network written with functional calls: four blocks of conv3x3 (stride 2, 'SAME'
    padding = 1 on each side) -> BatchNorm -> ReLU, no pooling, then the mean over the spatial positions."""
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(norms) in (0, 4)
    x = images
    for index, conv in enumerate(convs):
        x = F.conv2d(x, conv.weight.contiguous(), conv.bias, stride=2, padding=1)
        if norms:
            bn = norms[index]
            mean, var = bn.running_mean.clone(), bn.running_var.clone()  # training mode updates them in place
            x = F.batch_norm(x, mean, var, bn.weight, bn.bias, training=training, momentum=0.1, eps=bn.eps)
        x = F.relu(x)
    return x.mean(dim=(2, 3))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_strided_conv4_is_finns_omniglot_network(batch_norm: bool) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=64, in_channels=1, batch_norm=batch_norm, strided=True)
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
    _randomise_batch_norms(backbone)
    images = torch.randn(5, 1, 28, 28)
    # Hand-computed shape path: 'SAME' stride 2 takes side n to ceil(n / 2): 28 -> 14 -> 7 -> 4 -> 2.
    sides: list[tuple[int, ...]] = []
    hooks = [
        stage.register_forward_hook(lambda _m, _i, out: sides.append(tuple(out.shape)))
        for stage in backbone.checkpoint_stages()
    ]
    backbone.eval()
    with torch.no_grad():
        features = backbone(images)
    for hook in hooks:
        hook.remove()
    assert sides == [(5, 64, 14, 14), (5, 64, 7, 7), (5, 64, 4, 4), (5, 64, 2, 2)]
    assert features.shape == (5, 64)
    with torch.no_grad():
        torch.testing.assert_close(features, _finn_omniglot_reference(images, backbone, False), rtol=1e-5, atol=1e-5)
    # Training mode (batch statistics) agrees as well.
    backbone.train()
    with torch.no_grad():
        expected = _finn_omniglot_reference(images, backbone, True)
        torch.testing.assert_close(backbone(images), expected, rtol=1e-5, atol=1e-5)


def test_strided_conv4_feature_dim_is_hidden_and_matches_the_output() -> None:
    for hidden in (64, 32):
        backbone = BACKBONES.create("conv4", hidden=hidden, strided=True).eval()
        for size in (28, 32, 84):
            assert backbone.feature_dim(size) == hidden
            with torch.no_grad():
                assert backbone(torch.randn(2, 3, size, size)).shape == (2, hidden)
    rgb = BACKBONES.create("conv4", strided=True)
    assert tuple(rgb.features[0].weight.shape) == (64, 3, 3, 3)  # in_channels defaults to 3
    with pytest.raises(UserError, match="at least 16x16"):
        rgb.feature_dim(8)


def test_default_conv4_is_unchanged() -> None:
    # The names and shapes that existing checkpoints hold; explicit strided=False is the default.
    expected: list[tuple[str, tuple[int, ...]]] = []
    for block, c_in in enumerate((3, 64, 64, 64)):
        conv, bn = 4 * block, 4 * block + 1
        expected.append((f"features.{conv}.weight", (64, c_in, 3, 3)))
        expected += [(f"features.{bn}.{name}", (64,)) for name in ("weight", "bias", "running_mean", "running_var")]
        expected.append((f"features.{bn}.num_batches_tracked", ()))
    for options in ({}, {"strided": False}):
        backbone = BACKBONES.create("conv4", **options).eval()
        assert [(k, tuple(v.shape)) for k, v in backbone.state_dict().items()] == expected
        kinds = [type(m) for m in backbone.features]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4
        with torch.no_grad():
            assert backbone(torch.randn(2, 3, 84, 84)).shape == (2, 1600)
            assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 64)  # 28 -> 14 -> 7 -> 3 -> 1
        assert (backbone.feature_dim(84), backbone.feature_dim(28)) == (1600, 64)
    # And its output is still conv (stride 1) -> BN -> ReLU -> 2x2 max-pool, four times, flattened.
    torch.manual_seed(0)
    backbone = BACKBONES.create("conv4", hidden=8, in_channels=1).eval()
    _randomise_batch_norms(backbone)
    images = torch.randn(3, 1, 36, 36)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    x = images
    for conv, bn in zip(convs, norms):
        x = F.conv2d(x, conv.weight.contiguous(), None, stride=1, padding=1)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        x = F.max_pool2d(F.relu(x), 2)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), x.reshape(3, -1), rtol=1e-5, atol=1e-5)


def test_strided_conv4_checkpointing_gives_identical_outputs_gradients_and_statistics() -> None:
    torch.manual_seed(0)
    plain = BACKBONES.create("conv4", hidden=8, in_channels=1, strided=True).train()
    checked = copy.deepcopy(plain)
    enable(checked)
    first_conv_calls = []
    checked.features[0].register_forward_hook(lambda *_: first_conv_calls.append(1))
    images = torch.randn(6, 1, 28, 28)
    outputs = []
    for net in (plain, checked):
        out = net(images)
        (out**2).sum().backward()
        outputs.append(out.detach())
    assert len(first_conv_calls) == 2, "the first block should be recomputed in backward"
    assert torch.equal(outputs[0], outputs[1])
    for (name, a), b in zip(plain.named_parameters(), checked.parameters(), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), checked.buffers(), strict=True):
        assert torch.equal(a, b), name  # running statistics and batch counters counted once


def test_resnet12_parameter_count_matches_the_architecture() -> None:
    # Per stage (c_in -> c): three 3x3 convs, one 1x1 shortcut conv, four BatchNorms (weight + bias).
    expected, c_in = 0, 3
    for c in (64, 160, 320, 640):
        expected += 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
        c_in = c
    backbone = BACKBONES.create("resnet12")
    assert sum(p.numel() for p in backbone.parameters()) == expected


def test_resnet12_train_mode_regularises_and_eval_mode_does_not() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("resnet12", channels=(4, 4, 4, 4), dropblock_ramp_steps=1).train()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = backbone(images)
    torch.manual_seed(2)
    b = backbone(images)
    assert not torch.equal(a, b), "dropout / DropBlock should make training passes differ"
    torch.manual_seed(1)
    assert torch.equal(a, backbone(images)), "the global RNG seeds the training-time noise"
    quiet = BACKBONES.create("resnet12", channels=(4, 4, 4, 4), drop_rate=0.0).train()
    quiet.load_state_dict(backbone.state_dict())
    assert torch.equal(quiet(images), quiet(images))


def test_dropblock_size_follows_metaoptnet() -> None:
    assert dropblock_size_for(84) == 5
    assert dropblock_size_for(32) == 2
    assert dropblock_size_for(8) == 1


def test_dropblock_is_identity_in_eval_and_counts_training_steps() -> None:
    block = DropBlock(drop_rate=0.1, ramp_steps=4)
    x = torch.randn(2, 3, 10, 10)
    block.eval().advance()
    assert torch.equal(block(x, 5), x)
    assert int(block.steps) == 0  # evaluation passes do not advance the ramp
    block.train()
    for step in range(1, 7):
        block.advance()  # once per training pass, as ResNet12.forward does
        block(x, 5)
        block(x, 5)  # a recomputation (activation checkpointing) does not advance it
        assert float(block.current_rate()) == pytest.approx(0.1 * min(step / 4, 1.0))


def test_resnet12_advances_each_dropblock_once_per_training_pass() -> None:
    net = ResNet12(channels=(4, 4, 4, 4)).train()
    x = torch.randn(2, 3, 16, 16)
    for _ in range(3):
        net(x)
    net.eval()(x)
    assert [int(s.dropblock.steps) for s in net.stages if s.dropblock is not None] == [3, 3]


def _dropped_units_form_whole_blocks(keep: torch.Tensor, size: int) -> bool:
    """Brute force: every dropped unit lies in a size x size square (inside the map) of dropped units."""
    height, width = keep.shape
    for i in range(height):
        for j in range(width):
            if keep[i, j] != 0:
                continue
            covered = False
            for top in range(max(0, i - size + 1), min(i, height - size) + 1):
                for left in range(max(0, j - size + 1), min(j, width - size) + 1):
                    if (keep[top : top + size, left : left + size] == 0).all():
                        covered = True
            if not covered:
                return False
    return True


def test_dropblock_drops_whole_blocks_at_the_target_rate_and_rescales() -> None:
    torch.manual_seed(0)
    block = DropBlock(drop_rate=0.2, ramp_steps=1).train()
    block.advance()
    ones = torch.ones(64, 8, 10, 10)
    out = block(ones, 3)
    keep = (out != 0).to(out.dtype)
    assert (1 - keep.mean()).item() == pytest.approx(0.2, abs=0.03)  # overlaps make it slightly less
    # Kept units are rescaled so that the total is preserved exactly.
    assert out.sum().item() == pytest.approx(ones.numel(), rel=1e-5)
    assert torch.allclose(out[out != 0], out[out != 0][0].expand(int(keep.sum())))
    for n in range(4):
        assert _dropped_units_form_whole_blocks(keep[n, 0], 3)


def test_bad_backbone_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="hidden"):
        BACKBONES.create("conv4", hidden=0)
    with pytest.raises(UserError, match="drop_rate"):
        BACKBONES.create("resnet12", drop_rate=1.5)
    with pytest.raises(UserError, match="channels"):
        BACKBONES.create("resnet12", channels=(64, 160, 320))
    with pytest.raises(UserError, match="dropblock_size"):
        BACKBONES.create("resnet12", dropblock_size=0)


# ----- wrn28-10 and resnet18, the pretraining recipes' backbones -----


def _assert_checkpointing_is_exact(plain: nn.Module, images: torch.Tensor) -> None:
    """Checkpointing a deep copy of ``plain`` (training mode) gives the same output, gradients and buffers (BatchNorm
    running statistics and batch counters counted once), and really recomputes the first stage in backward."""
    plain.train()
    checked = copy.deepcopy(plain)
    enable(checked)
    first_stage_calls = []
    # A pre-hook: the recomputation stops once it has what backward needs, before the stage returns.
    checked.checkpoint_stages()[0].register_forward_pre_hook(lambda *_: first_stage_calls.append(1))
    outputs = []
    for net in (plain, checked):
        torch.manual_seed(1)  # the same dropout masks in both; the recomputation replays them
        out = net(images)
        (out**2).sum().backward()
        outputs.append(out.detach())
    assert len(first_stage_calls) == 2, "the first stage should be recomputed in backward"
    assert torch.equal(outputs[0], outputs[1])
    for (name, a), b in zip(plain.named_parameters(), checked.parameters(), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(plain.named_buffers(), checked.buffers(), strict=True):
        assert torch.equal(a, b), name


def _wrn_parameters(depth: int, widen: int, in_channels: int = 3) -> int:
    """WRN-depth-widen's parameters counted from the paper's architecture, without a classifier: the 3x3 stem
    conv to 16 channels; per group of (depth - 4) / 6 pre-activation blocks, each BN(c_in) - conv3x3(c_in -> c) -
    BN(c) - conv3x3(c -> c), plus a 1x1 projection (c_in -> c) where the width changes; the final BN. A BN layer has
    a weight and a bias per channel, the convolutions no bias."""
    blocks = (depth - 4) // 6
    total, c_in = 9 * in_channels * 16, 16
    for c in (16 * widen, 32 * widen, 64 * widen):
        for i in range(blocks):
            first = c_in if i == 0 else c
            total += 2 * first + 9 * first * c + 2 * c + 9 * c * c + (first * c if first != c else 0)
        c_in = c
    return total + 2 * 64 * widen


def test_wrn28_10_has_the_published_36_5m_parameters() -> None:
    # By hand: stem 432; group 1 (16 -> 160) 256,352 + 3 x 461,440; group 2 (160 -> 320) 1,434,560 + 3 x 1,844,480;
    # group 3 (320 -> 640) 5,736,320 + 3 x 7,375,360; final BN 1,280: 36,472,784.
    assert _wrn_parameters(28, 10) == 36_472_784
    backbone = BACKBONES.create("wrn28-10")
    assert sum(p.numel() for p in backbone.parameters()) == 36_472_784
    # Zagoruyko & Komodakis 2016, Table 4 (CIFAR-10): WRN-28-10, 36.5M parameters with the 640 x 10 classifier.
    assert round((36_472_784 + 640 * 10 + 10) / 1e6, 1) == 36.5
    assert len(backbone.checkpoint_stages()) == 12  # 3 groups of (28 - 4) / 6 = 4 blocks
    for depth, widen in ((10, 1), (16, 2), (16, 8)):  # WRN-16-8: 11.0M in the paper, with its classifier
        small = BACKBONES.create("wrn28-10", depth=depth, widen=widen)
        assert sum(p.numel() for p in small.parameters()) == _wrn_parameters(depth, widen)
    assert round((_wrn_parameters(16, 8) + 512 * 10 + 10) / 1e6, 1) == 11.0
    grey = BACKBONES.create("wrn28-10", depth=10, widen=1, in_channels=1)
    assert sum(p.numel() for p in grey.parameters()) == _wrn_parameters(10, 1, in_channels=1)


def test_resnet18_has_torchvisions_parameters_without_the_classifier() -> None:
    # By hand: stem 7x7x3x64 + BN 128 = 9,536; per stage c_in -> c: two blocks of two 3x3 convs and two BNs, a 1x1
    # projection conv + BN in the first block where the width changes.
    expected, c_in = 49 * 3 * 64 + 2 * 64, 64
    for c in (64, 128, 256, 512):
        expected += 9 * c_in * c + 9 * c * c + 4 * c  # first block
        expected += (c_in * c + 2 * c) if c_in != c else 0  # its projection
        expected += 2 * 9 * c * c + 4 * c  # second block
        c_in = c
    # torchvision's resnet18: 11,689,512 parameters, of which the 512 x 1000 classifier holds 513,000.
    assert expected == 11_689_512 - (512 * 1000 + 1000) == 11_176_512
    backbone = BACKBONES.create("resnet18")
    assert sum(p.numel() for p in backbone.parameters()) == 11_176_512
    grey = BACKBONES.create("resnet18", in_channels=1)
    assert sum(p.numel() for p in grey.parameters()) == 11_176_512 - 49 * 2 * 64


def _stage_shapes(backbone: nn.Module, images: torch.Tensor) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """The output shape of every checkpoint stage, and of the backbone, in evaluation mode."""
    shapes: list[tuple[int, ...]] = []
    hooks = [
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for stage in backbone.checkpoint_stages()
    ]
    with torch.no_grad():
        out = backbone.eval()(images)
    for hook in hooks:
        hook.remove()
    return shapes, tuple(out.shape)


@pytest.mark.parametrize(("size", "sides"), [(32, (32, 16, 8)), (84, (84, 42, 21))])
def test_wrn28_10_output_shapes(size: int, sides: tuple[int, ...]) -> None:
    backbone = BACKBONES.create("wrn28-10")
    shapes, out = _stage_shapes(backbone, torch.randn(1, 3, size, size))  # one image: 36 GFLOPs at 84 pixels
    expected = [(1, c, s, s) for c, s in zip((160, 320, 640), sides) for _ in range(4)]
    assert shapes == expected
    assert out == (1, 640) and backbone.feature_dim(size) == 640
    grey = BACKBONES.create("wrn28-10", depth=10, widen=1, in_channels=1)
    assert _stage_shapes(grey, torch.randn(2, 1, size, size))[1] == (2, 64) and grey.feature_dim(size) == 64


@pytest.mark.parametrize(("size", "sides"), [(32, (8, 8, 4, 2, 1)), (84, (21, 21, 11, 6, 3))])
def test_resnet18_output_shapes(size: int, sides: tuple[int, ...]) -> None:
    # 7x7 stride 2 then max-pool 3 stride 2 (each ceil(n / 2)), then stages of stride 1, 2, 2, 2.
    backbone = BACKBONES.create("resnet18")
    shapes, out = _stage_shapes(backbone, torch.randn(2, 3, size, size))
    assert shapes == [(2, c, s, s) for c, s in zip((64, 64, 128, 256, 512), sides)]
    assert out == (2, 512) and backbone.feature_dim(size) == 512
    grey = BACKBONES.create("resnet18", in_channels=1)
    assert _stage_shapes(grey, torch.randn(2, 1, size, size))[1] == (2, 512)


def _wrn_reference(net: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
    """A pre-activation Wide ResNet written with functional calls over ``net``'s weights: per block
    a = ReLU(BN(x)); out = conv3x3(ReLU(BN(conv3x3(a, stride)))); x = out + (x, or conv1x1(a, stride) where the
    width changes); then ReLU(BN(x)) averaged over the positions."""

    def bn(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
        mean, var = layer.running_mean.clone(), layer.running_var.clone()  # training mode updates them in place
        return F.batch_norm(t, mean, var, layer.weight, layer.bias, training=training, momentum=0.1, eps=layer.eps)

    x = F.conv2d(x, net.conv1.weight, padding=1)
    for group, stride in ((net.block1, 1), (net.block2, 2), (net.block3, 2)):
        for i, block in enumerate(group.layer):
            step = stride if i == 0 else 1
            a = F.relu(bn(block.bn1, x))
            out = F.conv2d(
                F.relu(bn(block.bn2, F.conv2d(a, block.conv1.weight, stride=step, padding=1))),
                block.conv2.weight,
                padding=1,
            )
            widens = block.conv1.weight.shape[0] != block.conv1.weight.shape[1]
            assert (block.convShortcut is not None) == widens
            x = out + (F.conv2d(a, block.convShortcut.weight, stride=step) if widens else x)
    return F.relu(bn(net.bn1, x)).mean(dim=(2, 3))


def test_wrn_is_the_pre_activation_wide_resnet() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create("wrn28-10", depth=16, widen=2)
    _randomise_batch_norms(backbone)
    images = torch.randn(3, 3, 20, 20)
    for training in (False, True):
        backbone.train(training)
        with torch.no_grad():
            torch.testing.assert_close(
                backbone(images), _wrn_reference(backbone, images, training), rtol=1e-5, atol=1e-5
            )
    # The published state dict names (xternalz/WideResNet-pytorch, S2M2), classifier aside.
    names = list(BACKBONES.create("wrn28-10").state_dict())
    assert names[:2] == ["conv1.weight", "block1.layer.0.bn1.weight"]
    assert "block1.layer.0.convShortcut.weight" in names and "block1.layer.1.convShortcut.weight" not in names
    assert names[-5:] == [f"bn1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_wrn_dropout_acts_in_training_only() -> None:
    backbone = BACKBONES.create("wrn28-10", depth=10, widen=1, dropout=0.3).train()
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    a = backbone(images)
    torch.manual_seed(2)
    assert not torch.equal(a, backbone(images))
    backbone.eval()
    assert torch.equal(backbone(images), backbone(images))


def test_resnet18_computes_as_torchvisions_without_its_classifier() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    _randomise_batch_norms(reference)
    ours = BACKBONES.create("resnet18")
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, strict=True)
    reference.fc = nn.Identity()
    for size in (32, 84):
        images = torch.randn(3, 3, size, size)
        for training in (False, True):
            reference.train(training)
            ours.train(training)
            with torch.no_grad():
                torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)
    # Training mode updated both sides' running statistics alike.
    for (name, a), b in zip(ours.named_buffers(), (reference.state_dict()[n] for n, _ in ours.named_buffers())):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("wrn28-10", {"depth": 16, "widen": 2, "dropout": 0.2}, 20),
        ("resnet18", {}, 32),
        ("resnet18", {"in_channels": 1}, 20),
    ],
)
def test_wrn_and_resnet18_checkpointing_gives_identical_gradients_and_statistics(name, options, size) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.create(name, **options)
    channels = options.get("in_channels", 3)
    _assert_checkpointing_is_exact(backbone, torch.randn(6, channels, size, size))


def test_wrn_and_resnet18_option_errors_are_user_errors() -> None:
    with pytest.raises(UserError, match="depth = 6n"):
        BACKBONES.create("wrn28-10", depth=27)
    with pytest.raises(UserError, match="depth = 6n"):
        BACKBONES.create("wrn28-10", depth=4)
    with pytest.raises(UserError, match="widen"):
        BACKBONES.create("wrn28-10", widen=0)
    with pytest.raises(UserError, match="dropout"):
        BACKBONES.create("wrn28-10", dropout=1.0)
    with pytest.raises(UserError, match="in_channels"):
        BACKBONES.create("resnet18", in_channels=0)
    with pytest.raises(UserError, match="at least 1x1"):
        BACKBONES.create("resnet18").feature_dim(0)
