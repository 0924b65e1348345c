"""Scores of generated images against real ones: gFID and KID (Inception) and SWD (no network at all).

* gFID: klvae's FID (``klvae.evaluation.metrics``: TF-Inception pool features, float64 Fréchet distance),
  marked unreliable below ``MIN_RFID_IMAGES`` (2,048) images exactly as ``klvae-eval``'s rFID.
* KID (Bińkowski et al. 2018, arXiv:1801.01401): unbiased MMD² with the cubic polynomial kernel
  ``(x·y/d + 1)³`` on the same features; unbiased, so meaningful with a few hundred images.
* SWD: the sliced Wasserstein distance between 7×7 patches of Laplacian-pyramid levels (Karras et al. 2018,
  arXiv:1710.10196, §5), averaged over levels. Needs no pretrained network, so it is reported when the
  Inception weights are missing; patches make it usable with few images. One change from that paper:
  both sets' patches are normalised with the *real* set's per-channel mean/std (the paper normalises each
  set by its own), so a global colour or contrast error counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kernel_inception_distance", "laplacian_pyramid", "patch_descriptors", "sliced_wasserstein"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def laplacian_pyramid(images: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    """Band-pass levels of images (N, 3, H, W), finest first; the last level is the low-pass residual
    at ``min_size`` (or the first side below twice it)."""
    levels, x = [], images.float()
    while min(x.shape[-2:]) >= 2 * min_size:
        down = _blur(x)[..., ::2, ::2]
        up = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
        levels.append(x - up)
        x = down
    levels.append(x)
    return levels


def patch_descriptors(
    level: torch.Tensor, per_image: int, generator: torch.Generator, size: int = 7
) -> torch.Tensor:
    """``per_image`` random size×size patches of every image of a level (N, C, h, w) → (N·per_image, C·size²)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=generator)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=generator)
    offsets = torch.arange(size)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, size, size)  # (N, K, s, s)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, size, size)
    idx = torch.arange(n)[:, None, None, None].expand_as(rows)
    patches = level.permute(0, 2, 3, 1)[idx, rows, cols]  # (N, K, s, s, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c * size * size)


def _swd(
    a: torch.Tensor, b: torch.Tensor, directions: int, repeats: int, generator: torch.Generator
) -> float:
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]
    total = 0.0
    for _ in range(repeats):
        proj = torch.randn(a.shape[1], directions, generator=generator)
        proj = proj / proj.norm(dim=0, keepdim=True)
        pa, _ = (a @ proj).sort(dim=0)
        pb, _ = (b @ proj).sort(dim=0)
        total += (pa - pb).abs().mean().item()
    return total / repeats


def sliced_wasserstein(
    real: torch.Tensor, fake: torch.Tensor, per_image: int = 128, directions: int = 512, repeats: int = 4,
    seed: int = 0,
) -> dict[str, float | list[float]]:  # fmt: skip
    """Multi-scale SWD between two image sets (N, 3, H, W) in [-1, 1] (lower is better; 0 for equal sets).

    Returns:
        ``{"swd": mean over levels, "per_level": [finest, ..., low-pass]}`` (×1e3, as Karras et al. report).
    """
    generator = torch.Generator().manual_seed(seed)
    per_level = []
    for level_real, level_fake in zip(laplacian_pyramid(real), laplacian_pyramid(fake), strict=True):
        a = patch_descriptors(level_real, per_image, generator)  # (N·K, 3·49)
        b = patch_descriptors(level_fake, per_image, generator)
        channels = level_real.shape[1]
        # Normalise per colour channel with the real set's statistics (columns are channel-major).
        ar = a.view(a.shape[0], channels, -1)
        mean, std = ar.mean(dim=(0, 2)), ar.std(dim=(0, 2)).clamp_min(1e-8)
        a = ((ar - mean[:, None]) / std[:, None]).reshape_as(a)
        b = ((b.view(b.shape[0], channels, -1) - mean[:, None]) / std[:, None]).reshape_as(b)
        per_level.append(1e3 * _swd(a, b, directions, repeats, generator))
    return {"swd": sum(per_level) / len(per_level), "per_level": per_level}


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased MMD² with the kernel ``(x·y/d + 1)³`` between feature sets (N, d), (M, d), float64."""
    x, y = real.double(), fake.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n} and {m}")
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
