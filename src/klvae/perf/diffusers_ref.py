"""The reference point of the benchmarks: diffusers' ``AutoencoderKL`` with the same config and loss.

Its training step is plain PyTorch -- encode, sample, decode, L2 + ``p_weight``·LPIPS summed over C·H·W per
sample, + ``kl_weight``·KL, backward, Adam -- i.e. klvae's pre-``disc_start`` objective with the default recipe's
settings, so both implementations do the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from klvae.perf.apply import make_adam
from klvae.perf.bench import autocast_context

__all__ = ["build_diffusers_vae", "diffusers_available", "diffusers_codec_fns", "diffusers_train_step"]


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def build_diffusers_vae(ddconfig: Mapping[str, Any], embed_dim: int) -> nn.Module:
    """diffusers ``AutoencoderKL`` with the network shape of an LDM ``ddconfig`` (random weights)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    if ddconfig.get("attn_resolutions"):
        raise ValueError("diffusers' AutoencoderKL has no attention inside levels; use attn_resolutions: []")
    if ddconfig["z_channels"] != embed_dim:
        raise ValueError(
            f"diffusers ties z_channels and embed_dim; got {ddconfig['z_channels']} and {embed_dim}"
        )
    levels = len(ddconfig["ch_mult"])
    return DiffusersAutoencoderKL(
        in_channels=ddconfig["in_channels"],
        out_channels=ddconfig["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
        layers_per_block=ddconfig["num_res_blocks"],
        latent_channels=embed_dim,
        norm_num_groups=ddconfig.get("norm_num_groups", 32),
        sample_size=ddconfig["resolution"],
    )


def diffusers_train_step(
    vae: nn.Module,
    lpips_model: nn.Module,
    images: torch.Tensor,
    precision: str,
    fused_adam: bool,
    kl_weight: float = 1e-6,
    perceptual_weight: float = 0.5,
    lr: float = 4.5e-6,
) -> Callable[[], torch.Tensor]:
    """A closure running one optimisation step of ``vae`` on ``images`` (B, 3, H, W); returns the loss."""
    opt = make_adam(vae.parameters(), lr, (0.5, 0.9), fused_adam)
    batch = images.shape[0]

    def step() -> torch.Tensor:
        with autocast_context(images.device, precision):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
            p_loss = lpips_model(images, recon).float()  # (B, 1, 1, 1)
        rec = (recon.float() - images) ** 2
        nll = (rec + perceptual_weight * p_loss).sum() / batch  # per-sample sum over C·H·W, batch mean
        loss = nll + kl_weight * posterior.kl().float().sum() / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def diffusers_codec_fns(
    vae: nn.Module, images: torch.Tensor, latents: torch.Tensor, precision: str
) -> dict[str, Callable[[], torch.Tensor]]:
    """Inference closures ``encode`` (images → posterior mode) and ``decode`` (latents → images)."""

    @torch.inference_mode()
    def encode() -> torch.Tensor:
        with autocast_context(images.device, precision):
            return vae.encode(images).latent_dist.mode()

    @torch.inference_mode()
    def decode() -> torch.Tensor:
        with autocast_context(latents.device, precision):
            return vae.decode(latents).sample

    return {"encode": encode, "decode": decode}
