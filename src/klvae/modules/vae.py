"""The autoencoder itself (encoder, quant convs, decoder) as a plain ``nn.Module``, no training parts.

Its 248 state-dict keys (244 without the quant convs) are LDM's ``first_stage_model`` layout, so SD/LDM weights load with
``strict=True``. :class:`KLCodec` holds encode/decode so that the Lightning module
(:class:`klvae.models.autoencoder.AutoencoderKL`) and this inference model share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from klvae.modules.config import NetworkConfig
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.model import Decoder, Encoder

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


def build_codec_modules(network: NetworkConfig) -> dict[str, nn.Module]:
    """Encoder, Decoder, quant_conv and post_quant_conv for a :class:`NetworkConfig`.

    The one place the quant convs are decided: an absent one is ``nn.Identity`` (no parameters, so the
    state dict simply lacks ``quant_conv.*`` / ``post_quant_conv.*``, as in SD3's and FLUX.1's VAEs), and
    encode/decode need no branch.
    """
    z, e = network.z_channels, network.embed_dim
    return {
        "encoder": Encoder(**network.encoder_kwargs()),
        "decoder": Decoder(**network.decoder_kwargs()),
        # 1×1 convs between the network's z_channels and the posterior's embed_dim (both 4 for kl-f8).
        "quant_conv": nn.Conv2d(2 * z, 2 * e, 1) if network.use_quant_conv else nn.Identity(),
        "post_quant_conv": nn.Conv2d(e, z, 1) if network.use_post_quant_conv else nn.Identity(),
    }


class KLCodec:
    """encode/decode/forward over ``self.encoder``, ``self.quant_conv``, ``self.post_quant_conv``, ``self.decoder``."""

    encoder: Encoder
    decoder: Decoder
    quant_conv: nn.Module  # Conv2d, or Identity without quant convs
    post_quant_conv: nn.Module

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
        use_quant_conv: whether a 1×1 conv maps the encoder's moments to the posterior (False in SD3/FLUX.1).
        use_post_quant_conv: whether a 1×1 conv maps latents into the decoder (False in SD3/FLUX.1).
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.network = NetworkConfig.from_params(ddconfig, embed_dim, use_quant_conv, use_post_quant_conv)
        for name, module in build_codec_modules(self.network).items():
            self.add_module(name, module)
        self.ddconfig, self.embed_dim = dict(ddconfig), embed_dim
