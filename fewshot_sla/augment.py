"""Batched image normalisation and training augmentation as tensor ops on the batch's device.

Every function takes images ``[..., C, H, W]`` (C = 3, RGB, or 1, greyscale), either uint8 (0..255) or floating
point in [0, 1], and returns the same dtype (``normalize`` returns float). Random parameters are drawn per image from an
explicit ``torch.Generator`` living on the images' device; there is no per-image Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


def _check(images: torch.Tensor) -> None:
    if images.ndim < 3 or images.shape[-3] not in (1, 3):
        raise ValueError(f"images must be [..., C, H, W] with C = 1 or 3, got {list(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")


def _check_generator(generator: torch.Generator, images: torch.Tensor) -> None:
    if generator.device.type != images.device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the images are on {images.device}; "
            "create the generator on the images' device"
        )


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images


def _restore(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` (floating, in [0, 1]) back in the dtype of ``like``."""
    result = result.clamp(0, 1)
    return (result * 255).round().to(torch.uint8) if like.dtype == torch.uint8 else result.to(like.dtype)


def normalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """float32 ``(x - mean) / std`` per channel, with x in [0, 1] (uint8 input is divided by 255)."""
    _check(images)
    scale = 1.0 / torch.tensor(std, dtype=torch.float32, device=images.device)
    shift = -torch.tensor(mean, dtype=torch.float32, device=images.device) * scale
    if images.dtype == torch.uint8:
        scale = scale / 255
    if len(scale) != images.shape[-3]:
        raise ValueError(f"{len(scale)} normalisation channels for images of {images.shape[-3]} channels")
    return torch.addcmul(shift.view(-1, 1, 1), images.float(), scale.view(-1, 1, 1))


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels, then crop it back to H x W at a random offset of its own."""
    _check(images)
    _check_generator(generator, images)
    if padding <= 0:
        return images
    *lead, c, h, w = images.shape
    flat = F.pad(images.reshape(-1, c, h, w), (padding, padding, padding, padding))
    n, dev = flat.shape[0], images.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    rows = (top[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (left[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
    out = flat[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]
    return out.reshape(*lead, c, h, w)


def random_quarter_turns(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Turn each image by its own uniformly random multiple of 90 degrees (as ``torch.rot90``); H must equal W."""
    _check(images)
    _check_generator(generator, images)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"quarter turns need square images, got {images.shape[-2]}x{images.shape[-1]}")
    turns = torch.randint(0, 4, images.shape[:-3], generator=generator, device=images.device)[..., None, None, None]
    out = images
    for k in (1, 2, 3):
        out = torch.where(turns == k, torch.rot90(images, k, dims=(-2, -1)), out)
    return out


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``, independently."""
    _check(images)
    _check_generator(generator, images)
    flip = torch.rand(images.shape[:-3], generator=generator, device=images.device) < p
    return torch.where(flip[..., None, None, None], images.flip(-1), images)


def _per_image(factors: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(factors, dtype=torch.float32, device=images.device)
    return f.expand(images.shape[:-3])[..., None, None, None]


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor | float) -> torch.Tensor:
    """Scale each image's intensities by its factor (0 gives black, 1 the image), clipped to range."""
    _check(images)
    return _restore(_as_unit_float(images) * _per_image(factors, images), images)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its mean grey level: 0 gives flat grey, 1 the image, above 1 more contrast."""
    _check(images)
    x = _as_unit_float(images)
    grey = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    f = _per_image(factors, images)
    return _restore(f * x + (1 - f) * grey, images)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor | float) -> torch.Tensor:
    """Blend each image with its greyscale version: 0 gives grey, 1 the image, above 1 more vivid colour."""
    _check(images)
    x = _as_unit_float(images)
    f = _per_image(factors, images)
    return _restore(f * x + (1 - f) * _grayscale(x), images)


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each factor uniform in [max(0, 1-v), 1+v] per image."""
    _check(images)
    _check_generator(generator, images)
    x = _as_unit_float(images)
    for adjust, v in ((adjust_brightness, brightness), (adjust_contrast, contrast), (adjust_saturation, saturation)):
        if v > 0:
            low = max(0.0, 1.0 - v)
            u = torch.rand(images.shape[:-3], generator=generator, device=images.device)
            x = adjust(x, low + u * (1.0 + v - low))
    return _restore(x, images)


@dataclass(frozen=True)
class TrainAugment:
    """The usual few-shot training augmentation: random crop with zero padding, colour jitter, horizontal flip,
    after random quarter turns where asked (Vinyals et al.'s Omniglot augmentation; off by default).

    Defaults follow the MetaOptNet recipe (crop padding 8, jitter 0.4/0.4/0.4, flip with p = 0.5).
    """

    padding: int = 8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    flip: bool = True
    quarter_turns: bool = False

    @classmethod
    def quarter_turns_only(cls) -> TrainAugment:
        """Random quarter turns and nothing else: no crop, colour jitter or flip."""
        return cls(padding=0, brightness=0.0, contrast=0.0, saturation=0.0, flip=False, quarter_turns=True)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment every image of ``images`` ``[..., C, H, W]`` (C = 3 where it jitters colour) with its own random
        parameters."""
        x = random_quarter_turns(images, generator) if self.quarter_turns else images
        x = random_crop(x, self.padding, generator)
        if self.brightness > 0 or self.contrast > 0 or self.saturation > 0:
            x = color_jitter(x, generator, self.brightness, self.contrast, self.saturation)
        return random_hflip(x, generator) if self.flip else x
