"""ResNet-18 (He et al. 2016) as CloserLookFewShot uses it (Chen et al., ICLR 2019): torchvision's ResNet-18
without its classifier.

A 7x7 stride-2 convolution to 64 channels, BatchNorm, ReLU and a 3x3 stride-2 max-pool; four stages of two basic
blocks (conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, ReLU after the sum) of 64, 128, 256, 512 channels, the first
block of stages 2-4 with stride 2 and a conv1x1-BN projection shortcut; then global average pooling: 512 features
for any input size (84 -> 42 -> 21 -> 21 -> 11 -> 6 -> 3 -> 512; CloserLookFewShot's own code pools a fixed 7x7
map, so it needs 224-pixel images, which global pooling reproduces there). 11,176,512 parameters.

Written here rather than imported from torchvision, which is only a test dependency of the package (its
augmentation and backbone tests' reference): the layers, their order and the state dict's names are torchvision's
(``conv1``, ``bn1``, ``layer{1-4}.{0,1}.{conv1, bn1, conv2, bn2, downsample.{0,1}}``), so a torchvision
``resnet18`` state dict without ``fc.*`` loads as it is, and ``tests/unit/backbones/test_backbones.py`` checks the
outputs against torchvision's. Differences: ReLUs are not in place, ``in_channels`` sets the stem's input channels
(1 for greyscale data), and the stem runs as a registered, parameter-free stage so that it can be checkpointed.

Activation checkpointing: five stages, the stem (its 64 x H/2 x W/2 maps are the largest of the network) and the
four layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.backbones.checkpointing import run_stage
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES

WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """torchvision's basic block: ``[N, C_in, H, W] -> [N, C, ceil(H / stride), ceil(W / stride)]``."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Stem(nn.Module):
    """The stem, ``conv1 -> bn1 -> ReLU -> max-pool 3x3 stride 2``, run on the ``conv1`` and ``bn1`` it is given
    (``stem(x, backbone.conv1, backbone.bn1)``). It holds no layer, parameter or buffer: the layers stay where
    torchvision names them, the backbone passes its own on every call (so a deep copy, a learn2learn clone or
    ``torch.func.functional_call`` runs the right ones), and the stem is registered so that checkpointing runs it as
    a stage and the memory probe's hooks on it fire."""

    def forward(self, x: torch.Tensor, conv1: nn.Module, bn1: nn.Module) -> torch.Tensor:
        return F.max_pool2d(F.relu(bn1(conv1(x))), kernel_size=3, stride=2, padding=1)


@BACKBONES.register("resnet18")
class ResNet18(nn.Module):
    """CloserLookFewShot's ResNet-18: ``[N, C, H, W] -> [N, 512]``, any input size (global average pooling)."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels < 1:
            raise UserError(f"resnet18 needs in_channels >= 1, got {in_channels}")
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.stem = Stem()
        widths = (WIDTHS[0], *WIDTHS)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.Sequential(
                BasicBlock(widths[i], widths[i + 1], 1 if i == 0 else 2), BasicBlock(widths[i + 1], widths[i + 1], 1)
            )
            for i in range(4)
        )
        self.checkpointing = False  # activation checkpointing of the stem and the layers (backbones/checkpointing.py)
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def checkpoint_stages(self) -> list[nn.Module]:
        """The stem and the four layers, in the order forward runs them."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def feature_dim(self, image_size: int) -> int:
        """Length of the output: 512 for any square ``image_size`` >= 1 (global pooling)."""
        if image_size < 1:
            raise UserError(f"resnet18 needs images of at least 1x1 pixels, got {image_size}x{image_size}")
        return WIDTHS[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, 512] features."""
        x = run_stage(self.stem, images, self.conv1, self.bn1, checkpointed=self.checkpointing)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        for index, layer in enumerate(layers):
            x = run_stage(layer, x, checkpointed=self.checkpointing and index < len(layers) - 1)
        return x.mean(dim=(-2, -1))
