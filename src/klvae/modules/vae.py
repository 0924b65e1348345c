"""The KL autoencoder network (encoder, quant convs, decoder) as a plain ``nn.Module``: no loss, no Lightning.

Its 248 state-dict keys (244 without the quant convs) are LDM's ``first_stage_model`` layout
(CompVis/latent-diffusion ``ldm.models.autoencoder.AutoencoderKL``), so SD/LDM weights load with
``strict=True``. A FLUX.2-shaped network adds its latent BatchNorm as ``bn.*`` (251 keys), the name both
FLUX.2's own code and diffusers' ``AutoencoderKLFlux2`` give it. The training LightningModule
:class:`klvae.models.autoencoder.AutoencoderKL` extends this class, so training and inference run one
implementation of encode/decode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from klvae.modules.config import NetworkConfig
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.latent_norm import LatentBatchNorm
from klvae.modules.model import Decoder, Encoder

__all__ = ["KL_F8_DDCONFIG", "KLAutoencoder"]

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


class KLAutoencoder(nn.Module):
    """KL autoencoder: image (B, 3, H, W) in [-1, 1] → Gaussian posterior over (B, embed_dim, H/8, W/8) → image.

    Args:
        network: the network's shape (defaults: kl-f8). Build one from LDM's YAML vocabulary with
            :meth:`from_ddconfig`.

    Attributes:
        encoder, decoder: :class:`klvae.modules.model.Encoder` / ``Decoder``.
        quant_conv: 1×1 conv (2·z_channels → 2·embed_dim), or ``nn.Identity`` without it (SD3/FLUX.1): an
            absent conv has no parameters, so the state dict simply lacks ``quant_conv.*``.
        post_quant_conv: 1×1 conv (embed_dim → z_channels), or ``nn.Identity``.
        bn: FLUX.2's :class:`~klvae.modules.latent_norm.LatentBatchNorm` when ``network.latent_batch_norm``
            is set, else None. Not on the reconstruction path (``encode``/``decode`` are the raw latent, as in
            training); ``bn.normalize``/``bn.denormalize`` map to and from the transformer's latents. Always in
            eval mode, so a decoder fine-tune cannot move the statistics the transformer was trained on.
    """

    # The modules that make up the network (EMA, export and warm start work on exactly these; bn when present).
    CODEC_MODULES = ("encoder", "quant_conv", "post_quant_conv", "decoder", "bn")

    def __init__(self, network: NetworkConfig | None = None) -> None:
        super().__init__()
        self.network = network if network is not None else NetworkConfig()
        z, e = self.network.z_channels, self.network.embed_dim
        self.encoder = Encoder(**self.network.network_kwargs())
        self.decoder = Decoder(**self.network.network_kwargs())
        # The one place the quant convs are decided.
        self.quant_conv = nn.Conv2d(2 * z, 2 * e, 1) if self.network.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(e, z, 1) if self.network.use_post_quant_conv else nn.Identity()
        norm = self.network.latent_batch_norm
        self.bn = LatentBatchNorm(e, norm) if norm is not None else None

    @classmethod
    def from_ddconfig(
        cls,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ) -> KLAutoencoder:
        """Build from LDM's keys: ``ddconfig`` (``ch``, ``ch_mult``, ``z_channels`` ...) and ``embed_dim``."""
        return cls(NetworkConfig.from_params(ddconfig, embed_dim, use_quant_conv, use_post_quant_conv))

    def codec_modules(self) -> dict[str, nn.Module]:
        """The network's modules by name (no loss, no EMA copy; no ``bn`` without a latent BatchNorm)."""
        modules = {name: getattr(self, name) for name in self.CODEC_MODULES}
        return {name: module for name, module in modules.items() if module is not None}

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
