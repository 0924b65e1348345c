"""LPIPSWithDiscriminator: reconstruction + perceptual + KL + adaptive-weight PatchGAN (spec §3).

Images are (B, 3, H, W) in [-1, 1]. Two entry points instead of LDM's ``optimizer_idx`` switch:
:meth:`LPIPSWithDiscriminator.generator_loss` for the autoencoder update and
:meth:`LPIPSWithDiscriminator.discriminator_loss` for the discriminator update.

Reduction (``reduction``):
    ``sum``  the published models (LDM, sgm, diffusers' script): pixel and perceptual terms summed over
             C·H·W per sample (LPIPS broadcast to every pixel), then averaged over the batch. The KL term at
             1e-6 is then negligible (~2·10⁵ × weaker than with ``mean`` at 256²).
    ``mean`` the seed's literal ``F.mse_loss``: a mean over all elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.perceptual import load_lpips
from klvae.perf.lpips import lpips_distance

__all__ = ["LPIPSWithDiscriminator", "adopt_weight", "hinge_d_loss", "vanilla_d_loss"]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, iteration: int, threshold: int) -> float:
    """``weight`` once ``iteration`` has reached ``threshold``, else 0 (the GAN warm-up switch)."""
    return weight if iteration >= threshold else 0.0


def _call_lpips(model: nn.Module, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    return model(inputs, reconstructions)


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class LPIPSWithDiscriminator(nn.Module):
    """The KL-f8 training objective.

    Args:
        disc_start: training iteration at which the adversarial terms switch on (50001 in every
            published recipe). Counted in training iterations, never in optimizer steps.
        logvar_init: initial value of LDM's scalar output log-variance (nll = rec/exp(logvar) + logvar).
        learn_logvar: put ``logvar`` in the autoencoder optimizer (sgm/SD2); off in LDM, so it stays put.
        kl_weight: weight of mean_b KL(q(z|x_b) || N(0, I)).
        pixel_loss: ``"l1"`` (LDM) or ``"l2"`` (the seed, sd-vae-ft-mse).
        pixelloss_weight: weight of the pixel term.
        perceptual_weight: weight of LPIPS (0 skips building it).
        perceptual_backbone: ``"imagenet"``, a weights file, or ``"random"`` (see :func:`load_lpips`).
        reduction: ``"sum"`` (per-sample sum over C·H·W, published) or ``"mean"`` (seed's literal snippet).
        disc_num_layers, disc_in_channels, disc_ndf, use_actnorm: the PatchGAN's shape.
        disc_factor: multiplier of both adversarial terms once active.
        disc_weight: multiplier of the adaptive generator weight λ.
        disc_loss: ``"hinge"`` or ``"vanilla"`` (non-saturating BCE).
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        kl_weight: float = 1e-6,
        pixel_loss: str = "l1",
        pixelloss_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_backbone: str = "imagenet",
        reduction: str = "sum",
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        use_actnorm: bool = False,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_loss: str = "hinge",
    ) -> None:
        super().__init__()
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"reduction must be 'sum' (published models) or 'mean' (seed snippet), got {reduction!r}"
            )
        if disc_loss not in _D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(_D_LOSSES)}, got {disc_loss!r}")
        if not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(
                f"disc_start must be a non-negative integer (training iterations), got {disc_start!r}"
            )
        for name, value in [
            ("kl_weight", kl_weight),
            ("pixelloss_weight", pixelloss_weight),
            ("perceptual_weight", perceptual_weight),
            ("disc_factor", disc_factor),
            ("disc_weight", disc_weight),
        ]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")

        self.disc_start = disc_start
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.reduction = reduction
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss_name = disc_loss
        self.disc_loss = _D_LOSSES[disc_loss]
        self.learn_logvar = learn_logvar
        # A Parameter either way so LDM checkpoints (which always hold loss.logvar) load strictly.
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init, requires_grad=learn_logvar)
        self.perceptual_loss = load_lpips(perceptual_backbone) if perceptual_weight > 0 else None
        # Set by AutoencoderKL from optimizations.lpips_target_no_grad: LPIPS assembled by hand with the
        # input's features under no_grad (klvae.perf.lpips); same value and gradients as lpips.LPIPS.
        self.lpips_target_no_grad = False
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)

    def train(self, mode: bool = True) -> LPIPSWithDiscriminator:
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # LPIPS is a fixed metric: no dropout, whatever Lightning asks for
        return self

    # ---------------------------------------------------------------- pieces
    def disc_factor_at(self, iteration: int) -> float:
        return adopt_weight(self.disc_factor, iteration, self.disc_start)

    def _reduce(self, per_element: torch.Tensor) -> torch.Tensor:
        if self.reduction == "sum":
            return per_element.sum() / per_element.shape[0]
        return per_element.mean()

    def nll_terms(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reduced nll, the pixel loss (B, C, H, W) and LPIPS (B, 1, 1, 1) (zeros if unused), in fp32."""
        x, x_hat = inputs.float(), reconstructions.float()
        diff = x_hat - x
        rec = diff.abs() if self.pixel_loss == "l1" else diff.pow(2)
        rec = self.pixel_weight * rec
        if self.perceptual_loss is not None:
            # LPIPS runs under whatever autocast is active; the distance is accumulated in fp32.
            lpips_fn = lpips_distance if self.lpips_target_no_grad else _call_lpips
            p_loss = lpips_fn(self.perceptual_loss, inputs.contiguous(), reconstructions.contiguous()).float()
            total = rec + self.perceptual_weight * p_loss  # (B,1,1,1) broadcast to every pixel, as LDM
        else:
            p_loss = torch.zeros(x.shape[0], 1, 1, 1, device=x.device)
            total = rec
        nll = total / torch.exp(self.logvar) + self.logvar
        return self._reduce(nll), rec, p_loss

    def adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """λ = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight, W the decoder's last conv weight."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.discriminator_weight

    # ---------------------------------------------------------------- the two objectives
    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        iteration: int,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective nll + kl_weight·KL + λ·disc_factor·(−mean D(x̂)).

        Args:
            inputs, reconstructions: (B, 3, H, W) in [-1, 1]; gradients flow into ``reconstructions``.
            posterior: the encoder's posterior for ``inputs``.
            iteration: current training iteration (decides whether the GAN term is on).
            last_layer: the decoder's ``conv_out.weight`` for the adaptive weight; without it (or without
                autograd, e.g. validation) λ is 0, as in LDM.
            split: prefix of the logged names.

        Returns:
            (loss, logs) with detached scalars named ``{split}/...``.
        """
        nll_loss, rec, p_loss = self.nll_terms(inputs, reconstructions)
        kl_loss = posterior.kl().float().sum() / posterior.mean.shape[0]
        disc_factor = self.disc_factor_at(iteration)
        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight = zero, zero
        if disc_factor > 0:
            # Before disc_start the discriminator is not even run: the GAN terms are exactly 0, not ~0.
            g_loss = -self.discriminator(reconstructions.contiguous()).float().mean()
            if last_layer is not None and torch.is_grad_enabled() and self.training:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        logs = {
            "total_loss": loss,
            "logvar": self.logvar,
            "kl_loss": kl_loss,
            "nll_loss": nll_loss,
            "rec_loss": rec.mean(),
            "p_loss": p_loss.mean(),
            "d_weight": d_weight,
            "disc_factor": torch.tensor(disc_factor, device=inputs.device),
            "g_loss": g_loss,
        }
        return loss, {f"{split}/{k}": v.detach().float() for k, v in logs.items()}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, iteration: int, split: str = "train"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor · hinge/vanilla(D(x), D(x̂)); ``reconstructions`` is detached so no gradient leaks
        into the autoencoder (the diffusers example's bug).

        Returns:
            (loss, logs) with ``{split}/disc_loss``, ``logits_real``, ``logits_fake``.
        """
        logits_real = self.discriminator(inputs.contiguous().detach()).float()
        logits_fake = self.discriminator(reconstructions.contiguous().detach()).float()
        disc_factor = self.disc_factor_at(iteration)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach() for k, v in logs.items()}
