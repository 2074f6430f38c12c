"""Backbones: conv4/resnet12/DropBlock specifics (published sizes, reference formulations, checkpointing, option
errors). The contract every registered backbone keeps (shapes, modes, gradients, deepcopy / functional_call /
learn2learn-style clones) is ``fewshot_sla.testing.check_backbone``, run over the registry in tests/test_testing.py."""

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
