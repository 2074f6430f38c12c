"""Backbones (``BACKBONES``): ``[N, 3, H, W]`` float images -> ``[N, D]`` features.

Importing this package registers the built-in backbones; each has ``feature_dim(image_size) -> int``.
``timm:NAME`` is any timm model (the ``timm`` extra). ``relation-conv4`` returns flattened feature maps and also says
their shape: ``feature_shape(image_size) -> (C, H, W)`` and ``map_channels``.
"""

from fewshot_sla.backbones import conv4, relation_conv4, resnet12, resnet18, timm_models, wrn

__all__ = ["conv4", "relation_conv4", "resnet12", "resnet18", "timm_models", "wrn"]
