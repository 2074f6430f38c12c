"""Conv-4: four conv3x3-BN-ReLU-maxpool2 blocks (Vinyals et al. 2016; ProtoNet 64 filters, MAML 32), or with
``strided=True`` Finn et al. 2017's Omniglot network: four stride-2 conv3x3-BN-ReLU blocks, spatially averaged."""

from __future__ import annotations

import torch
from torch import nn

from fewshot_sla.backbones.checkpointing import run_stage
from fewshot_sla.backbones.common import HALVINGS, check_image_size, final_side
from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES


class Block(nn.Module):
    """One conv-BN-ReLU(-pool) block of Conv-4: runs layers ``start`` to ``stop - 1`` of the ``features`` it is
    given (``block(x, backbone.features)``).

    It holds no layer, parameter or buffer. The layers are registered once, in the backbone's flat ``features``
    (whose names the state dict and old checkpoints use), and the backbone passes its own ``features`` on every
    call, so a module rebuilt from the registered submodules (learn2learn's ``clone()``, ``copy.deepcopy``) runs
    its own layers, and ``torch.func.functional_call`` reaches every parameter. The blocks are registered
    submodules too, so that checkpointing runs them as stages and hooks on them (the memory probe's) fire.
    """

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def extra_repr(self) -> str:
        return f"features[{self.start}:{self.stop}]"

    def forward(self, x: torch.Tensor, features: nn.Sequential) -> torch.Tensor:
        """``features[start:stop](x)``, layer by layer."""
        for index in range(self.start, self.stop):
            x = features[index](x)
        return x


@BACKBONES.register("conv4")
class Conv4(nn.Module):
    """Four conv3x3 (padding 1) - BatchNorm - ReLU - maxpool2 blocks, flattened; any input size >= 16.

    ``hidden`` filters in every block (64: ProtoNet recipe, 32: MAML recipe). Convolutions carry no bias
    because the BatchNorm that follows would cancel it; ``batch_norm=False`` drops BatchNorm (the convolutions
    then get a bias), so that no output depends on the other images of a pass. The convolution weights are
    stored channels-last, which makes every block compute in that memory layout; the flattened output keeps the
    channel-major order. (Converting the input instead fails under ``torch.func.vmap``.) On the 2-core CPU a
    forward and backward pass took 25-40% less time per image at 32x32 and 84x84; ResNet-12 gained nothing and
    keeps the default layout.

    ``strided=True`` is Finn et al. 2017's Omniglot network (cbfinn/maml, ``forward_conv`` without max-pooling):
    each block is a conv3x3 with stride 2 and padding 1 (TensorFlow's 'SAME': side n -> ceil(n / 2), 28 -> 14 ->
    7 -> 4 -> 2) - BatchNorm - ReLU, without max-pooling, and the last block's map is averaged over its spatial
    positions, so the output is [N, hidden] for any input size (>= 16, as for the default). As in the default,
    the convolutions carry no bias before BatchNorm (Finn's add one, which BatchNorm cancels), and BatchNorm learns
    a scale as well as an offset (``tf.contrib.layers.batch_norm``, which Finn's code calls, learns only the
    offset by default). Blocks hold conv, BatchNorm, ReLU only, so the module indices in ``features`` (and the
    state dict's names) differ from the default's.
    """

    def __init__(self, hidden: int = 64, in_channels: int = 3, batch_norm: bool = True, strided: bool = False) -> None:
        super().__init__()
        if hidden < 1 or in_channels < 1:
            raise UserError(f"conv4 needs hidden >= 1 and in_channels >= 1, got {hidden} and {in_channels}")
        self.hidden = hidden
        self.strided = strided
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(HALVINGS):
            conv = nn.Conv2d(
                channels, hidden, kernel_size=3, stride=2 if strided else 1, padding=1, bias=not batch_norm
            )
            norm: list[nn.Module] = [nn.BatchNorm2d(hidden)] if batch_norm else []
            pool: list[nn.Module] = [] if strided else [nn.MaxPool2d(2)]
            layers += [conv, *norm, nn.ReLU(), *pool]
            channels = hidden
        self.features = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.checkpointing = False  # activation checkpointing of the four blocks (see backbones/checkpointing.py)
        # The four blocks forward runs as stages: registered, parameter-free, each given ``features`` to run its
        # slice of (no stage held in a plain list: a learn2learn clone would share it, still running these layers).
        per_block = len(self.features) // HALVINGS
        self.blocks = nn.ModuleList(Block(i * per_block, (i + 1) * per_block) for i in range(HALVINGS))

    def checkpoint_stages(self) -> list[nn.Module]:
        """The four blocks forward runs in turn."""
        return list(self.blocks)

    def feature_dim(self, image_size: int) -> int:
        """Length of the output for square ``image_size`` inputs (84 -> 25 * hidden; strided: hidden)."""
        side = final_side("conv4", image_size)  # also rejects images too small for the default network
        return self.hidden if self.strided else self.hidden * side**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, hidden * (H // 16) * (W // 16)] (strided: [N, hidden])."""
        check_image_size("conv4", images.shape[-2], images.shape[-1])
        x = images
        for index, block in enumerate(self.blocks):
            x = run_stage(block, x, self.features, checkpointed=self.checkpointing and index < len(self.blocks) - 1)
        if self.strided:
            return x.mean(dim=(2, 3))
        return x.flatten(1)
