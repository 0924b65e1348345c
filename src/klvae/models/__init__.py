"""LightningModules."""

from klvae.models.autoencoder import AutoencoderKL

__all__ = ["AutoencoderKL"]
