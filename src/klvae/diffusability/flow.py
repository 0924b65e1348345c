"""Rectified flow on latents with diffusers' DiT and Euler scheduler: the model, the loss, the sampler.

Convention (SD3's, which ``FlowMatchEulerDiscreteScheduler`` implements): ``x_σ = (1 - σ)·x + σ·ε`` with
σ ∈ [0, 1] (σ = 1 pure noise), the network predicts the velocity ``ε - x`` and sees the timestep
``1000·σ``. Training draws σ from a logit-normal(0, 1) (SD3, LightningDiT's ``use_lognorm``); sampling
integrates from σ = 1 to 0 with the scheduler's Euler steps.

Unconditional models use DiT's label embedding with one "class" and always feed the null label (the
embedding row reserved for classifier-free guidance), so the same diffusers class serves both cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from klvae.diffusability.protocol import DiTProtocol

__all__ = ["build_dit", "flow_loss", "null_labels", "sample_latents", "validation_loss"]

TIMESTEP_SCALE = (
    1000.0  # the DiT's timestep embedding sees 1000·σ (FlowMatchEulerDiscreteScheduler's timesteps)
)


def _require_diffusers():  # noqa: ANN202
    try:
        import diffusers
    except ImportError as e:
        from klvae.errors import ConfigError

        raise ConfigError("klvae-diffusability needs diffusers: pip install 'klvae[diffusability]'") from e
    return diffusers


def build_dit(protocol: DiTProtocol, latent_shape: Sequence[int], num_classes: int | None) -> nn.Module:
    """``diffusers.DiTTransformer2DModel`` for latents (C, h, w) with h = w; velocity out (C channels).

    Args:
        num_classes: None for an unconditional model.
    """
    channels, height, width = latent_shape
    if height != width or height % protocol.patch_size:
        from klvae.errors import ConfigError

        raise ConfigError(
            f"the DiT needs square latents divisible by patch {protocol.patch_size}, got {height}×{width}"
        )
    diffusers = _require_diffusers()
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=protocol.num_attention_heads,
        attention_head_dim=protocol.attention_head_dim,
        in_channels=channels,
        out_channels=channels,  # velocity only (DiT's learned-sigma half is a DDPM thing)
        num_layers=protocol.num_layers,
        sample_size=height,
        patch_size=protocol.patch_size,
        num_embeds_ada_norm=num_classes or 1,
    )


def null_labels(model: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    """The null label (index ``num_classes``) for every sample: the unconditional input."""
    table = model.transformer_blocks[0].norm1.emb.class_embedder
    return torch.full((batch,), table.num_classes, dtype=torch.long, device=device)


def velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v(x_σ, σ) (B, C, h, w); ``sigma`` (B,) in [0, 1]."""
    return model(x, timestep=sigma * TIMESTEP_SCALE, class_labels=labels).sample


def flow_loss(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Rectified-flow loss ``E ‖v(x_σ, σ) - (ε - x)‖²`` with σ ~ logit-normal(0, 1), for latents x (B, C, h, w)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    sigma = torch.sigmoid(torch.randn(x.shape[0], generator=generator, device=x.device))  # (B,)
    s = sigma.view(-1, 1, 1, 1).to(x.dtype)
    pred = velocity(model, (1 - s) * x + s * noise, sigma, labels)
    return (pred.float() - (noise - x).float()).pow(2).mean()


@torch.no_grad()
def validation_loss(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, sigmas: Sequence[float],
    batch_size: int,
) -> dict[float, float]:  # fmt: skip
    """The flow-matching loss at fixed σ with fixed noise, per σ: deterministic, so curves are comparable.

    Args:
        x: held-out latents (N, C, h, w); labels (N,); noise (N, C, h, w), drawn once.
    """
    losses = {}
    for sigma in sigmas:
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            xb, nb, lb = x[i : i + batch_size], noise[i : i + batch_size], labels[i : i + batch_size]
            s = torch.full((xb.shape[0],), sigma, device=xb.device)
            pred = velocity(model, (1 - sigma) * xb + sigma * nb, s, lb)
            total += (pred.float() - (nb - xb).float()).pow(2).mean(dim=(1, 2, 3)).sum().item()
        losses[float(sigma)] = total / x.shape[0]
    return losses


@torch.no_grad()
def sample_latents(
    model: nn.Module, num: int, latent_shape: Sequence[int], labels: torch.Tensor, steps: int,
    generator: torch.Generator, batch_size: int, device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Generate ``num`` normalised latents (num, C, h, w) by Euler integration from σ = 1 to 0, on CPU."""
    diffusers = _require_diffusers()
    out = []
    for i in range(0, num, batch_size):
        n = min(batch_size, num - i)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(steps, device=device)
        x = torch.randn((n, *latent_shape), generator=generator, device=generator.device).to(device)
        lb = labels[i : i + n].to(device)
        for t in scheduler.timesteps:
            v = model(x, timestep=t.expand(n), class_labels=lb).sample
            x = scheduler.step(v.float(), t, x).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out)
