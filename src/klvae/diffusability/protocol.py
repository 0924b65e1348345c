"""The fixed protocol of ``klvae-diffusability``: model size, optimisation, validation and sampling, by preset.

Two runs are comparable when their protocols are equal; the report JSON records the whole protocol.
Sizes follow DiT (Peebles & Xie 2023, arXiv:2212.09748): DiT-S = 12 layers, 6 heads × 64, DiT-B = 12 layers,
12 heads × 64, patch 2. Optimisation follows the DiT recipe EQ-VAE uses for its gFID tables (github.com/
zelaki/eqvae ``train_gen/train.py``: AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999), with
rectified-flow training as LightningDiT does (github.com/hustvl/LightningDiT ``configs``: linear path,
velocity prediction, logit-normal timesteps, Euler sampling). See docs/diffusability.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from klvae.errors import ConfigError

__all__ = ["PRESETS", "DiTProtocol", "protocol_for"]


@dataclass(frozen=True)
class DiTProtocol:
    """Everything that decides a diffusability score, except the latents.

    Attributes:
        preset: the preset's name.
        num_layers, num_attention_heads, attention_head_dim, patch_size: ``DiTTransformer2DModel`` size.
        steps: optimizer steps.
        batch_size: latents per step (one process).
        lr: AdamW learning rate (constant after ``warmup_steps`` of linear warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length.
        grad_clip: gradient-norm clip (0: off).
        ema_decay: EMA of the weights used for sampling.
        latent_norm: ``global``/``channel``/``none`` (``klvae.data.latent_shards.LATENT_NORMS``).
        val_fraction: share of latent keys held out for the validation loss.
        val_max_latents: at most this many held-out latents in the validation loss.
        val_every: validation-loss cadence in steps.
        val_sigmas: the fixed noise levels σ (x_σ = (1-σ)·x + σ·ε) of the validation loss.
        checkpoint_every: checkpoint cadence in steps (resume).
        sampler_steps: Euler steps (``FlowMatchEulerDiscreteScheduler``).
        num_samples: generated images scored.
        seed: training, validation noise and sampling seed.
    """

    preset: str
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    ema_decay: float
    latent_norm: str
    val_fraction: float
    val_max_latents: int
    val_every: int
    val_sigmas: tuple[float, ...]
    checkpoint_every: int
    sampler_steps: int
    num_samples: int
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "val_sigmas": list(self.val_sigmas),
                "model": "diffusers.DiTTransformer2DModel", "objective": "rectified flow, velocity (eps - x)",
                "timestep_sampling": "logit-normal(0, 1)", "sampler": "FlowMatchEulerDiscreteScheduler (Euler)",
                "guidance": "none"}  # fmt: skip


_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)

PRESETS: dict[str, DiTProtocol] = {
    # CPU minutes on 64² images (8×8×4 latents): a 4-layer, width-128 DiT.
    "smoke": DiTProtocol(
        "smoke",
        4,
        4,
        32,
        2,
        steps=600,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=50,
        grad_clip=1.0,
        ema_decay=0.99,
        latent_norm="global",
        val_fraction=0.1,
        val_max_latents=256,
        val_every=50,
        val_sigmas=_SIGMAS,
        checkpoint_every=200,
        sampler_steps=25,
        num_samples=128,
    ),  # fmt: skip
    # DiT-S/2 on one GPU (256²: 32×32×4 latents, 256 tokens).
    "small": DiTProtocol(
        "small",
        12,
        6,
        64,
        2,
        steps=100_000,
        batch_size=256,
        lr=1e-4,
        weight_decay=0.0,
        warmup_steps=1000,
        grad_clip=1.0,
        ema_decay=0.9999,
        latent_norm="global",
        val_fraction=0.01,
        val_max_latents=2048,
        val_every=2500,
        val_sigmas=_SIGMAS,
        checkpoint_every=5000,
        sampler_steps=50,
        num_samples=10_000,
    ),  # fmt: skip
    # DiT-B/2, EQ-VAE's 400K-step budget.
    "base": DiTProtocol(
        "base",
        12,
        12,
        64,
        2,
        steps=400_000,
        batch_size=256,
        lr=1e-4,
        weight_decay=0.0,
        warmup_steps=1000,
        grad_clip=1.0,
        ema_decay=0.9999,
        latent_norm="global",
        val_fraction=0.01,
        val_max_latents=4096,
        val_every=10_000,
        val_sigmas=_SIGMAS,
        checkpoint_every=10_000,
        sampler_steps=250,
        num_samples=50_000,
    ),  # fmt: skip
}


def protocol_for(preset: str, **overrides: Any) -> DiTProtocol:
    """A preset with some fields replaced (None values are ignored).

    Raises:
        ConfigError: unknown preset or field, or a value out of range.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(DiTProtocol)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown protocol field(s) {unknown}; fields: {sorted(fields)}")
    protocol = dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    for name in ("steps", "batch_size", "val_every", "checkpoint_every", "sampler_steps", "num_samples"):
        if getattr(protocol, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(protocol, name)}")
    if not 0.0 <= protocol.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {protocol.val_fraction}")
    return protocol
