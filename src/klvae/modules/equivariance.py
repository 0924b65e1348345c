"""EQ-VAE's scale/rotation transforms and the per-batch branch choice, as pure functions (no Lightning).

EQ-VAE (Kouzelis et al., "EQ-VAE: Equivariance Regularized Latent Space for Improved Generative Image
Modeling", ICML 2025, arXiv:2502.09509; code: github.com/zelaki/eqvae, ``train_eqvae/ldm/models/
autoencoder.py``) fine-tunes a VAE so that decoding a transformed latent gives the transformed image:
the loss is the usual objective on (τ(x), D(τ(z))). What the reference code does, and this module does:

* τ acts on the posterior **sample** z (not the mean), after the encoder has seen the untransformed x;
  the KL term stays that of the untransformed posterior.
* τ = a **downscale, then** a **rotation**, both every time: a scale s drawn uniformly from
  {8/32, 9/32, ..., 31/32} (bilinear, ``align_corners=False``; ``anisotropic``: independent s for the
  height and the width) and k drawn uniformly from {1, 2, 3} quarter turns, ``torch.rot90(k, dims=(-1,
  -2))`` (clockwise). The image gets the same bilinear resize, to f× the latent's new size, and the same
  rotation. Both resizes are given the output size (floor(side · s), as ``scale_factor`` would give), so
  image and latent grids stay aligned for any side; whenever side · s is an integer (every scale at
  256² / 32²) this is bit-identical to the reference's ``F.interpolate(scale_factor=s)``.
* With probability ``p`` a batch takes that **equivariance** branch; otherwise, with probability
  ``p_small``, the **low-resolution prior-preservation** branch (the input image is downscaled by an
  isotropic s from the same set, and reconstructed as usual); otherwise the normal step. The reference
  calls ``p`` ``p_prior`` and ``p_small`` ``p_prior_s`` (values 0.5 and 0.25 in its paper config).

Differences from the reference, on purpose: draws come from a ``torch.Generator`` seeded by (seed, batch
index), so runs and resumes are reproducible and every DDP rank takes the same branch (same shapes in
each collective); and one draw serves a whole batch, so in the ``every_batch`` schedule the discriminator
update sees the same transformed pair as the autoencoder update (the reference, with Lightning 1's two
``training_step`` calls per batch, drew twice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BRANCHES",
    "EQUIVARIANCE_SCALES",
    "Branch",
    "EquivarianceSchedule",
    "Transform",
    "resize_image_to_latent_grid",
]

# The reference's scale set: s / 32 for s in 8..31 (never 1, so the equivariance branch always resizes).
EQUIVARIANCE_SCALES: tuple[float, ...] = tuple(s / 32 for s in range(8, 32))
QUARTER_TURNS: tuple[int, ...] = (1, 2, 3)
BRANCHES = ("normal", "equivariance", "prior_small")


def _scaled(side: int, scale: float) -> int:
    # F.interpolate(scale_factor=s) makes floor(side · s) samples.
    return math.floor(side * scale)


@dataclass(frozen=True)
class Transform:
    """τ: a bilinear resize by ``scale`` = (s_h, s_w), then ``quarter_turns`` clockwise quarter turns.

    ``Transform()`` is the identity.
    """

    scale: tuple[float, float] = (1.0, 1.0)
    quarter_turns: int = 0

    def __post_init__(self) -> None:
        if not all(0 < s <= 1 for s in self.scale):
            raise ValueError(f"scale factors must be in (0, 1], got {self.scale}")
        if self.quarter_turns not in (0, 1, 2, 3):
            raise ValueError(f"quarter_turns must be 0..3, got {self.quarter_turns}")

    @property
    def is_identity(self) -> bool:
        return self.scale == (1.0, 1.0) and self.quarter_turns == 0

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        """Size of τ(z) for z of size (h, w), before the rotation."""
        return _scaled(h, self.scale[0]), _scaled(w, self.scale[1])

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.rot90(t, self.quarter_turns, dims=(-1, -2)) if self.quarter_turns else t

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """τ(z) for latents (B, C, h, w) → (B, C, h', w') (h', w' swapped for odd quarter turns)."""
        if self.scale != (1.0, 1.0):
            z = resize_image_to_latent_grid(z, self.latent_size(*z.shape[-2:]), 1)
        return self._rotate(z)

    def image(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """τ(x) for images (B, 3, f·h, f·w) whose latents are (h, w): resized to f× τ(z)'s size, rotated."""
        if self.scale != (1.0, 1.0):
            h, w = x.shape[-2] // factor, x.shape[-1] // factor
            x = resize_image_to_latent_grid(x, self.latent_size(h, w), factor)
        return self._rotate(x)


def resize_image_to_latent_grid(x: torch.Tensor, latent_hw: tuple[int, int], factor: int) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of (B, C, H, W) to (f·h, f·w): a size the codec maps onto
    an (h, w) latent exactly (``factor`` 1 for latents themselves)."""
    if min(latent_hw) < 1:
        raise ValueError(
            f"image {tuple(x.shape[-2:])} downscaled to a latent of {latent_hw}: use larger images "
            "(at least 4·f pixels a side for the smallest scale 8/32)"
        )
    size = (factor * latent_hw[0], factor * latent_hw[1])
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Branch:
    """What one batch does: ``normal``; ``equivariance`` (train on τ(x) vs D(τ(z))); ``prior_small``
    (encode and reconstruct x downscaled by ``input_scale``)."""

    name: str = "normal"
    transform: Transform = Transform()
    input_scale: float = 1.0

    @property
    def index(self) -> int:
        """Position in :data:`BRANCHES` (0 normal, 1 equivariance, 2 prior_small), for logging."""
        return BRANCHES.index(self.name)

    def encoder_input(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """What the encoder sees: x, or for ``prior_small`` x downscaled (to a multiple of f)."""
        if self.name != "prior_small":
            return x
        h, w = x.shape[-2] // factor, x.shape[-1] // factor
        return resize_image_to_latent_grid(
            x, (_scaled(h, self.input_scale), _scaled(w, self.input_scale)), factor
        )

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder sees: τ(z) in the equivariance branch, else z."""
        return self.transform.latent(z) if self.name == "equivariance" else z

    def target(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """The image the reconstruction is compared with (and the discriminator's real input)."""
        return self.transform.image(x, factor) if self.name == "equivariance" else x


class EquivarianceSchedule:
    """Draws the branch of each training batch, reproducibly from (``seed``, batch index).

    Args:
        p: probability of the equivariance branch (EQ-VAE's ``p_prior``, 0.5 in the paper).
        p_small: probability, given no equivariance branch, of low-resolution prior preservation
            (``p_prior_s``, 0.25 in the paper).
        anisotropic: independent height and width scales in the equivariance branch.
        seed: seed of the draws; the same on every DDP rank, so all ranks take the same branch.
    """

    def __init__(self, p: float, p_small: float = 0.0, anisotropic: bool = False, seed: int = 0) -> None:
        for name, value in (("p", p), ("p_small", p_small)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"equivariance.{name} must be a probability in [0, 1], got {value!r}")
        self.p, self.p_small = float(p), float(p_small)
        self.anisotropic, self.seed = bool(anisotropic), int(seed)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EquivarianceSchedule:
        """From the model's ``equivariance`` mapping; an unknown key is a ``ValueError`` naming it."""
        unknown = sorted(set(config) - {"p", "p_small", "anisotropic", "seed"})
        if unknown:
            raise ValueError(
                f"model.params.equivariance has unknown keys {unknown}; allowed: p, p_small, anisotropic, seed"
            )
        if "p" not in config:
            raise ValueError("model.params.equivariance needs p (EQ-VAE uses 0.5), or set equivariance: null")
        return cls(**config)

    def draw(self, batch_index: int) -> Branch:
        """The branch of training batch ``batch_index`` (CPU draws: no device work, no host sync)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)

        def uniform() -> float:
            return float(torch.rand((), generator=g))

        def choice(options: tuple) -> object:
            return options[int(torch.randint(len(options), (), generator=g))]

        if uniform() < self.p:
            s_h = choice(EQUIVARIANCE_SCALES)
            s_w = choice(EQUIVARIANCE_SCALES) if self.anisotropic else s_h
            return Branch("equivariance", Transform((s_h, s_w), choice(QUARTER_TURNS)))
        if uniform() < self.p_small:
            return Branch("prior_small", input_scale=choice(EQUIVARIANCE_SCALES))
        return Branch()
