"""Any timm model as a backbone (``--backbone timm:NAME``; the ``timm`` extra): ``timm.create_model(NAME,
num_classes=0)``, whose forward gives the pooled features ``[N, D]`` (no classifier), with ``in_chans`` the data's
channels and random weights (``pretrained=False``): a few-shot backbone is trained on the base classes, and weights
pretrained on ImageNet would have seen the test classes of mini-ImageNet and its relatives. Further options go to
``create_model`` (``--backbone-option drop_rate=0.1``). The feature size is found by a probe forward at each image
size. Activation checkpointing is not offered: timm's own (``set_grad_checkpointing``) recomputes BatchNorm layers in
training mode, which would update their running statistics twice per step (``backbones/checkpointing.py`` counts them
once for the built-in backbones), so ``--checkpointing`` is refused for them.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fewshot_sla.errors import UserError
from fewshot_sla.registry import BACKBONES

PREFIX = "timm"


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserError(
            f"backbone '{PREFIX}:NAME' needs timm; install it with pip install 'fewshot-sla[timm]' (or pip install "
            "timm)"
        ) from None


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``[N, C, H, W]`` -> pooled features ``[N, D]``."""

    def __init__(self, model: str, in_channels: int = 3, **options: Any) -> None:
        super().__init__()
        if options.get("pretrained"):
            raise UserError(
                f"backbone {PREFIX}:{model}: pretrained weights are refused (ImageNet weights have seen the test "
                "classes of the ImageNet-derived few-shot sets); load your own into the run instead"
            )
        options.pop("pretrained", None)
        self.model_name = model
        try:
            self.model = _timm().create_model(model, pretrained=False, num_classes=0, in_chans=in_channels, **options)
        except (RuntimeError, TypeError, ValueError) as err:
            raise UserError(f"timm cannot build '{model}' with {options or 'no options'}: {err}") from None
        self.in_channels = in_channels
        self._dims: dict[int, int] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model(images)
        return features.flatten(1)

    def feature_dim(self, image_size: int) -> int:
        """The feature size at ``image_size`` (a probe forward, once per size; the model's state is unchanged)."""
        if image_size not in self._dims:
            probe = torch.zeros(2, self.in_channels, image_size, image_size).to(next(self.parameters()))
            was_training = self.training
            try:
                self.eval()
                with torch.no_grad():
                    self._dims[image_size] = int(self.forward(probe).shape[-1])
            except RuntimeError as err:
                raise UserError(f"timm model '{self.model_name}' cannot take {image_size}px images: {err}") from None
            finally:
                self.train(was_training)
        return self._dims[image_size]


def timm_factory(model: str) -> Callable[..., TimmBackbone]:
    """The registry entry of ``timm:<model>``: a factory taking ``in_channels`` and timm's options."""
    timm = _timm()
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=5)
        raise UserError(
            f"timm has no model '{model}'"
            + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models()")
        )

    def build(in_channels: int = 3, **options: Any) -> TimmBackbone:
        return TimmBackbone(model, in_channels, **options)

    build.__qualname__ = f"timm_factory.<{model}>"
    return build


BACKBONES.add_family(PREFIX, timm_factory)
