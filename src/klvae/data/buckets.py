"""Aspect-ratio buckets: training and validating at the images' own shapes instead of square crops.

A bucket is an image shape (height, width) of about ``size²`` pixels whose sides are multiples of
``step``. Each image goes to the bucket nearest to its aspect ratio, is resized (aspect ratio kept) to the
smallest frame that covers the bucket, and cropped to it: the only pixels lost are the aspect-ratio
difference between the image and its bucket, along one axis (random offset in training, centred in
validation). Every batch holds one bucket, so it is one (B, 3, H, W) tensor.

The scheme is SDXL's multi-aspect training (Podell et al. 2023, "SDXL", section 2.3 and its appendix list
of buckets at 1024², sides multiples of 64) and kohya-ss/sd-scripts' ``make_bucket_resolutions`` (every
width in steps of ``bucket_reso_steps`` with the largest height that keeps the area within the target).

YAML (``data.params.buckets``; see docs/data.md)::

    buckets:
      step: 64          # every side a multiple of this (and of the autoencoder's downsampling factor)
      max_aspect: 2.0   # longest / shortest side of the most elongated bucket
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from klvae.data.transforms import ImageTransform, crop_from_frame, open_image, to_rgb
from klvae.errors import ConfigError

__all__ = ["BucketConfig", "BucketTransform", "build_transform", "make_buckets", "nearest_bucket"]

Shape = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class BucketConfig:
    """``data.params.buckets``: how bucket shapes are laid out around each target ``size``.

    Attributes:
        step: every bucket side is a multiple of this; it must be a multiple of the autoencoder's
            downsampling factor (8 for kl-f8; times the latent patch size of a VAE that patchifies its
            latents). Smaller steps give more buckets (less crop, more partially filled buckets).
        max_aspect: the most elongated bucket's longest/shortest side; images beyond it are cropped to it.
    """

    step: int = 64
    max_aspect: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 1:
            raise ConfigError(f"buckets.step must be an int >= 1, got {self.step!r}")
        if not isinstance(self.max_aspect, int | float) or self.max_aspect < 1:
            raise ConfigError(f"buckets.max_aspect must be a number >= 1, got {self.max_aspect!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> BucketConfig | None:
        """None (no buckets: square crops) or the validated mapping; an unknown key is a ConfigError."""
        if config is None:
            return None
        if not isinstance(config, Mapping):
            raise ConfigError(f"buckets: expected a mapping {{step, max_aspect}} or null, got {config!r}")
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"buckets: unknown key(s) {unknown}; accepted keys are {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**dict(config))

    def shapes(self, size: int) -> tuple[Shape, ...]:
        """The buckets around ``size²`` (see :func:`make_buckets`)."""
        return make_buckets(size, self.step, self.max_aspect)


def make_buckets(size: int, step: int, max_aspect: float = 2.0) -> tuple[Shape, ...]:
    """Bucket shapes of at most ``size²`` pixels, sides multiples of ``step``, sorted by aspect ratio.

    For every width ``w = s, s + step, ...`` (``s`` = ``size`` rounded down to a multiple of ``step``) the
    bucket takes the largest height ``h`` (a multiple of ``step``) with ``h·w <= size²``, while
    ``w/h <= max_aspect``; the square ``s × s`` and the transposed (portrait) shapes are included.

    Example: ``make_buckets(1024, 64)`` gives 13 shapes from 704×1408 (h×w) over 1024×1024 to 1408×704,
    with areas between 93.8 % and 100 % of 1024².

    Returns:
        ((height, width), ...) ordered from the tallest portrait to the widest landscape.
    """
    if not isinstance(size, int) or size < step:
        raise ConfigError(f"bucket target size must be an int >= buckets.step ({step}), got {size!r}")
    area = size * size
    side = size // step * step
    shapes = {(side, side)}
    width = side
    while True:
        height = area // width // step * step  # the largest multiple of step with height*width <= area
        if height < step or width / height > max_aspect:
            break
        shapes.update({(height, width), (width, height)})
        width += step
    return tuple(sorted(shapes, key=lambda hw: (hw[1] / hw[0], hw[1])))


def nearest_bucket(width: int, height: int, buckets: Sequence[Shape]) -> int:
    """Index of the bucket closest to ``width/height`` in log aspect ratio (least cropped); ties go to
    the larger bucket, then the earlier one."""
    aspect = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(aspect - math.log(buckets[i][1] / buckets[i][0])), -buckets[i][0] * buckets[i][1]),
    )


class BucketTransform:
    """Decode an image and crop it to its nearest bucket (the bucketed counterpart of ``ImageTransform``).

    Pipeline: read the header -> nearest bucket (H, W) -> decode (JPEG: DCT-domain downscale while the
    image still covers the frame) -> RGB -> resize, aspect ratio kept, to the smallest frame covering
    H × W -> random (train) or centred crop of H × W -> optional horizontal flip (train only).

    Args:
        buckets: the bucket shapes ((height, width), ...), e.g. ``BucketConfig().shapes(1024)``.
        min_size: images whose original shorter side is below this raise ``ImageTooSmallError``.
        random_flip: horizontal flip with probability 0.5 (train only).
        train: random crop and flip if True; centred crop otherwise (deterministic).
    """

    def __init__(
        self, buckets: Sequence[Shape], min_size: int = 0, random_flip: bool = False, train: bool = True
    ) -> None:
        if not buckets:
            raise ConfigError("buckets: no bucket shape fits (check buckets.step and max_aspect)")
        if not isinstance(min_size, int) or min_size < 0:
            raise ConfigError(f"min_size must be an int >= 0, got {min_size!r}")
        self.buckets = tuple((int(h), int(w)) for h, w in buckets)
        self.min_size = min_size
        self.random_flip = random_flip
        self.train = train

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The (height, width) of every crop this transform makes: the buckets."""
        return self.buckets

    def bucket_of(self, width: int, height: int) -> int:
        """Index of the bucket an image of this original size goes to."""
        return nearest_bucket(width, height, self.buckets)

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        """Transform encoded image bytes into a uint8 array (H, W, 3) of the image's nearest bucket.

        Raises:
            ImageTooSmallError: the shorter side is below ``min_size``.
            Exception: whatever PIL raises for corrupt or truncated files (the caller counts and skips).
        """
        img = open_image(data, self.min_size)
        crop_h, crop_w = self.buckets[self.bucket_of(*img.size)]
        if img.format == "JPEG":
            # Largest DCT-domain downscale whose result still covers the frame computed below.
            width, height = img.size
            scale = max(crop_w / width, crop_h / height)
            img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        img = to_rgb(img)  # forces the decode; a truncated file raises here
        width, height = img.size
        scale = max(crop_w / width, crop_h / height)
        frame = (max(crop_w, round(width * scale)), max(crop_h, round(height * scale)))
        return crop_from_frame(img, frame, (crop_w, crop_h), rng, self.train, self.random_flip)


def build_transform(
    size: int,
    resize_to: int | None,
    buckets: BucketConfig | None,
    min_size: int,
    random_flip: bool,
    train: bool,
) -> ImageTransform | BucketTransform:
    """The transform for one resolution: square crops (``ImageTransform``) or the buckets around ``size²``.

    Raises:
        ConfigError: ``resize_to`` with buckets (a bucketed image is resized to just cover its bucket).
    """
    if buckets is None:
        return ImageTransform(size, resize_to, min_size, random_flip, train=train)
    if resize_to is not None:
        raise ConfigError(
            f"resize_to ({resize_to}) cannot be combined with buckets: a bucketed image is resized to just "
            "cover its bucket; set resize_to to null"
        )
    return BucketTransform(buckets.shapes(size), min_size, random_flip, train=train)
