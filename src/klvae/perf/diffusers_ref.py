"""The reference point of the benchmarks: diffusers' ``AutoencoderKL`` with the same config and loss.

Its training step is plain PyTorch -- encode, sample, decode, L2 + ``p_weight``·LPIPS summed over C·H·W per
sample, + ``kl_weight``·KL, backward, Adam -- i.e. klvae's pre-``disc_start`` objective with the default recipe's
settings, so both implementations do the same arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from klvae.interop.configs import diffusers_config
from klvae.modules.config import NetworkConfig
from klvae.perf.apply import make_adam
from klvae.perf.bench import autocast_context

__all__ = ["build_diffusers_vae", "diffusers_available", "diffusers_codec_fns", "diffusers_train_step"]


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def build_diffusers_vae(network: NetworkConfig) -> nn.Module:
    """diffusers ``AutoencoderKL`` with ``network``'s shape (random weights), from the exported config."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    config = diffusers_config(network, scaling_factor=1.0)  # raises for networks diffusers cannot express
    return DiffusersAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})


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
