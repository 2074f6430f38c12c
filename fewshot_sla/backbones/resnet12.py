"""ResNet-12, the MetaOptNet variant (Lee et al. 2019; after TADAM and SNAIL), with DropBlock.

Four residual stages of 64-160-320-640 channels. Each stage: three conv3x3-BN blocks with LeakyReLU(0.1)
between them, a conv1x1-BN shortcut, LeakyReLU after the sum, then maxpool 2. Regularisation as in
MetaOptNet's training: dropout after stages 1-2 and DropBlock (Ghiasi et al. 2018) after stages 3-4, both at
``drop_rate`` (0.1), the DropBlock rate ramped linearly from 0 over ``dropblock_ramp_steps`` training
forward passes (MetaOptNet: 20 * 2000). Without average pooling the output is the flattened 640 x 5 x 5 map
(16,000 features at 84x84); with ``avg_pool=True`` the final map is averaged to 640 features.

Randomness: dropout and DropBlock draw from torch's global RNG (seed it with ``torch.manual_seed``); both are
inactive in eval mode, so evaluation is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_sla.backbones.checkpointing import run_stage
from fewshot_sla.backbones.common import check_image_size, final_side
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES

LEAK = 0.1
# MetaOptNet's DropBlock sizes: 5 at 84x84 (mini-ImageNet), 2 at 32x32 (CIFAR-FS, FC100). Scaling the block
# with the image side, round(5 * side / 84), reproduces both.
REFERENCE_BLOCK, REFERENCE_SIDE = 5, 84


def dropblock_size_for(image_side: int) -> int:
    """The DropBlock size for an input side when none is given: 84 -> 5, 32 -> 2, at least 1."""
    return max(1, round(REFERENCE_BLOCK * image_side / REFERENCE_SIDE))


class DropBlock(nn.Module):
    """DropBlock: zero random ``block x block`` squares of each channel map, rescale the rest; training only.

    Block seeds are drawn with probability ``gamma = rate / block^2 * H W / ((H - block + 1) (W - block + 1))``
    at positions where the whole block fits, so that about ``rate`` of the units are dropped; the output is
    rescaled by (units / kept units) over the batch. ``rate`` ramps linearly from 0 to ``drop_rate`` over
    ``ramp_steps`` training forward passes, counted in the ``steps`` buffer (saved with the model).
    """

    steps: torch.Tensor

    def __init__(self, drop_rate: float, ramp_steps: int) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.ramp_steps = ramp_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def current_rate(self) -> torch.Tensor:
        """The drop rate at the current step of the ramp, as a 0-dim tensor (no host sync)."""
        progress = torch.clamp(self.steps.double() / max(self.ramp_steps, 1), max=1.0)
        return self.drop_rate * progress

    def advance(self) -> None:
        """Count one training forward pass (the ramp's clock). The backbone calls it once per pass, outside any
        checkpointed region, so that a recomputation sees the same rate."""
        if self.training and self.drop_rate != 0:
            self.steps += 1

    def forward(self, x: torch.Tensor, block_size: int) -> torch.Tensor:
        """[N, C, H, W] -> same shape; identity in eval mode or with a zero rate."""
        if not self.training or self.drop_rate == 0:
            return x
        height, width = x.shape[-2:]
        block = min(block_size, height, width)
        valid = (height - block + 1) * (width - block + 1)
        gamma = (self.current_rate() / block**2 * (height * width) / valid).to(x.dtype)
        seeds_shape = (*x.shape[:-2], height - block + 1, width - block + 1)
        seeds = (torch.rand(seeds_shape, device=x.device, dtype=x.dtype) < gamma).to(x.dtype)
        # A unit is dropped when a seed sits within block-1 rows above / columns left of it.
        dropped = F.max_pool2d(F.pad(seeds, (block - 1,) * 4), kernel_size=block, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class ResidualStage(nn.Module):
    """Three conv3x3-BN(-LeakyReLU) layers plus a conv1x1-BN shortcut, LeakyReLU, maxpool 2, regulariser."""

    def __init__(self, in_channels: int, channels: int, drop_rate: float, dropblock: bool, ramp_steps: int) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(3):
            convs += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            ]
            if i < 2:
                convs.append(nn.LeakyReLU(LEAK))
        self.body = nn.Sequential(*convs)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.drop_rate = drop_rate
        self.dropblock: DropBlock | None = DropBlock(drop_rate, ramp_steps) if dropblock else None

    def forward(self, x: torch.Tensor, block_size: int) -> torch.Tensor:
        """[N, C_in, H, W] -> [N, C, H // 2, W // 2]; ``block_size`` is used by DropBlock stages only."""
        out = F.max_pool2d(F.leaky_relu(self.body(x) + self.shortcut(x), LEAK), 2)
        if self.dropblock is not None:
            return self.dropblock(out, block_size)
        return F.dropout(out, p=self.drop_rate, training=self.training)


@BACKBONES.register("resnet12")
class ResNet12(nn.Module):
    """MetaOptNet's ResNet-12: ``[N, 3, H, W] -> [N, 640 * (H // 16) * (W // 16)]`` (or ``[N, 640]`` pooled).

    ``dropblock_size=None`` picks the block from the input side (5 at 84, 2 at 32); ``drop_rate=0`` turns
    dropout and DropBlock off.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 160, 320, 640),
        avg_pool: bool = False,
        drop_rate: float = 0.1,
        dropblock_size: int | None = None,
        dropblock_ramp_steps: int = 40_000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1:
            raise UserError(f"resnet12 needs 4 positive stage widths, got channels={list(channels)}")
        if not 0.0 <= drop_rate < 1.0:
            raise UserError(f"resnet12 needs 0 <= drop_rate < 1, got {drop_rate}")
        if dropblock_size is not None and dropblock_size < 1:
            raise UserError(f"resnet12 needs dropblock_size >= 1 (or null for automatic), got {dropblock_size}")
        self.channels = channels
        self.avg_pool = avg_pool
        self.dropblock_size = dropblock_size
        widths = (in_channels, *channels)
        self.stages = nn.ModuleList(
            ResidualStage(widths[i], widths[i + 1], drop_rate, dropblock=i >= 2, ramp_steps=dropblock_ramp_steps)
            for i in range(4)
        )
        self.checkpointing = False  # activation checkpointing of the four stages (see backbones/checkpointing.py)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def checkpoint_stages(self) -> list[nn.Module]:
        """The four residual stages forward runs in turn."""
        return list(self.stages)

    def feature_dim(self, image_size: int) -> int:
        """Length of the output for square ``image_size`` inputs (84 -> 16000, or 640 pooled)."""
        side = final_side("resnet12", image_size)
        return self.channels[-1] * (1 if self.avg_pool else side * side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, D] features."""
        check_image_size("resnet12", images.shape[-2], images.shape[-1])
        block = self.dropblock_size or dropblock_size_for(images.shape[-1])
        for stage in self.stages:
            if isinstance(stage, ResidualStage) and stage.dropblock is not None:
                stage.dropblock.advance()
        x = images
        for index, stage in enumerate(self.stages):
            x = run_stage(stage, x, block, checkpointed=self.checkpointing and index < len(self.stages) - 1)
        if self.avg_pool:
            x = x.mean(dim=(-2, -1))
        return x.flatten(1)
