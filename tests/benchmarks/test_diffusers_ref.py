"""benchmarks/diffusers_ref.py: diffusers' GAN-phase step alternates updates and uses LDM's adaptive weight."""

from __future__ import annotations

import pytest
import torch

from benchmarks.diffusers_ref import build_diffusers_vae, diffusers_gan_step, diffusers_train_step
from klvae.modules.config import NetworkConfig
from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.perceptual import load_lpips

pytest.importorskip("diffusers")


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_gan_step_alternates_autoencoder_and_discriminator_updates(tiny_ddconfig):
    vae = build_diffusers_vae(NetworkConfig.from_params(tiny_ddconfig, 4))
    disc = NLayerDiscriminator(3, 8, 2, False)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    step = diffusers_gan_step(vae, disc, load_lpips("random"), images, "fp32", fused_adam=False, lr=1e-3)
    for update in ("autoencoder", "discriminator", "autoencoder"):
        vae_before, disc_before = _snapshot(vae), _snapshot(disc)
        loss = step()
        assert torch.isfinite(loss)
        assert _changed(vae, vae_before) == (update == "autoencoder")
        assert _changed(disc, disc_before) == (update == "discriminator")
        assert all(p.grad is None for p in [*vae.parameters(), *disc.parameters()])  # nothing left over


def test_pre_gan_step_is_klvae_objective_value(tiny_ddconfig):
    # L2 summed over C·H·W + 0.5·LPIPS broadcast to every pixel, batch mean, + 1e-6·KL: with a zero LPIPS
    # weight and zero KL weight the loss is the per-sample squared error sum of the reconstruction.
    torch.manual_seed(0)
    vae = build_diffusers_vae(NetworkConfig.from_params(tiny_ddconfig, 4))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    step = diffusers_train_step(vae, load_lpips("random"), images, "fp32", False, 0.0, 0.0, lr=0.0)
    torch.manual_seed(1)
    loss = step()
    torch.manual_seed(1)
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.sample()).sample
    torch.testing.assert_close(loss, ((recon - images) ** 2).sum() / 2)
