"""PSNR / SSIM / LPIPS / FID on pairs with known answers (skimage and closed forms as oracles)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from klvae.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    inception_features,
    load_inception,
    lpips_per_image,
    psnr,
    quantize,
    resize_bilinear_tf1,
    ssim,
    to_unit,
)
from klvae.io.cache import inception_path, lpips_full_path
from klvae.modules.perceptual import load_lpips


def test_psnr_identical_is_inf_and_known_noise_level() -> None:
    x = torch.rand(3, 3, 32, 32)
    assert torch.isinf(psnr(x, x)).all()
    # A constant offset of 0.01 everywhere: MSE 1e-4 → exactly 40 dB.
    base = x.double() * 0.9 + 0.05
    torch.testing.assert_close(psnr(base, base + 0.01), torch.full((3,), 40.0, dtype=torch.float64))
    # Gaussian noise of σ = 0.05: PSNR ≈ -20·log10(0.05) = 26.02 dB.
    clean = torch.rand(3, 3, 64, 64)
    noisy = clean + 0.05 * torch.randn_like(clean)
    assert (psnr(clean, noisy) - (-20 * math.log10(0.05))).abs().max() < 0.3


def test_ssim_matches_skimage_and_is_one_for_identical_images() -> None:
    x = torch.rand(2, 3, 40, 36)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours = ssim(x, y)
    for b in range(2):
        ref = structural_similarity(
            x[b].numpy(), y[b].numpy(), data_range=1.0, channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )  # fmt: skip
        assert abs(ours[b].item() - ref) < 1e-6
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_to_unit_and_quantize() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.2])
    assert torch.equal(to_unit(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(quantize(torch.tensor([0.5, 1 / 255 + 1e-4])), torch.tensor([128 / 255, 1 / 255]))


def test_lpips_is_zero_for_identical_images_and_grows_with_noise() -> None:
    model = load_lpips("random")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips_per_image(model, x, x), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    small = lpips_per_image(model, x, x + 0.05 * torch.randn_like(x))
    large = lpips_per_image(model, x, x + 0.5 * torch.randn_like(x))
    assert (small > 0).all() and (large > small).all()


def test_frechet_distance_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.0])  # standard deviations
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)  # tr(Σ1+Σ2-2√(Σ1Σ2)) = Σ(σ1-σ2)²
    assert abs(frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) - expected) < 1e-9
    assert abs(frechet_distance(mu1, np.diag(s1**2), mu1, np.diag(s1**2))) < 1e-9


def _gaussian_stats(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of n correlated features; rank min(n - 1, dim)."""
    features = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + rng.normal(size=dim)
    return features.mean(0), np.cov(features, rowvar=False)


def _scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The reference implementation's formula (pytorch-fid, TTUR): a general matrix square root."""
    linalg = pytest.importorskip("scipy.linalg")
    covmean = np.real(linalg.sqrtm(sigma1 @ sigma2))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize(
    ("n", "dim"),
    [(400, 32), (20, 48), (48, 48)],
    ids=["full-rank", "fewer-samples-than-dims", "rank-one-short"],
)
def test_frechet_distance_matches_scipy_sqrtm(n: int, dim: int) -> None:
    rng = np.random.default_rng(n + dim)
    mu1, sigma1 = _gaussian_stats(rng, n, dim)
    mu2, sigma2 = _gaussian_stats(rng, n, dim)
    assert np.linalg.matrix_rank(sigma1) == min(n - 1, dim)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    # scipy's Schur square root of a singular product is accurate to ~1e-8 relative, hence the tolerance.
    assert ours == pytest.approx(_scipy_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    # Identical Gaussians: exactly the trace cancellation, also when the covariance is singular.
    assert abs(frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-9 * np.trace(sigma1)


def test_frechet_distance_rejects_mismatched_or_non_finite_statistics() -> None:
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"sigma2 has shape \(4, 4\), expected \(3, 3\)"):
        frechet_distance(mu, sigma, mu, np.eye(4))
    with pytest.raises(ValueError, match="mu2 has non-finite values"):
        frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)


def test_package_does_not_import_scipy() -> None:
    """scipy is not a dependency of klvae (it only arrives with lpips): no module in src/klvae imports it."""
    import ast

    import klvae

    package = Path(klvae.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            offenders += [
                f"{path.relative_to(package)}:{node.lineno}" for n in names if n.split(".")[0] == "scipy"
            ]
    assert len(list(package.rglob("*.py"))) > 20  # really the package's sources
    assert offenders == []


def test_feature_stats_match_numpy() -> None:
    feats = np.random.default_rng(0).normal(size=(50, 6))
    stats = FeatureStats(6)
    stats.update(torch.from_numpy(feats[:20]))
    stats.update(feats[20:])
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), atol=1e-10)


def test_tf1_bilinear_resize_known_cases() -> None:
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(resize_bilinear_tf1(x, 8), x)
    # Halving samples source coordinate 2i exactly: every other pixel, no blending (TF1, not half-pixel).
    assert torch.equal(resize_bilinear_tf1(x, 4), x[:, :, ::2, ::2])
    ramp = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    torch.testing.assert_close(
        resize_bilinear_tf1(ramp, 8)[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.0])
    )


def test_missing_inception_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="klvae-fetch-weights"):
        load_inception(tmp_path / "nope.pt")


@pytest.mark.slow
def test_real_inception_gives_2048_pool_features() -> None:
    if not inception_path().is_file():
        pytest.skip("run klvae-fetch-weights first")
    model = load_inception()
    images = torch.rand(3, 3, 64, 64)
    f = inception_features(model, images)
    assert f.shape == (3, 2048) and (f >= 0).all()  # average pool after ReLU
    assert not torch.allclose(f[0], f[1])


@pytest.mark.slow
def test_real_lpips_orders_distortions() -> None:
    if not lpips_full_path().is_file():
        pytest.skip("run klvae-fetch-weights first")
    model = load_lpips(str(lpips_full_path()))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d1 = lpips_per_image(model, x, x + 0.05 * torch.randn_like(x))
    d2 = lpips_per_image(model, x, x + 0.3 * torch.randn_like(x))
    assert (d1 < d2).all() and (d2 < 2).all()
