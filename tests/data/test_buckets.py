"""Aspect-ratio buckets: the shapes, the nearest bucket, and a crop that loses only the aspect difference."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from klvae.data.buckets import BucketConfig, BucketTransform, build_transform, make_buckets, nearest_bucket
from klvae.errors import ConfigError
from tests.data.conftest import encode, random_image


def test_buckets_at_1024_are_sdxls_shapes_of_about_equal_area() -> None:
    buckets = make_buckets(1024, 64, max_aspect=2.0)
    # SDXL's multi-aspect list (its appendix) within 2:1, as (height, width).
    assert {
        (1024, 1024),
        (896, 1152),
        (1152, 896),
        (832, 1216),
        (1216, 832),
        (768, 1344),
        (1344, 768),
    } <= set(buckets)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    assert all(0.93 <= h * w / 1024**2 <= 1.0 for h, w in buckets)
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in buckets)
    assert {(w, h) for h, w in buckets} == set(buckets)  # every landscape bucket has its portrait
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects) and len(buckets) == 13


@pytest.mark.parametrize(("size", "step", "expected"), [(256, 32, 5), (512, 64, 5), (1000, 64, 15)])
def test_bucket_sides_are_multiples_of_the_step_for_any_target(size: int, step: int, expected: int) -> None:
    buckets = make_buckets(size, step)
    assert len(buckets) == expected and all(h % step == 0 and w % step == 0 for h, w in buckets)
    assert all(h * w <= size * size for h, w in buckets)


def test_nearest_bucket_is_the_least_cropped_one() -> None:
    buckets = make_buckets(512, 32, max_aspect=3.0)
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(100, 3000), rng.randint(100, 3000)
        kept = [min(width / height / (w / h), (w / h) / (width / height)) for h, w in buckets]  # area kept
        assert kept[nearest_bucket(width, height, buckets)] == pytest.approx(max(kept))


def _banded(height: int, width: int) -> np.ndarray:
    """Red top quarter, blue bottom quarter, random middle: which rows and columns survive is visible."""
    image = random_image(0, height, width)
    image[: height // 4] = (255, 0, 0)
    image[-height // 4 :] = (0, 0, 255)
    return image


def test_an_image_of_a_buckets_aspect_ratio_is_only_resized() -> None:
    data = encode(random_image(1, 48, 80), "PNG")  # 80x48 = 5:3, the 40x24 bucket of make_buckets(32, 8)
    transform = BucketTransform(make_buckets(32, 8), train=True, random_flip=False)
    out = transform(data, random.Random(0))
    expected = Image.open(Image.io.BytesIO(data)).resize((40, 24), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert out.shape == (24, 40, 3) and np.array_equal(out, np.asarray(expected))


@pytest.mark.parametrize("train", [True, False])
def test_a_wider_image_loses_columns_only_never_rows(train: bool) -> None:
    # 3:1 is beyond every bucket: cropped to the widest one (80x48) along its width; all rows stay.
    data = encode(_banded(60, 180), "PNG")
    transform = BucketTransform(make_buckets(64, 8, max_aspect=2.0), train=train, random_flip=train)
    rng = random.Random(0)
    for _ in range(10 if train else 1):
        out = transform(data, rng)
        assert out.shape == (48, 80, 3)
        assert (out[0, :, 0] > 200).all() and (out[0, :, 2] < 60).all()  # the top row is still red
        assert (out[-1, :, 2] > 200).all() and (out[-1, :, 0] < 60).all()  # the bottom row still blue


def test_a_large_tall_jpeg_is_drafted_and_cropped_to_its_portrait_bucket() -> None:
    # 260 wide, 400 high: JPEG draft decodes at 1/2 or 1/4 scale, still covering the 48x80 frame.
    tall = encode(_banded(400, 260), "JPEG")
    buckets = make_buckets(64, 8)
    out = BucketTransform(buckets, train=False)(tall, random.Random(0))
    assert out.shape[:2] == buckets[nearest_bucket(260, 400, buckets)] == (80, 48)


def test_too_small_images_are_refused_by_the_original_shorter_side() -> None:
    from klvae.data.transforms import ImageTooSmallError

    with pytest.raises(ImageTooSmallError, match="below min_size 50"):
        BucketTransform(make_buckets(32, 8), min_size=50)(encode(random_image(0, 40, 90)), random.Random(0))


def test_bucket_config_errors_name_the_key() -> None:
    assert BucketConfig.from_config(None) is None
    assert BucketConfig.from_config({"step": 16}).shapes(32) == make_buckets(32, 16, 2.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stride'\]"):
        BucketConfig.from_config({"stride": 64})
    with pytest.raises(ConfigError, match="buckets.step must be an int >= 1, got 0"):
        BucketConfig(step=0)
    with pytest.raises(ConfigError, match="buckets.max_aspect must be a number >= 1"):
        BucketConfig(max_aspect=0.5)
    with pytest.raises(ConfigError, match="bucket target size must be an int >= buckets.step"):
        make_buckets(32, 64)
    with pytest.raises(ConfigError, match="resize_to .* cannot be combined with buckets"):
        build_transform(32, 48, BucketConfig(step=8), 0, False, train=True)


def test_every_crop_is_its_images_nearest_bucket_over_many_aspect_ratios() -> None:
    buckets = make_buckets(48, 8, max_aspect=2.0)
    transform = BucketTransform(buckets, train=True, random_flip=True)
    rng = random.Random(1)
    for i in range(20):
        width, height = rng.randint(30, 150), rng.randint(30, 150)
        out = transform(encode(random_image(i, height, width)), rng)
        assert out.shape == (*buckets[nearest_bucket(width, height, buckets)], 3)
