"""InferenceVAE: loading without training parts, scaling, and tiled encode/decode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from klvae.inference import InferenceVAE, tiled_apply
from klvae.interop.formats import read_vae_weights, write_vae
from klvae.modules.vae import KLAutoencoder
from tests.conftest import tiny_ddconfig_dict

TINY_F2 = tiny_ddconfig_dict(levels=2)  # f = 2, widths 8/16 (diffusers block_out_channels [8, 16])


@pytest.fixture
def vae() -> InferenceVAE:
    return InferenceVAE(KLAutoencoder.from_ddconfig(TINY_F2, 4), scaling_factor=0.5, shift_factor=0.1)


def test_blending_is_exact_for_a_local_function() -> None:
    # A purely local fn (nearest upsampling) must come back identical whatever the tiling: this checks
    # tile placement, clamped last tiles and that the blend weights sum to one.
    x = torch.randn(2, 4, 37, 29)

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=8, mode="nearest")[:, :3] * 2 + 1

    torch.testing.assert_close(tiled_apply(up, x, tile=12, overlap=4, scale=8.0), up(x), rtol=0, atol=1e-5)
    image = torch.randn(1, 3, 96, 64)
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    torch.testing.assert_close(
        tiled_apply(pool, image, tile=32, overlap=16, scale=1 / 8), pool(image), rtol=0, atol=1e-6
    )


def test_single_tile_equals_untiled_exactly(vae: InferenceVAE) -> None:
    z = torch.randn(1, 4, 16, 16)
    assert torch.equal(vae.decode(z, tile_size=64, tile_overlap=16), vae.decode(z))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(vae.encode(x, tile_size=32, tile_overlap=8), vae.encode(x))


def test_tiled_decode_close_to_untiled_away_from_seams(vae: InferenceVAE) -> None:
    # Statistically stationary latents; 48² latents in 32² latent tiles overlapping by 8 → tiles at 0 and 16.
    z = torch.randn(1, 4, 48, 48)
    full = vae.decode(z)
    tiled = vae.decode(z, tile_size=64, tile_overlap=16)
    assert tiled.shape == full.shape == (1, 3, 96, 96)
    # Not exact: GroupNorm statistics and the mid-block attention see one tile instead of the whole
    # latent (a random tiny net is far more sensitive to that than a trained one: ~5 % here).
    inner = (slice(None), slice(None), slice(8, 32), slice(8, 32))  # inside tile 0, away from border and seam
    inner_err = (tiled - full)[inner].abs().mean() / full[inner].abs().mean()
    total_err = (tiled - full).abs().mean() / full.abs().mean()
    assert inner_err < 0.15 and total_err < 0.2, (inner_err, total_err)


def test_scaled_latents_round_trip(vae: InferenceVAE) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    zs = vae.encode(x, scale=True)
    torch.testing.assert_close(zs, (z - 0.1) * 0.5)
    torch.testing.assert_close(vae.decode(zs, scale=True), vae.decode(z), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scaling_factor"):
        InferenceVAE(KLAutoencoder.from_ddconfig(TINY_F2, 4)).encode(x, scale=True)
    with pytest.raises(ValueError, match="multiples"):
        vae.decode(z, tile_size=31)


def test_from_pretrained_reads_scaling_factor_and_builds_no_training_parts(tmp_path) -> None:
    model = KLAutoencoder.from_ddconfig(TINY_F2, 4)
    torch.save(model.state_dict(), tmp_path / "vae.pth")
    write_vae(read_vae_weights(tmp_path / "vae.pth", ddconfig=TINY_F2), tmp_path / "hf", scaling_factor=0.7)
    code = (
        "import sys, torch; from klvae.inference import InferenceVAE\n"
        f"v = InferenceVAE.from_pretrained({str(tmp_path / 'hf')!r})\n"
        "assert v.scaling_factor == 0.7, v.scaling_factor\n"
        "assert not any('loss' in n or 'discriminator' in n for n, _ in v.named_modules())\n"
        "assert 'lpips' not in sys.modules and 'pytorch_lightning' not in sys.modules\n"
        "print(tuple(v.decode(torch.zeros(1, 4, 4, 4)).shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3, 8, 8)"


def test_flux2_batch_norm_scale_gives_normalised_patches_and_tiles_still_cover() -> None:
    # A FLUX.2-shaped network: scale=True is the BatchNorm over 2x2 patches (no factors), and back.
    model = KLAutoencoder.from_ddconfig({**TINY_F2, "z_channels": 8, "latent_batch_norm": {}}, 8)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    vae = InferenceVAE(model)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = vae.encode(x)  # (2, 8, 16, 24)
    zs = vae.encode(x, scale=True)
    assert zs.shape == (2, 32, 8, 12)
    torch.testing.assert_close(zs, model.bn.normalize(z))
    torch.testing.assert_close(vae.decode(zs, scale=True), vae.decode(z), rtol=1e-4, atol=1e-5)
    # the normalisation happens on the whole latent: a tile covering it changes nothing
    assert torch.equal(vae.encode(x, scale=True, tile_size=48, tile_overlap=8), zs)
    assert torch.equal(vae.decode(zs, scale=True, tile_size=48, tile_overlap=8), vae.decode(zs, scale=True))
    assert torch.equal(vae.posterior(x).mean, z)
    with pytest.raises(ValueError, match="normalises latents with its BatchNorm"):
        InferenceVAE(model, scaling_factor=0.5)
