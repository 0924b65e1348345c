"""ImageTransform: decoding, crop sizes, flips, value range, colour conversion, min_size."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.data.transforms import ImageTooSmallError, ImageTransform, to_model_batch
from tests.data.conftest import encode, random_image


def _left_dark_right_bright(height: int = 48, width: int = 80) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, width // 2 :] = 255
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_train_crop_has_requested_size_for_every_format(fmt: str) -> None:
    transform = ImageTransform(size=24, resize_to=32, train=True)
    out = transform(encode(random_image(0, 40, 56), fmt), random.Random(0))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_model_batch_is_float_bchw_in_minus_one_one() -> None:
    crops = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    batch = to_model_batch(crops)
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32 and batch.is_contiguous()
    assert batch[0].eq(-1).all() and batch[1].eq(1).all()


def test_center_crop_is_deterministic_and_centred() -> None:
    data = encode(_left_dark_right_bright(48, 96), "PNG")
    transform = ImageTransform(size=48, train=False)
    first = transform(data, random.Random(0))
    assert np.array_equal(first, transform(data, random.Random(123)))
    # The centred 48-wide window of a 96-wide half-dark image is dark on its left half only.
    assert first[:, :20].max() < 10 and first[:, 28:].min() > 245


def test_random_crop_positions_vary() -> None:
    data = encode(random_image(1, 64, 64), "PNG")
    transform = ImageTransform(size=16, resize_to=64, train=True)
    rng = random.Random(0)
    crops = {transform(data, rng).tobytes() for _ in range(10)}
    assert len(crops) > 5


def test_random_flip_flips_about_half_the_time_and_only_when_enabled() -> None:
    data = encode(_left_dark_right_bright(32, 32), "PNG")
    rng = random.Random(0)
    flipped = ImageTransform(size=32, random_flip=True, train=True)
    dark_left = [flipped(data, rng)[:, :8].mean() < 128 for _ in range(200)]
    assert 60 < sum(dark_left) < 140
    plain = ImageTransform(size=32, random_flip=False, train=True)
    assert all(plain(data, rng)[:, :8].mean() < 128 for _ in range(20))
    no_flip_in_val = ImageTransform(size=32, random_flip=False, train=False)
    assert no_flip_in_val(data, rng)[:, :8].mean() < 128


def test_greyscale_and_rgba_become_rgb() -> None:
    grey = encode(np.full((20, 20), 100, np.uint8), "PNG")
    assert ImageTransform(size=16, train=False)(grey, random.Random(0)).shape == (16, 16, 3)
    rgba = np.zeros((20, 20, 4), np.uint8)  # fully transparent black -> white background
    out = ImageTransform(size=16, train=False)(encode(rgba, "PNG"), random.Random(0))
    assert out.min() == 255


def test_small_images_raise_too_small() -> None:
    transform = ImageTransform(size=16, min_size=32, train=True)
    with pytest.raises(ImageTooSmallError):
        transform(encode(random_image(0, 20, 40)), random.Random(0))
    assert transform(encode(random_image(0, 32, 40)), random.Random(0)).shape == (16, 16, 3)


def test_truncated_jpeg_raises() -> None:
    data = encode(random_image(0, 64, 64), "JPEG")
    with pytest.raises(OSError):
        ImageTransform(size=16)(data[: len(data) // 2], random.Random(0))


def test_resize_matches_resize_then_crop() -> None:
    """The box-resize shortcut equals resizing the whole image, then center-cropping."""
    array = random_image(3, 60, 90)
    data = encode(array, "PNG")
    out = ImageTransform(size=30, resize_to=40, train=False)(data, random.Random(0)).astype(int)
    full = np.asarray(Image.fromarray(array).resize((60, 40), Image.Resampling.BICUBIC)).astype(int)
    reference = full[5:35, 15:45]
    assert np.abs(out - reference).mean() < 3.0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="resize_to"):
        ImageTransform(size=256, resize_to=128)
    with pytest.raises(ValueError, match="size"):
        ImageTransform(size=0)
