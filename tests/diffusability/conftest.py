"""Tiny VAEs and real photographs for the latent-cache and diffusability tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klvae.interop.formats import VAEWeights, write_vae
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KLAutoencoder
from tests.cli_helpers import write_photos
from tests.conftest import tiny_ddconfig_dict


def save_vae(model: KLAutoencoder, path: Path) -> Path:
    """A klvae export (.safetensors recording its network), as any user's VAE file."""
    return write_vae(VAEWeights(model.state_dict(), model.network, "klvae-run"), path)


def tiny_vae(levels: int = 4, seed: int = 0) -> KLAutoencoder:
    torch.manual_seed(seed)
    return KLAutoencoder(NetworkConfig.from_params(tiny_ddconfig_dict(levels=levels), 4)).eval()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six real photographs, 40² PNGs (32² center crops)."""
    return write_photos(tmp_path_factory.mktemp("photos"), n=6, size=40)


@pytest.fixture(scope="session")
def vae_f2(tmp_path_factory) -> Path:
    """A random tiny f = 2 VAE file (32² images → 4×16×16 latents)."""
    return save_vae(tiny_vae(levels=2), tmp_path_factory.mktemp("vae") / "vae_f2.safetensors")
