"""Latent-space metrics on constructed inputs with known answers, and ``klvae-eval --latent-metrics``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from klvae.evaluation.evaluate import main as eval_main
from klvae.evaluation.latent_metrics import (
    PSNR_CAP_DB,
    _radius,
    compute_latent_metrics,
    evaluation_transforms,
    high_frequency_share,
    save_spectrum_png,
    summary,
)
from klvae.evaluation.latent_stats import LatentStats
from klvae.interop.formats import read_vae_weights, write_vae
from klvae.modules.vae import KLAutoencoder
from tests.conftest import tiny_ddconfig_dict


class PoolingCodec:
    """E = f×f average pooling (as latents, 3 channels), D = nearest f× upsampling; posterior = a point."""

    def __init__(self, f: int) -> None:
        self.downsampling = f

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return F.avg_pool2d(x, self.downsampling) if self.downsampling > 1 else x.clone()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (
            F.interpolate(z, scale_factor=self.downsampling, mode="nearest") if self.downsampling > 1 else z
        )


def photos(n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_exactly_equivariant_codec_scores_the_cap_for_every_transform():
    result = compute_latent_metrics(PoolingCodec(1), [photos()])  # the identity codec: D(τ(E(x))) = τ(x)
    assert set(result["equivariance_psnr"]) == set(evaluation_transforms())
    assert all(v == PSNR_CAP_DB for v in result["equivariance_psnr"].values())


def test_rotations_cost_nothing_beyond_reconstruction_for_a_pooling_codec():
    # Pooling commutes with rotation: D(rot(E(x))) = rot(D(E(x))), so its error is the reconstruction's.
    # Downscaling does not commute with pooling + nearest upsampling: a lower score than the identity.
    result = compute_latent_metrics(PoolingCodec(8), [photos(size=64)])
    eq = result["equivariance_psnr"]
    assert eq["identity"] < PSNR_CAP_DB
    for k in ("rot_90", "rot_180", "rot_270"):
        assert eq[k] == pytest.approx(eq["identity"], abs=1e-9)
    blocks = F.interpolate(photos(size=8), scale_factor=8, mode="nearest")  # images the codec maps exactly
    eq_blocks = compute_latent_metrics(PoolingCodec(8), [blocks])["equivariance_psnr"]
    assert eq_blocks["identity"] >= 80 and eq_blocks["rot_90"] >= 80
    assert eq_blocks["scale_0.5"] < eq_blocks["identity"] - 10


def test_white_noise_spreads_energy_by_bin_area_and_smooth_fields_have_none_above_the_cutoff():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 4, 32, 32, generator=g)
    area = float((_radius(32, 32, torch.device("cpu")) > 0.5).double().mean())  # 1 − π/16 ≈ 0.80 of bins
    assert area == pytest.approx(1 - math.pi / 16, abs=0.02)
    assert high_frequency_share(noise, 0.5) == pytest.approx(area, abs=0.03)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.sin(2 * math.pi * xx / 16) + torch.cos(2 * math.pi * yy / 32)  # ≤ 1/8 of Nyquist
    assert high_frequency_share(smooth.expand(2, 4, 32, 32), 0.5) < 1e-3
    checker = ((xx + yy) % 2) * 2 - 1  # all energy at the Nyquist corner
    assert high_frequency_share(checker.expand(1, 1, 32, 32), 0.5) > 0.99


def test_spectrum_shares_stats_and_outputs(tmp_path):
    x = photos(3, 64)
    codec = PoolingCodec(8)
    result = compute_latent_metrics(codec, [x[:2], x[2:]], cutoff=0.25, bins=8)
    stats = LatentStats()
    stats.update(codec.encode(x))
    assert result["latent_stats"]["std"] == pytest.approx(stats.result()["std"])
    assert result["num_images"] == 3 and result["cutoff"] == 0.25
    for key in ("latent_spectrum", "image_spectrum"):
        profile = result[key]["radial_profile"]
        assert len(profile) == 8 and sum(profile) == pytest.approx(1.0)
        assert 0 <= result[key]["high_frequency_share"] <= 1
    text = summary(result)
    assert "rot_90" in text and "scaling_factor" in text
    png = save_spectrum_png(result, tmp_path / "s.png")
    assert Image.open(png).size == (480, 320)
    json.dumps(result)  # JSON-ready


def test_image_size_not_a_multiple_of_f_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of f=8"):
        compute_latent_metrics(PoolingCodec(8), [photos(size=36)])


@pytest.mark.parametrize("channels", [4, 16])
def test_klvae_eval_latent_metrics_flag_writes_json_and_png(tmp_path, channels):
    ddconfig = tiny_ddconfig_dict(levels=2, z_channels=channels)
    torch.save(KLAutoencoder.from_ddconfig(ddconfig, channels).state_dict(), tmp_path / "vae.pth")
    ckpt = write_vae(read_vae_weights(tmp_path / "vae.pth", ddconfig=ddconfig), tmp_path / "vae.safetensors")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    out = tmp_path / "out"
    eval_main([str(ckpt), "--data", str(tmp_path / "imgs"), "--resolution", "32", "--out", str(out),
               "--lpips", "none", "--inception", "none", "--device", "cpu", "--latent-metrics"])  # fmt: skip
    result = json.loads((out / "latent_metrics.json").read_text())
    assert result["num_images"] == 3 and set(result["equivariance_psnr"]) == set(evaluation_transforms())
    assert len(result["latent_stats"]["per_channel_std"]) == channels
    assert (out / "latent_spectrum.png").is_file() and (out / "metrics.json").is_file()
