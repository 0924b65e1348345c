"""SWD and KID: zero for equal sets, growing with the difference; the pyramid they use."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from klvae.diffusability.signals import kernel_inception_distance, laplacian_pyramid, sliced_wasserstein
from klvae.evaluation.data import image_batches


def _photos(photo_dir) -> torch.Tensor:  # noqa: ANN001
    return next(iter(image_batches(str(photo_dir), 32, batch_size=16)))[0]  # (6, 3, 32, 32) in [-1, 1]


def test_swd_is_small_for_the_same_set_and_grows_with_blur_and_noise(photo_dir) -> None:
    x = _photos(photo_dir).repeat(4, 1, 1, 1)
    same = sliced_wasserstein(x, x.clone())["swd"]
    blurred = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear")
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    grey = torch.zeros_like(x)
    scores = [sliced_wasserstein(x, y)["swd"] for y in (blurred, noisy, grey)]
    # Patches are drawn independently for the two sets: the same set scores its sampling noise, not 0
    # (measured 29 here, 24 images × 128 patches per level), far below any real difference (330-780).
    assert all(s > 5 * same for s in scores), (same, scores)
    assert len(sliced_wasserstein(x, blurred)["per_level"]) == 2  # 32² band-pass + 16² low-pass


def test_laplacian_pyramid_levels_and_shapes() -> None:
    x = torch.randn(2, 3, 64, 64)
    levels = laplacian_pyramid(x)
    assert [tuple(t.shape[-2:]) for t in levels] == [(64, 64), (32, 32), (16, 16)]


def test_kid_is_near_zero_for_one_distribution_and_large_for_two() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 64, generator=g), torch.randn(400, 64, generator=g)
    shifted = torch.randn(400, 64, generator=g) + 0.5
    assert abs(kernel_inception_distance(a, b)) < 0.02 < kernel_inception_distance(a, shifted)
