"""LPIPSWithDiscriminator: reconstruction + perceptual + KL + adaptive-weight PatchGAN (LDM, taming).

Images are (B, 3, H, W) in [-1, 1]. Two entry points instead of LDM's ``optimizer_idx`` switch:
:meth:`LPIPSWithDiscriminator.generator_loss` for the autoencoder update and
:meth:`LPIPSWithDiscriminator.discriminator_loss` for the discriminator update.

Reduction (``reduction``):
    ``sum``  the published models (LDM, sgm, diffusers' script): pixel and perceptual terms summed over
             C·H·W per sample (LPIPS broadcast to every pixel), then averaged over the batch. The KL term at
             1e-6 is then negligible (~2·10⁵ × weaker than with ``mean`` at 256²).
    ``mean`` a plain ``F.mse_loss``-style mean over all elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.perceptual import load_lpips
from klvae.perf.lpips import lpips_distance

__all__ = [
    "PIXEL_LOSSES",
    "LPIPSWithDiscriminator",
    "LastLayer",
    "adopt_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, iteration: int, threshold: int) -> float:
    """``weight`` once ``iteration`` has reached ``threshold``, else 0 (the GAN warm-up switch)."""
    return weight if iteration >= threshold else 0.0


@dataclass
class LastLayer:
    """The decoder's output convolution and the input it saw in this forward pass.

    Enough to turn a gradient with respect to the reconstruction into the gradient with respect to the
    conv's weight W without running the decoder's backward: for y = conv(h, W),
    ∂L/∂W = conv2d_weight(h, W.shape, ∂L/∂y) (``torch.nn.grad.conv2d_weight``).

    Attributes:
        conv: the decoder's ``conv_out`` (stride/padding/dilation/groups are read from it).
        inputs: its input h, (B, C, H, W), as saved by a forward hook.
    """

    conv: nn.Conv2d
    inputs: torch.Tensor

    def weight_grad(self, grad_recon: torch.Tensor) -> torch.Tensor:
        """∂L/∂W (fp32, W's shape) from ∂L/∂x̂ (B, 3, H, W), x̂ = conv(h) (the decoder's output)."""
        conv = self.conv
        return torch.nn.grad.conv2d_weight(
            self.inputs.detach().float(), conv.weight.shape, grad_recon.float(),
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        )  # fmt: skip


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
# Per-pixel reconstruction losses of x̂ − x (B, C, H, W), by ``pixel_loss`` name: LDM's l1, and the l2 of
# sd-vae-ft-mse. A new one is one entry here.
PIXEL_LOSSES = {"l1": torch.abs, "l2": torch.square}


class LPIPSWithDiscriminator(nn.Module):
    """The KL-f8 training objective.

    Args:
        disc_start: training iteration at which the adversarial terms switch on (50001 in every
            published recipe). Counted in training iterations, never in optimizer steps.
        logvar_init: initial value of LDM's scalar output log-variance (nll = rec/exp(logvar) + logvar).
        learn_logvar: put ``logvar`` in the autoencoder optimizer (sgm/SD2); off in LDM, so it stays put.
        kl_weight: weight of mean_b KL(q(z|x_b) || N(0, I)).
        pixel_loss: ``"l1"`` (LDM) or ``"l2"`` (klvae's default recipe, sd-vae-ft-mse).
        pixelloss_weight: weight of the pixel term.
        perceptual_weight: weight of LPIPS (0 skips building it).
        perceptual_backbone: ``"imagenet"``, a weights file, or ``"random"`` (see :func:`load_lpips`).
        reduction: ``"sum"`` (per-sample sum over C·H·W, published) or ``"mean"`` (a plain ``F.mse_loss``).
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
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"reduction must be 'sum' (published models) or 'mean' (an F.mse_loss-style mean), got {reduction!r}"
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
        # Set by AutoencoderKL from optimizations.lpips_target_no_grad: the input's LPIPS features under
        # no_grad (klvae.perf.lpips); same value and gradients as lpips.LPIPS.
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
        rec = PIXEL_LOSSES[self.pixel_loss](diff)
        rec = self.pixel_weight * rec
        if self.perceptual_loss is not None:
            # LPIPS runs under whatever autocast is active; the distance is accumulated in fp32. Assembled
            # from lpips.LPIPS's pieces so its VGG trunk goes through Module.__call__ (a compiled trunk is
            # really used: lpips.LPIPS.forward calls net.forward and would bypass it).
            p_loss = lpips_distance(
                self.perceptual_loss, x.contiguous(), x_hat.contiguous(), self.lpips_target_no_grad
            ).float()
            total = rec + self.perceptual_weight * p_loss  # (B,1,1,1) broadcast to every pixel, as LDM
        else:
            p_loss = torch.zeros(x.shape[0], 1, 1, 1, device=x.device)
            total = rec
        nll = total / torch.exp(self.logvar) + self.logvar
        return self._reduce(nll), rec, p_loss

    def adaptive_weight(
        self, grad_nll: torch.Tensor, grad_g: torch.Tensor, last_layer: LastLayer
    ) -> torch.Tensor:
        """λ = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight, W the decoder's last conv weight.

        LDM's formula (taming's ``calculate_adaptive_weight``); the two ∇_W are formed from ∂nll/∂x̂ and
        ∂g/∂x̂ and the conv's saved input instead of two ``autograd.grad`` calls into the decoder.
        """
        nll_w = last_layer.weight_grad(grad_nll)
        g_w = last_layer.weight_grad(grad_g)
        weight = torch.linalg.vector_norm(nll_w) / (torch.linalg.vector_norm(g_w) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.discriminator_weight

    # ---------------------------------------------------------------- the two objectives
    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        iteration: int,
        last_layer: LastLayer | None = None,
        split: str = "train",
        grad_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder objective nll + kl_weight·KL + λ·disc_factor·(−mean D(x̂)).

        With the adaptive weight (GAN phase, ``last_layer`` given, grad mode, training) the pixel/LPIPS
        and discriminator backwards run here, once each, down to x̂ only: ∂nll/∂x̂ and ∂g/∂x̂ give λ (see
        :meth:`adaptive_weight`), and the returned loss is built so that its backward is the single
        remaining pass, x̂ → decoder → encoder, with x̂'s gradient ∂nll/∂x̂ + λ·disc_factor·∂g/∂x̂. Its
        value is the objective's; call ``backward()`` on it exactly once. No ``retain_graph``, so it
        works through compiled regions (whose backward is one block with donated buffers).

        Args:
            inputs, reconstructions: (B, 3, H, W) in [-1, 1]; gradients flow into ``reconstructions``.
            posterior: the encoder's posterior for ``inputs``.
            iteration: current training iteration (decides whether the GAN term is on).
            last_layer: the decoder's output conv and its saved input for the adaptive weight; without it
                (or without autograd, e.g. validation) λ is 0, as in LDM.
            split: prefix of the logged names.
            grad_scale: loss scale of a ``GradScaler`` (16-mixed): the gradients down to x̂ are taken of
                the scaled terms so fp16 backward does not underflow, then unscaled. None: 1.

        Returns:
            (loss, logs) with detached scalars named ``{split}/...``.
        """
        # One dtype (fp32) for the pixel loss, LPIPS and D whatever autocast produced: a compiled region
        # specialises on its input dtype, and D also sees the fp32 input images.
        recon = reconstructions.float()
        nll_loss, rec, p_loss = self.nll_terms(inputs, recon)
        kl_loss = posterior.kl().float().sum() / posterior.mean.shape[0]
        disc_factor = self.disc_factor_at(iteration)
        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight = zero, zero
        adaptive = False
        if disc_factor > 0:
            # Before disc_start the discriminator is not even run: the GAN terms are exactly 0, not ~0.
            g_loss = -self.discriminator(recon.contiguous()).float().mean()
            adaptive = last_layer is not None and torch.is_grad_enabled() and self.training
        if not adaptive:
            loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        else:
            scale = 1.0 if grad_scale is None else grad_scale.detach().reshape(())  # GradScaler's is (1,)
            # nll's graph (pixel, LPIPS) and g's graph (D) meet only at x̂; each is run backward once here,
            # down to x̂ (and logvar), and freed. The decoder's part of the graph is untouched.
            targets = [recon] + ([self.logvar] if self.logvar.requires_grad else [])
            nll_grads = torch.autograd.grad(nll_loss * scale, targets)
            (grad_g,) = torch.autograd.grad(g_loss * scale, [recon])
            grad_nll, grad_g = nll_grads[0] / scale, grad_g / scale
            d_weight = self.adaptive_weight(grad_nll, grad_g, last_layer)
            grad_recon = grad_nll + (d_weight * disc_factor) * grad_g  # (B, 3, H, W)
            value = (nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss).detach()
            # Same gradients as the objective for every parameter: x̂'s, KL's, and logvar's (learned).
            surrogate = (recon * grad_recon.detach()).sum() + self.kl_weight * kl_loss
            if len(nll_grads) == 2:
                surrogate = surrogate + self.logvar * (nll_grads[1] / scale).detach()
            loss = value + (surrogate - surrogate.detach())  # value of the objective, gradient of surrogate
        logs = {
            "total_loss": loss,
            "logvar": self.logvar,
            "kl_loss": kl_loss,
            "nll_loss": nll_loss,
            "rec_loss": rec.mean(),
            "p_loss": p_loss.mean(),
            "d_weight": d_weight,
            "disc_factor": zero + disc_factor,  # a device op: torch.tensor(x, device=cuda) is a host copy
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
        # fp32 inputs, as in generator_loss: one compiled graph serves the real and the fake batch.
        logits_real = self.discriminator(inputs.float().contiguous().detach()).float()
        logits_fake = self.discriminator(reconstructions.float().contiguous().detach()).float()
        disc_factor = self.disc_factor_at(iteration)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach() for k, v in logs.items()}
