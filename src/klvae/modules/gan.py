"""The adversarial pieces: discriminator losses, the generator's adversarial term, LeCam and R1.

Logits are whatever the discriminator returns (PatchGAN: (B, 1, h, w); the DINO-feature discriminator:
(B, N)); every loss averages over all of them.

- ``hinge`` and ``vanilla``: taming/LDM's D losses, 0.5·(relu(1 − D(x)) + relu(1 + D(x̂))) and
  0.5·(softplus(−D(x)) + softplus(D(x̂))); the generator term is LDM's −mean D(x̂) with both.
- ``non_saturating``: StyleGAN2's (Karras et al. 2020) softplus(−D(x)) + softplus(D(x̂)) for D and the
  non-saturating softplus(−D(x̂)) for the generator.
- LeCam (Yu et al. 2021, arXiv:2104.03310, google/lecam-gan): E[relu(D(x) − α_fake)²] + E[relu(α_real −
  D(x̂))²] with α EMAs of the mean real and fake logits (decay 0.99).
- R1 (Mescheder et al. 2018; StyleGAN2's lazy form): γ/2 · E‖∇_x D(x)‖² on real images, computed every
  ``interval`` discriminator updates and multiplied by ``interval`` so its average strength is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "D_LOSSES",
    "GENERATOR_ADVERSARIAL",
    "LeCam",
    "adopt_weight",
    "hinge_d_loss",
    "non_saturating_d_loss",
    "r1_penalty",
    "vanilla_d_loss",
]


def adopt_weight(weight: float, iteration: int, threshold: int) -> float:
    """``weight`` once ``iteration`` has reached ``threshold``, else 0 (the GAN warm-up switch)."""
    return weight if iteration >= threshold else 0.0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def _negative_mean(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def _softplus_negative(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()


# disc_loss name → (discriminator loss of (real, fake) logits, generator term of fake logits).
D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non_saturating": non_saturating_d_loss,
}
GENERATOR_ADVERSARIAL: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": _negative_mean,
    "vanilla": _negative_mean,
    "non_saturating": _softplus_negative,
}


class LeCam(nn.Module):
    """LeCam regulariser with its EMA anchors (buffers ``ema_real``/``ema_fake``, in the checkpoint so a
    resume continues exactly). Under DDP the anchors follow the mean logits of all ranks (one small
    all-reduce per update), so every rank holds the same anchors, as rank 0's are what gets saved.

    Args:
        decay: EMA decay of the anchors (0.99 in google/lecam-gan).
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"lecam_decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Move the anchors toward this update's mean logits (device ops only)."""
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        # The first update starts the anchors at the logits (not at 0, which biases the early penalty).
        decay = torch.where(self.initialized, self.decay, 0.0)
        self.ema_real.lerp_(means[0], 1 - decay)
        self.ema_fake.lerp_(means[1], 1 - decay)
        self.initialized.fill_(True)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        fake = F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        return real + fake


def r1_penalty(logits_real: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """E_b ‖∇_x Σ D(x_b)‖², with ``images`` (B, 3, H, W) requiring grad and ``logits_real = D(images)``.

    ``create_graph=True``: the penalty is itself differentiated (double backward through D), which
    compiled regions do not support; the caller runs D eagerly for this forward.
    """
    (grad,) = torch.autograd.grad(logits_real.float().sum(), images, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean()
