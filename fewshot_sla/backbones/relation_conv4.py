"""Relation Network's embedding module (Sung et al. 2018): four conv3x3 blocks, the last two without pooling.

Blocks 1-2: conv3x3 (padding 0) - BatchNorm - ReLU - maxpool2; blocks 3-4: conv3x3 (padding 1) - BatchNorm - ReLU.
The output is the feature maps ``[hidden, s, s]`` (28 -> 5x5, 84 -> 19x19), flattened channel-major to
``[N, hidden * s * s]`` as every backbone returns; ``feature_shape`` and ``map_channels`` let a learner (relationnet)
reshape them back.
"""

from __future__ import annotations

import torch
from torch import nn

from fewshot_sla.backbones.checkpointing import run_stage
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES

# The smallest square input that leaves a 1x1 map: 10 -conv-> 8 -pool-> 4 -conv-> 2 -pool-> 1.
MIN_SIZE = 10


def map_side(image_size: int) -> int:
    """Side of the output maps for a square ``image_size`` input: two valid convs, each followed by a halving."""
    if image_size < MIN_SIZE:
        raise UserError(
            f"relation-conv4 needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got {image_size}x{image_size}; "
            "use larger images or another backbone"
        )
    return ((image_size - 2) // 2 - 2) // 2


@BACKBONES.register("relation-conv4")
class RelationConv4(nn.Module):
    """Sung et al.'s four-block embedding module returning flattened feature maps; any input size >= 10.

    ``in_channels`` 3 (their mini-ImageNet code; 1 in their Omniglot code), ``hidden`` 64 filters per block.
    Convolutions carry no bias (the BatchNorm after each cancels it). Weights start as in the authors' code:
    He-normal convolutions (std sqrt(2 / (9 * out channels))), BatchNorm weight 1 and bias 0.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 64) -> None:
        super().__init__()
        if hidden < 1 or in_channels < 1:
            raise UserError(f"relation-conv4 needs hidden >= 1 and in_channels >= 1, got {hidden} and {in_channels}")
        self.hidden = hidden
        blocks: list[nn.Module] = []
        channels = in_channels
        for padding, pool in ((0, True), (0, True), (1, False), (1, False)):
            layers: list[nn.Module] = [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=padding, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
            ]
            blocks.append(nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else [])))
            channels = hidden
        self.blocks = nn.ModuleList(blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.checkpointing = False  # activation checkpointing of the four blocks (see backbones/checkpointing.py)

    @property
    def map_channels(self) -> int:
        """Channels of the feature maps the flattened output holds (the learner's reshape needs them)."""
        return self.hidden

    def checkpoint_stages(self) -> list[nn.Module]:
        """The four blocks forward runs in turn."""
        return list(self.blocks)

    def feature_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the feature maps for square ``image_size`` inputs (28 -> (64, 5, 5), 84 -> (64, 19, 19))."""
        side = map_side(image_size)
        return self.hidden, side, side

    def feature_dim(self, image_size: int) -> int:
        """Length of the flattened maps for square ``image_size`` inputs (84 -> 64 * 19 * 19)."""
        channels, height, width = self.feature_shape(image_size)
        return channels * height * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, hidden * h * w], the maps flattened channel-major."""
        map_side(min(images.shape[-2], images.shape[-1]))  # a UserError for too small images
        x = images
        for index, block in enumerate(self.blocks):
            x = run_stage(block, x, checkpointed=self.checkpointing and index < len(self.blocks) - 1)
        return x.flatten(1)
