"""The reference point of the benchmarks: diffusers' ``AutoencoderKL`` with the same config and loss.

Its training steps are plain PyTorch, the way diffusers' own trainer
(``examples/research_projects/autoencoderkl/train_autoencoderkl.py``) writes them:

* pre-GAN (:func:`diffusers_train_step`): encode, sample, decode, L2 + ``p_weight``·LPIPS summed over C·H·W
  per sample, + ``kl_weight``·KL, backward, Adam -- klvae's pre-``disc_start`` objective with the default
  recipe's settings, so both implementations do the same arithmetic.
* GAN phase (:func:`diffusers_gan_step`): the example's alternation -- even iterations update the
  autoencoder with LDM's adaptive weight λ = ‖∇nll‖ / (‖∇g‖ + 1e-4) taken by two
  ``autograd.grad(..., decoder.conv_out.weight, retain_graph=True)`` calls, odd iterations update the
  discriminator (klvae's PatchGAN, so both sides train the same network) with the hinge loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.measure import autocast_context
from klvae.interop.configs import diffusers_config
from klvae.modules.config import NetworkConfig
from klvae.perf.apply import make_adam

__all__ = [
    "build_diffusers_vae",
    "compile_diffusers_vae",
    "diffusers_available",
    "diffusers_codec_fns",
    "diffusers_gan_step",
    "diffusers_train_step",
]


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


def compile_diffusers_vae(vae: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` the encoder and decoder in place (what a diffusers user adds for speed)."""
    vae.encoder.compile(backend=backend)
    vae.decoder.compile(backend=backend)


@contextmanager
def retained_graphs_allowed() -> Iterator[None]:
    """Compile with AOT autograd's donated buffers off while inside.

    A compiled region's backward may free ("donate") its saved buffers; a later
    ``autograd.grad(..., retain_graph=True)`` through that graph then fails (seen with inductor when an
    earlier backward of the graph did not retain it). The GAN step's λ needs ``retain_graph``, so a
    diffusers user compiling this step turns donation off (it costs some memory).
    """
    import torch._functorch.config as functorch_config

    with functorch_config.patch(donated_buffer=False):
        yield


def _reconstruct(vae: nn.Module, images: torch.Tensor, precision: str):
    with autocast_context(images.device, precision):
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
    return posterior, recon


def _nll(
    lpips_model: nn.Module, images: torch.Tensor, recon: torch.Tensor, precision: str, p_weight: float
) -> torch.Tensor:
    """L2 + ``p_weight``·LPIPS, summed over C·H·W per sample, mean over the batch."""
    with autocast_context(images.device, precision):
        p_loss = lpips_model(images, recon).float()  # (B, 1, 1, 1)
    rec = (recon.float() - images) ** 2
    return (rec + p_weight * p_loss).sum() / images.shape[0]


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
        posterior, recon = _reconstruct(vae, images, precision)
        nll = _nll(lpips_model, images, recon, precision, perceptual_weight)
        loss = nll + kl_weight * posterior.kl().float().sum() / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def diffusers_gan_step(
    vae: nn.Module,
    discriminator: nn.Module,
    lpips_model: nn.Module,
    images: torch.Tensor,
    precision: str,
    fused_adam: bool,
    kl_weight: float = 1e-6,
    perceptual_weight: float = 0.5,
    disc_weight: float = 1.0,
    lr: float = 4.5e-6,
) -> Callable[[], torch.Tensor]:
    """A closure running one GAN-phase iteration, alternating autoencoder / discriminator updates.

    As diffusers' example trainer does it: every iteration encodes and decodes with autograd on; the
    autoencoder iteration takes λ from two ``retain_graph`` gradients at ``decoder.conv_out.weight`` and
    backpropagates g through the (unfrozen) discriminator. Where the example differs from the objective it
    names, the objective is kept, so both implementations do the same work: LPIPS keeps its gradient
    (the example computes it under ``no_grad``), and the discriminator iteration has a backward and an
    optimizer step on the detached reconstruction (the example's computes the loss only).
    """
    opt_ae = make_adam(vae.parameters(), lr, (0.5, 0.9), fused_adam)
    opt_d = make_adam(discriminator.parameters(), lr, (0.5, 0.9), fused_adam)
    last_layer = vae.decoder.conv_out.weight
    batch, iteration = images.shape[0], 0

    def autoencoder_update() -> torch.Tensor:
        posterior, recon = _reconstruct(vae, images, precision)
        nll = _nll(lpips_model, images, recon, precision, perceptual_weight)
        with autocast_context(images.device, precision):
            g_loss = -discriminator(recon).float().mean()
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
        loss = nll + kl_weight * posterior.kl().float().sum() / batch + weight * g_loss
        loss.backward()
        opt_ae.step()
        opt_ae.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # g's backward also filled the discriminator's gradients
        return loss.detach()

    def discriminator_update() -> torch.Tensor:
        _, recon = _reconstruct(vae, images, precision)
        with autocast_context(images.device, precision):
            logits_real = discriminator(images).float()
            logits_fake = discriminator(recon.detach()).float()
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())  # hinge
        loss.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return loss.detach()

    def step() -> torch.Tensor:
        nonlocal iteration
        update = autoencoder_update if iteration % 2 == 0 else discriminator_update
        iteration += 1
        return update()

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
