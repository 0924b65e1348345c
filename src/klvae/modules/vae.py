"""The autoencoder itself (encoder, quant convs, decoder) as a plain ``nn.Module``, no training parts.

Its 248 state-dict keys are LDM's ``first_stage_model`` layout, so SD/LDM weights load with
``strict=True``. :class:`KLCodec` holds encode/decode so that the Lightning module
(:class:`klvae.models.autoencoder.AutoencoderKL`) and this inference model share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.model import Decoder, Encoder
from klvae.util import instantiate_from_config

__all__ = ["KL_F8_DDCONFIG", "KLAutoencoder", "KLCodec", "build_codec_modules"]

# The published kl-f8 network (LDM / Stable Diffusion first stage), embed_dim 4.
KL_F8_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def build_codec_modules(ddconfig: Mapping[str, Any], embed_dim: int) -> dict[str, nn.Module]:
    """Encoder, Decoder, quant_conv and post_quant_conv for an LDM ``ddconfig`` and ``embed_dim``."""
    if not ddconfig.get("double_z", True):
        raise ValueError(
            "ddconfig.double_z must be true for a KL autoencoder (the encoder emits mean and logvar)"
        )
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
    z_channels = ddconfig["z_channels"]
    return {
        # Through instantiate_from_config so a misspelled ddconfig key is a ConfigError naming it.
        "encoder": instantiate_from_config({"target": "klvae.modules.model.Encoder", "params": ddconfig}),
        "decoder": instantiate_from_config({"target": "klvae.modules.model.Decoder", "params": ddconfig}),
        # 1×1 convs between the network's z_channels and the posterior's embed_dim (both 4 for kl-f8).
        "quant_conv": nn.Conv2d(2 * z_channels, 2 * embed_dim, 1),
        "post_quant_conv": nn.Conv2d(embed_dim, z_channels, 1),
    }


class KLCodec:
    """encode/decode/forward over ``self.encoder``, ``self.quant_conv``, ``self.post_quant_conv``, ``self.decoder``."""

    encoder: Encoder
    decoder: Decoder
    quant_conv: nn.Conv2d
    post_quant_conv: nn.Conv2d

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (B, 3, H, W) in [-1, 1] → posterior over latents (B, embed_dim, H/8, W/8)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2·embed_dim, H/8, W/8)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) → image (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``x``; returns (reconstruction (B, 3, H, W), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class KLAutoencoder(KLCodec, nn.Module):
    """Inference-only KL autoencoder: no loss, no LPIPS, no discriminator.

    Args:
        ddconfig: LDM network config (``ch``, ``ch_mult``, ``z_channels`` ...), see :class:`Encoder`.
        embed_dim: latent channels of the posterior (4 for kl-f8).
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int) -> None:
        nn.Module.__init__(self)
        for name, module in build_codec_modules(ddconfig, embed_dim).items():
            self.add_module(name, module)
        self.ddconfig, self.embed_dim = dict(ddconfig), embed_dim
