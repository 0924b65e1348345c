"""Named terms of the autoencoder objective: each is one weighted entry of the sum the objective assembles.

Two kinds (:attr:`LossTerm.kind`):

``image``  compares the reconstruction x̂ with the target image and returns a per-element map that
           broadcasts to (B, C, H, W) (pixel loss (B, C, H, W), LPIPS (B, 1, 1, 1)). The objective sums the
           weighted maps into LDM's reconstruction NLL (÷ exp(logvar) + logvar, then the reduction), which is
           what the adaptive GAN weight balances the adversarial term against.
``latent`` looks at the posterior or the latents and returns a scalar (KL, VA-VAE's VF loss), added as
           weight · value. An ``adaptive`` latent term's weight is multiplied, every update, by the ratio of
           the reconstruction's and the term's gradient norms at the encoder's last layer (VA-VAE).

A new term is a subclass plus one ``lossconfig.params.terms`` entry
(``{name: {target: my.Term, params: {weight: ...}}}``); see ARCHITECTURE.md, "Extending".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.perceptual import lpips_distance

__all__ = ["PIXEL_LOSSES", "KLTerm", "LossTerm", "PerceptualTerm", "PixelTerm", "TermInputs"]

# Per-element reconstruction losses of x̂ − x (B, C, H, W), by ``pixel_loss`` name: LDM's l1, and the l2 of
# sd-vae-ft-mse. A new one is one entry here.
PIXEL_LOSSES = {"l1": torch.abs, "l2": torch.square}


@dataclass
class TermInputs:
    """What one autoencoder forward pass offers the terms.

    Attributes:
        images: (B, 3, H, W) fp32, what the reconstruction is compared with (EQ-VAE: the transformed image).
        reconstructions: x̂ (B, 3, H, W) fp32; gradients flow into it.
        posterior: q(z | x), over (B, C, h, w).
        latents: the posterior sample z (B, C, h, w) the decoder was given (before EQ-VAE's transform);
            None in evaluation-only calls that have none.
        encoder_images: the encoder's input (B, 3, H', W') (EQ-VAE's low-resolution branch downscales it).
    """

    images: torch.Tensor
    reconstructions: torch.Tensor
    posterior: DiagonalGaussianDistribution
    latents: torch.Tensor | None = None
    encoder_images: torch.Tensor | None = None


class LossTerm(nn.Module):
    """One weighted term of the autoencoder objective (see the module docstring).

    Args:
        weight: the term's weight in the sum (>= 0).
        adaptive: (latent terms) multiply ``weight``, every update, by the ratio of the reconstruction's
            and this term's gradient norms at the encoder's last layer, clamped to ``max_adaptive_weight``
            (VA-VAE). The weight the last update used is the buffer ``adaptive_weight`` (in the checkpoint).

    Attributes:
        kind: ``"image"`` or ``"latent"``.
        needs_encoder: the term trains the encoder (decoder-only training with it is a config error).
        max_adaptive_weight: the clamp of the adaptive ratio.
    """

    kind: ClassVar[str] = "latent"
    needs_encoder: ClassVar[bool] = False
    max_adaptive_weight: ClassVar[float] = 1e8

    def __init__(self, weight: float = 1.0, adaptive: bool = False) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be a number >= 0, got {weight!r}")
        if adaptive and self.kind != "latent":
            raise ValueError(f"{type(self).__name__}: only latent terms can have an adaptive weight")
        self.weight = float(weight)
        self.adaptive = bool(adaptive)
        if self.adaptive:
            self.register_buffer("adaptive_weight", torch.full((), self.weight))

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        raise NotImplementedError

    def components(self) -> dict[str, torch.Tensor]:
        """Extra values of the last forward to log beside the term (e.g. the VF loss's two margins)."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the autoencoder's optimizer trains (e.g. a projection); frozen networks excluded."""
        return [p for p in self.parameters() if p.requires_grad]

    def compile_regions(self) -> dict[str, nn.Module]:
        """Frozen networks inside the term worth compiling as regions (e.g. a VF backbone), by name."""
        return {}


class PixelTerm(LossTerm):
    """Per-element pixel loss of x̂ − x: ``"l1"`` (LDM) or ``"l2"`` (sd-vae-ft-mse); (B, C, H, W)."""

    kind = "image"

    def __init__(self, loss: str = "l1", weight: float = 1.0) -> None:
        super().__init__(weight)
        if loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {loss!r}")
        self.loss = loss

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return PIXEL_LOSSES[self.loss](inputs.reconstructions - inputs.images)


class PerceptualTerm(LossTerm):
    """VGG-LPIPS distance per image, (B, 1, 1, 1), broadcast to every pixel by the objective (as LDM).

    Args:
        lpips_model: a frozen ``lpips.LPIPS``. It is *held*, not registered: it stays where LDM's state
            dict has it (``loss.perceptual_loss.*``, registered by the objective).
        weight: the perceptual weight.
        target_no_grad: the input image's features under ``no_grad`` (same value and gradients).
    """

    kind = "image"

    def __init__(self, lpips_model: nn.Module, weight: float = 1.0, target_no_grad: bool = False) -> None:
        super().__init__(weight)
        self._lpips = (lpips_model,)  # a tuple: not a submodule, so no second copy of its keys
        self.target_no_grad = target_no_grad

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        # LPIPS runs under whatever autocast is active; the distance is accumulated in fp32.
        x, x_hat = inputs.images.contiguous(), inputs.reconstructions.contiguous()
        return lpips_distance(self._lpips[0], x, x_hat, self.target_no_grad).float()


class KLTerm(LossTerm):
    """mean over the batch of KL(q(z|x) || N(0, I)), summed over the latent's elements (LDM)."""

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        posterior = inputs.posterior
        return posterior.kl().float().sum() / posterior.mean.shape[0]
