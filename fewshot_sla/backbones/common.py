"""Shape rules shared by the backbones: each halves the image side four times (floor)."""

from __future__ import annotations

from fewshot_sla.errors import UserError

HALVINGS = 4
MIN_IMAGE_SIZE = 2**HALVINGS  # below this nothing is left after the last halving


def check_image_size(name: str, height: int, width: int) -> None:
    """Raise a UserError when an image is too small for four halvings."""
    if min(height, width) < MIN_IMAGE_SIZE:
        raise UserError(
            f"{name} needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels, got {height}x{width}; "
            "use larger images or another backbone"
        )


def final_side(name: str, image_size: int) -> int:
    """Side of the last feature map for a square ``image_size`` input (84 -> 5, 32 -> 2)."""
    check_image_size(name, image_size, image_size)
    return image_size // MIN_IMAGE_SIZE
