"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 by default: the few-shot feature extractor of LEO (Rusu et
al. 2019), Gidaris & Komodakis 2019 and S2M2 (Mangla et al. 2020).

A 3x3 stem convolution to 16 channels, then three groups of ``(depth - 4) / 6`` pre-activation wide basic blocks
(4 at depth 28) of ``16 * widen``, ``32 * widen``, ``64 * widen`` channels (160, 320, 640 at widen 10), the first
block of each group with stride 1, 2, 2; then BatchNorm, ReLU and global average pooling: ``64 * widen`` (640)
features for any input size (84 -> 84 -> 42 -> 21 -> 640; 32 -> 32 -> 16 -> 8 -> 640).

A block is BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3 plus the shortcut: the block's input when the width
is unchanged, else a 1x1 convolution (with the stride) of the pre-activated input. The formulation and the state
dict's names are those of the widely used PyTorch implementation (xternalz/WideResNet-pytorch, which S2M2's
``wrn_mixup_model`` follows): ``conv1``, ``block{1,2,3}.layer.{i}.{bn1, conv1, bn2,
conv2, convShortcut}``, ``bn1``; without their classifier. Convolutions carry no bias; He (fan-out) initialisation,
BatchNorm scale 1 and offset 0.

Activation checkpointing: every wide basic block is a stage (12 at depth 28; the groups' first blocks keep the
widest maps, 160 x 84 x 84 per image at 84 pixels, so whole groups would hold too much when recomputed); the stem
convolution and the final BN-ReLU-pooling run outside the stages. Dropout (``dropout``, default 0: none; the
paper's CIFAR setting is 0.3) draws from torch's global RNG and is inactive in evaluation mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.backbones.checkpointing import run_stage
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: ``[N, C_in, H, W] -> [N, C, ceil(H / stride), ceil(W / stride)]``."""

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_channels == channels
        # The published name; a 1x1 projection only where the width changes (there the stride changes as well).
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_channels, channels, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # The identity shortcut adds the raw input; the projection reads the pre-activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One group of wide basic blocks (the published name): ``layer`` holds them; the first has the stride."""

    def __init__(self, blocks: int, in_channels: int, channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_channels if i == 0 else channels, channels, stride if i == 0 else 1, dropout)
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out


@BACKBONES.register("wrn28-10")
class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: ``[N, C, H, W] -> [N, 64 * widen]`` (640 for WRN-28-10), any input size.

    ``depth`` = 6n + 4 as the paper counts layers (n blocks of two 3x3 convolutions per group; 28 -> 4),
    ``widen`` the width multiplier k, ``dropout`` the rate between a block's two convolutions (0: none),
    ``in_channels`` the images' channels (1 for greyscale data).
    """

    def __init__(self, depth: int = 28, widen: int = 10, dropout: float = 0.0, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserError(f"wrn28-10 needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got depth={depth}")
        if widen < 1 or in_channels < 1:
            raise UserError(f"wrn28-10 needs widen >= 1 and in_channels >= 1, got {widen} and {in_channels}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"wrn28-10 needs 0 <= dropout < 1, got {dropout}")
        self.depth, self.widen = depth, widen
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.channels = widths[3]
        self.checkpointing = False  # activation checkpointing of every block (see backbones/checkpointing.py)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def checkpoint_stages(self) -> list[nn.Module]:
        """The wide basic blocks forward runs in turn (three groups of ``(depth - 4) / 6``)."""
        return [block for group in (self.block1, self.block2, self.block3) for block in group.layer]

    def feature_dim(self, image_size: int) -> int:
        """Length of the output: ``64 * widen`` (640) for any square ``image_size`` >= 1 (global pooling)."""
        if image_size < 1:
            raise UserError(f"wrn28-10 needs images of at least 1x1 pixels, got {image_size}x{image_size}")
        return self.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, 64 * widen] features."""
        x = self.conv1(images)
        stages = self.checkpoint_stages()
        for index, stage in enumerate(stages):
            x = run_stage(stage, x, checkpointed=self.checkpointing and index < len(stages) - 1)
        x = F.relu(self.bn1(x))
        return x.mean(dim=(-2, -1))
