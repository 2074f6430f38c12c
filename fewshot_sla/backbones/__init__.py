"""Backbones (``BACKBONES``): ``[N, 3, H, W]`` float images -> ``[N, D]`` features.

Importing this package registers the built-in backbones; each has ``feature_dim(image_size) -> int``.
"""

from fewshot_sla.backbones import conv4, resnet12

__all__ = ["conv4", "resnet12"]
