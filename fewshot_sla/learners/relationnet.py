"""Relation Networks (Sung et al. 2018, "Learning to Compare"): a learned relation score per (query, class) pair.

The backbone's feature maps (``relation-conv4``: the paper's embedding module) of a class's K support images are
summed into one class map; the relation module reads the channel-wise concatenation [class map, query map] (the
authors' order) through two conv3x3 (64 filters) - BatchNorm - ReLU - maxpool2 blocks, then FC -> ``relation_hidden``
(8) - ReLU - FC -> 1. The logit is that last value before the sigmoid: the learner declares ``loss_kind =
MSE_SIGMOID``, so the objectives train sigmoid(logit) against one-hot targets with the mean squared error, as the
paper does; the arg-max (prediction) is that of the relation scores, and SLA averages these logits.

Choices, stated:
- ``relation_padding``: the relation convolutions' padding. The authors' code uses 1 on Omniglot (5x5 maps) and 0
  on mini-ImageNet (19x19 maps); ``"auto"`` (default) picks 0 for maps at least 10 wide (where two unpadded
  conv-pool blocks still leave a map) and 1 for smaller ones, which gives both published choices. A pooling that
  would empty a 1-pixel map is skipped (never the case at the published sizes).
- The FC input size depends on the map size, so the first FC layer (and the first convolution, whose input
  channels are twice the backbone's) are materialised on the first call (torch lazy parameters; the engine makes
  that call before building the optimiser). Later calls must bring maps of the same size.
- Feature maps: the backbone's ``map_channels`` gives the channels of its flattened output (square maps); a
  backbone without it is read as 1x1 maps of all its features.
- Initialisation as in the authors' code: He-normal convolutions, BatchNorm weight 1 and bias 0, FC weights
  N(0, 0.01) and biases 1. Convolutions carry no bias (the BatchNorm after each cancels it). The authors' code
  keeps BatchNorm in training mode (momentum 1) at test; here evaluation uses the running statistics, as the other
  learners do.
- The first convolution is linear in its concatenated input, so it is applied to the W class maps and the Q
  query maps apart and the results added per pair (the same numbers, Q + W instead of Q * W convolutions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from fewshot_sla.errors import UserError
from fewshot_sla.learners.base import MSE_SIGMOID, EmbeddingLearner
from fewshot_sla.registry import LEARNERS

PADDINGS = ("auto", 0, 1)
AUTO_UNPADDED_SIDE = 10  # the smallest map two unpadded conv3x3-pool2 blocks take down to 1x1: 10 -> 8 -> 4 -> 2 -> 1


def relation_padding(padding: int | str, height: int, width: int) -> int:
    """The relation convolutions' padding for maps of ``height`` x ``width`` (``"auto"``: 0 if both are >= 10)."""
    if padding == "auto":
        return 0 if min(height, width) >= AUTO_UNPADDED_SIDE else 1
    return int(padding)


def _block_side(side: int, padding: int) -> int:
    """The side of a map after one conv3x3 (``padding``) and the pooling that follows it."""
    side = side + 2 * padding - 2
    if side < 1:
        raise UserError(f"relationnet: maps too small for the relation module's unpadded convolutions ({side + 2})")
    return side // 2 if side >= 2 else side


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, skipped for a map with a side of 1 (which it would empty)."""
    return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class RelationModule(LazyModuleMixin, nn.Module):
    """[B,W,C,h,w] class maps, [B,Q,C,h,w] query maps -> [B,Q,W] relation logits (before the sigmoid)."""

    def __init__(self, channels: int = 64, hidden: int = 8, padding: int | str = "auto") -> None:
        super().__init__()
        self.channels = channels
        self.padding = padding
        self.conv1_weight: nn.Parameter | nn.UninitializedParameter = nn.UninitializedParameter()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)
        self.fc1_weight: nn.Parameter | nn.UninitializedParameter = nn.UninitializedParameter()
        self.fc1_bias: nn.Parameter | nn.UninitializedParameter = nn.UninitializedParameter()
        self.fc2 = nn.Linear(hidden, 1)
        self.hidden = hidden
        nn.init.kaiming_normal_(self.conv2.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc2.weight, 0.0, 0.01)
        nn.init.ones_(self.fc2.bias)

    def initialize_parameters(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> None:
        """Materialise the first convolution (2C input channels) and the first FC layer (its input: the size of
        the maps after the two blocks), initialised as in the authors' code."""
        conv1, fc1, fc1_bias = self.conv1_weight, self.fc1_weight, self.fc1_bias
        lazy = nn.UninitializedParameter
        if not (isinstance(conv1, lazy) and isinstance(fc1, lazy) and isinstance(fc1_bias, lazy)):
            return
        in_channels, height, width = class_maps.shape[-3:]
        padding = relation_padding(self.padding, height, width)
        side_h = _block_side(_block_side(height, padding), padding)
        side_w = _block_side(_block_side(width, padding), padding)
        with torch.no_grad():
            conv1.materialize((self.channels, 2 * in_channels, 3, 3))
            fc1.materialize((self.hidden, self.channels * side_h * side_w))
            fc1_bias.materialize((self.hidden,))
            nn.init.kaiming_normal_(self.conv1_weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(self.fc1_weight, 0.0, 0.01)
            nn.init.ones_(self.fc1_bias)

    def forward(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """Relation logits of every (query, class) pair of each episode, in one pass over the B*Q*W pairs."""
        b, ways, channels, height, width = class_maps.shape
        queries = query_maps.shape[1]
        padding = relation_padding(self.padding, height, width)
        if self.conv1_weight.shape[1] != 2 * channels:
            raise UserError(
                f"relationnet's relation module was built for {self.conv1_weight.shape[1] // 2}-channel maps, "
                f"got {channels}"
            )
        # conv([class; query]) = conv_class(class) + conv_query(query): per map, then added per pair.
        from_class = F.conv2d(class_maps.flatten(0, 1), self.conv1_weight[:, :channels], padding=padding)
        from_query = F.conv2d(query_maps.flatten(0, 1), self.conv1_weight[:, channels:], padding=padding)
        per_query = from_query.reshape(b, queries, 1, *from_query.shape[1:])
        per_class = from_class.reshape(b, 1, ways, *from_class.shape[1:])
        pairs = per_query + per_class  # [B, Q, W, channels, h', w']
        x = _pool(F.relu(self.norm1(pairs.flatten(0, 2))))
        x = _pool(F.relu(self.norm2(F.conv2d(x, self.conv2.weight, padding=padding))))
        x = x.flatten(1)
        if x.shape[1] != self.fc1_weight.shape[1]:
            raise UserError(
                f"relationnet's relation module was built for maps that give {self.fc1_weight.shape[1]} features, "
                f"these {height}x{width} maps give {x.shape[1]}; evaluate at the image size it was trained on"
            )
        x = F.relu(F.linear(x, self.fc1_weight, self.fc1_bias))
        logits: torch.Tensor = self.fc2(x)
        return logits.reshape(b, queries, ways)


@LEARNERS.register("relationnet")
class RelationNet(EmbeddingLearner):
    """Relation Networks: summed class maps and each query map, compared by a learned relation module.

    Options: ``relation_channels`` (64), ``relation_hidden`` (8), ``relation_padding`` ("auto" | 0 | 1).
    """

    loss_kind = MSE_SIGMOID

    def __init__(
        self,
        backbone: nn.Module,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        relation_padding: int | str = "auto",
    ) -> None:
        super().__init__(backbone)
        if relation_padding not in PADDINGS:
            raise UserError(
                f"relationnet: relation_padding must be one of {', '.join(map(str, PADDINGS))}, "
                f"got {relation_padding!r}"
            )
        if relation_channels < 1 or relation_hidden < 1:
            raise UserError(
                f"relationnet: relation_channels and relation_hidden must be >= 1, got {relation_channels} and "
                f"{relation_hidden}"
            )
        self.relation = RelationModule(relation_channels, relation_hidden, relation_padding)

    def settings(self) -> dict[str, object]:
        """The relation module's sizes and padding, how class maps are formed, and the loss."""
        return {
            "relation_channels": self.relation.channels,
            "relation_hidden": self.relation.hidden,
            "relation_padding": self.relation.padding,
            "class_map": "sum",
            "loss": MSE_SIGMOID,
        }

    def maps(self, features: torch.Tensor) -> torch.Tensor:
        """[B,R,D] flattened backbone features -> [B,R,C,s,s] feature maps (C: the backbone's ``map_channels``)."""
        dim = features.shape[-1]
        channels = int(getattr(self.backbone, "map_channels", dim))
        side = math.isqrt(dim // channels) if dim % channels == 0 else 0
        if side < 1 or channels * side * side != dim:
            raise UserError(f"relationnet: {dim} backbone features are not {channels}-channel square maps")
        return features.reshape(*features.shape[:-1], channels, side, side)

    def head(
        self,
        support_features: torch.Tensor,
        support_labels: torch.Tensor,
        query_features: torch.Tensor,
        ways: int,
    ) -> torch.Tensor:
        """[B,S,D], [B,S], [B,Q,D], ways -> relation logits [B,Q,ways]; each class map sums its support maps."""
        onehot = F.one_hot(support_labels, ways).to(support_features.dtype)  # [B,S,ways]
        class_features = onehot.transpose(1, 2) @ support_features  # [B,ways,D]: sums, as the paper does
        scores: torch.Tensor = self.relation(self.maps(class_features), self.maps(query_features))
        return scores
