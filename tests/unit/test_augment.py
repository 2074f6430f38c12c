"""Batched normalisation and augmentation: against per-image references (torchvision, brute force, numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fewshot_sla.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    color_jitter,
    normalize,
    random_crop,
    random_hflip,
    random_quarter_turns,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images_u8(*lead: int, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (*lead, 3, size, size), generator=gen(seed), dtype=torch.uint8)


def test_normalize_matches_the_formula_for_uint8_and_unit_float():
    x = images_u8(2, 3)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    expected = (x.double().numpy() / 255 - mean[:, None, None]) / std[:, None, None]
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(normalize(x.float() / 255).numpy(), expected, atol=1e-5)
    custom = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    np.testing.assert_allclose(custom[..., 1, :, :].numpy(), (x[..., 1, :, :].numpy() / 255 - 0.5) / 0.5, atol=1e-5)


def test_normalize_accepts_the_channels_last_views_episodes_come_in():
    x = images_u8(4, size=5).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [4,3,5,5] channels-last view
    assert torch.equal(normalize(x), normalize(x.contiguous()))


def test_random_crop_outputs_a_crop_of_the_zero_padded_image_with_per_image_offsets():
    x = images_u8(40, size=5)
    out = random_crop(x, padding=2, generator=gen(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(40):  # brute force: which of the 25 windows is it?
        hits = [(t, s) for t in range(5) for s in range(5) if torch.equal(out[i], padded[i, :, t : t + 5, s : s + 5])]
        assert hits, i
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # offsets differ from image to image
    assert torch.equal(random_crop(x, 0, gen(0)), x)


def test_random_crop_on_a_hand_made_image():
    x = torch.zeros(1, 3, 3, 3)
    x[0, :, 0, 0] = 1.0  # one lit pixel in the top-left corner
    seen = set()
    for seed in range(60):
        out = random_crop(x, padding=1, generator=gen(seed))[0, 0]
        lit = (out == 1).nonzero().tolist()
        assert len(lit) <= 1 and out.sum() == len(lit)
        seen.add(tuple(lit[0]) if lit else None)
    # The corner pixel moves by -1..+1 in each direction (off the image when shifted out).
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1), None}


def test_hflip_mirrors_exactly_the_chosen_images():
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float32).view(2, 3, 2, 3) / 36
    x = x.expand(50, -1, -1, -1, -1).reshape(100, 3, 2, 3)
    out = random_hflip(x, gen(5))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert (flipped ^ kept).all() and 30 < flipped.sum() < 70
    hand = torch.tensor([[[1, 2, 3]]], dtype=torch.uint8).expand(3, -1, -1)
    assert torch.equal(random_hflip(hand, gen(0), p=1.0), torch.tensor([[[3, 2, 1]]] * 3, dtype=torch.uint8))
    assert torch.equal(random_hflip(x, gen(0), p=0.0), x)


@pytest.mark.parametrize(
    "ours, reference",
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_colour_adjustments_match_torchvision_image_by_image(ours, reference):
    x = images_u8(6, size=7, seed=2).float() / 255
    factors = torch.tensor([0.0, 0.3, 0.8, 1.0, 1.3, 1.7])
    out = ours(x, factors)
    for i in range(6):
        torch.testing.assert_close(out[i], reference(x[i], float(factors[i])), atol=1e-6, rtol=0)


def test_uint8_adjustments_round_the_float_result():
    x = images_u8(3, size=4, seed=4)
    factors = torch.tensor([0.5, 1.2, 1.9])
    expected = (adjust_contrast(x.float() / 255, factors) * 255).round().to(torch.uint8)
    assert torch.equal(adjust_contrast(x, factors), expected)


def test_color_jitter_factors_stay_in_range():
    x = torch.full((200, 3, 2, 2), 0.4)
    out = color_jitter(x, gen(7), brightness=0.4, contrast=0.0, saturation=0.0)
    ratio = out[:, 0, 0, 0] / 0.4
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6
    assert ratio.min() < 0.7 and ratio.max() > 1.3  # and span it
    assert torch.equal(color_jitter(x, gen(7), 0.0, 0.0, 0.0), x)


def test_train_augment_shapes_dtypes_ranges_and_determinism():
    aug = TrainAugment(padding=2)
    x = images_u8(3, 4, size=8)
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    f = aug(x.float() / 255, gen(1))
    assert f.dtype == torch.float32 and f.min() >= 0 and f.max() <= 1


def test_train_augment_draws_parameters_per_image():
    x = images_u8(1, size=8).expand(16, -1, -1, -1).contiguous()
    out = TrainAugment(padding=2)(x, gen(0))
    assert len({o.numpy().tobytes() for o in out}) == 16


def _turns_found(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per image, the quarter turns k that map it to its output, found by trying all four (-1 where none does)."""
    matches = torch.stack(
        [(out == torch.rot90(images, k, dims=(-2, -1))).flatten(-3).all(-1) for k in range(4)], dim=-1
    )
    assert (matches.sum(-1) <= 1).all()  # random images: no two rotations of one image coincide
    return torch.where(matches.any(-1), matches.float().argmax(-1), -1)


def test_random_quarter_turns_turn_each_image_on_its_own_uniformly():
    x = images_u8(40, 50, size=5)
    out = random_quarter_turns(x, gen(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    turns = _turns_found(x, out)
    assert (turns >= 0).all()
    counts = torch.bincount(turns.flatten(), minlength=4)
    assert ((counts > 400) & (counts < 600)).all(), counts  # 2000 images, 500 expected each (sd 19)
    pairs = torch.bincount((4 * turns[:, :-1] + turns[:, 1:]).flatten(), minlength=16)
    assert (pairs > 60).all(), pairs  # neighbours turned independently: 16 pairs of about 122 each
    assert torch.equal(out, random_quarter_turns(x, gen(3))) and not torch.equal(out, random_quarter_turns(x, gen(4)))
    grey = x[..., :1, :, :].float() / 255
    assert (_turns_found(grey, random_quarter_turns(grey, gen(3))) >= 0).all()
    with pytest.raises(ValueError, match="square images, got 5x6"):
        random_quarter_turns(torch.zeros(2, 1, 5, 6), gen())


def test_quarter_turns_only_changes_nothing_but_the_orientation():
    x = images_u8(300, size=7)
    out = TrainAugment.quarter_turns_only()(x, gen(5))
    turns = _turns_found(x, out)
    assert (turns >= 0).all() and set(turns.tolist()) == {0, 1, 2, 3}
    assert _turns_found(x, TrainAugment(padding=2)(x, gen(5))).lt(0).any()  # the usual augmentation does more


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"images must be \[\.\.\., C, H, W\] with C = 1 or 3"):
        normalize(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="3 normalisation channels for images of 1 channels"):
        normalize(torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="uint8 or floating point"):
        random_hflip(torch.zeros(2, 3, 5, 5, dtype=torch.int32), gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_batch_device_and_rejects_a_foreign_generator():
    x = images_u8(2, 3, size=8).cuda()
    out = TrainAugment(padding=2)(x, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and normalize(out).device.type == "cuda"
    with pytest.raises(ValueError, match="create the generator on the images' device"):
        random_crop(x, 2, gen())
