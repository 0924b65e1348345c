"""The KL-VAE training objective (LDM/taming's ``LPIPSWithDiscriminator``), assembled from named terms.

Images are (B, 3, H, W) in [-1, 1]. Two entry points instead of LDM's ``optimizer_idx`` switch:
:meth:`LPIPSWithDiscriminator.generator_loss` for the autoencoder update and
:meth:`LPIPSWithDiscriminator.discriminator_loss` for the discriminator update. The contract the
LightningModule relies on is :class:`TrainingObjective`.

The autoencoder objective, in one place (:meth:`LPIPSWithDiscriminator.generator_loss`)::

    total = NLL(image terms) + Σ_latent wᵢ·termᵢ + λ · disc_factor · adversarial
    NLL   = reduce((Σ_image wᵢ·mapᵢ) / exp(logvar) + logvar)                            (LDM)

Image terms (:mod:`klvae.modules.terms`): ``rec`` (pixel l1/l2), ``p`` (LPIPS); latent terms: ``kl`` and any
``terms`` entry (VA-VAE's VF loss, ...). λ is LDM's adaptive weight, computed from gradients taken down to
x̂ only (:mod:`klvae.modules.adaptive`), so the whole objective is still differentiated once.

The discriminator objective: ``disc`` (disc_factor · hinge/vanilla/non-saturating), plus the optional
regularisers ``lecam`` (``lecam_weight``) and ``r1`` (``r1_gamma``, lazy every ``r1_interval`` updates).

Reduction (``reduction``):
    ``sum``  the published models (LDM, sgm, diffusers' script): the NLL summed over C·H·W per sample
             (LPIPS broadcast to every pixel), then averaged over the batch. The KL term at 1e-6 is then
             negligible (~2·10⁵ × weaker than with ``mean`` at 256²).
    ``mean`` a plain ``F.mse_loss``-style mean over all elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from klvae.modules.adaptive import LastLayer, gradient_norm_ratio, through_output, two_passes
from klvae.modules.backbones import double_backward_attention
from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.gan import (
    D_LOSSES,
    GENERATOR_ADVERSARIAL,
    LeCam,
    adopt_weight,
    hinge_d_loss,
    r1_penalty,
    vanilla_d_loss,
)
from klvae.modules.perceptual import load_lpips
from klvae.modules.terms import PIXEL_LOSSES, KLTerm, LossTerm, PerceptualTerm, PixelTerm, TermInputs
from klvae.util import instantiate_from_config

__all__ = [
    "PIXEL_LOSSES",
    "LPIPSWithDiscriminator",
    "LastLayer",
    "LatentCut",
    "TrainingObjective",
    "adopt_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]


@dataclass
class LatentCut:
    """Where the autoencoder update's backward is split in two (objectives with adaptive latent terms).

    The decoder ran from ``decoder_leaf``, a detached copy of ``decoder_input``: the first pass runs the
    decoder's backward and stops there; the adaptive weights are then formed; the second pass runs the
    encoder's backward once, with the decoder's gradient and the latent terms together.

    Attributes:
        decoder_input: what the decoder was given (B, C, h, w), with its graph back to the encoder.
        decoder_leaf: ``decoder_input.detach().requires_grad_()``, the decoder's actual input.
        encoder_last_layer: the encoder's ``conv_out`` with its input and output (the weight the adaptive
            latent weights are measured at).
    """

    decoder_input: torch.Tensor
    decoder_leaf: torch.Tensor
    encoder_last_layer: LastLayer


class TrainingObjective(Protocol):
    """What :class:`klvae.models.autoencoder.AutoencoderKL` needs of its ``lossconfig.target``."""

    discriminator: nn.Module
    # The VGG-LPIPS of the objective, if any (validation scores LPIPS with it); frozen, eval mode.
    perceptual_loss: nn.Module | None
    # Evaluate the input image's LPIPS features without autograd (optimizations.lpips_target_no_grad).
    lpips_target_no_grad: bool

    @property
    def needs_latent_cut(self) -> bool:
        """True when generator_loss needs ``latent_cut`` (adaptive latent terms) in training."""
        ...

    @property
    def trains_encoder(self) -> bool:
        """True when a term only makes sense with a trained encoder (decoder-only training is an error)."""
        ...

    def disc_factor_at(self, iteration: int) -> float: ...

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The objective's own parameters the autoencoder optimizer trains (learned logvar, projections)."""
        ...

    def compile_regions(self) -> dict[str, nn.Module]:
        """Networks inside the objective worth compiling as regions (LPIPS trunk, discriminator, ...)."""
        ...

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        iteration: int,
        last_layer: LastLayer | None = None,
        split: str = "train",
        grad_scale: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        encoder_images: torch.Tensor | None = None,
        latent_cut: LatentCut | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        iteration: int,
        split: str = "train",
        update_index: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class LPIPSWithDiscriminator(nn.Module):
    """The KL-f8 training objective: named generator terms, adaptive-weight GAN, regularised discriminator.

    State-dict keys are LDM's (``logvar``, ``perceptual_loss.*``, ``discriminator.*``) plus, when used,
    ``terms.<name>.*`` (a term's own trained parameters) and ``lecam.*``.

    Args:
        disc_start: training iteration at which the adversarial terms switch on (50001 in every
            published recipe). Counted in training iterations, never in optimizer steps.
        logvar_init: initial value of LDM's scalar output log-variance (nll = rec/exp(logvar) + logvar).
        learn_logvar: put ``logvar`` in the autoencoder optimizer (sgm/SD2); off in LDM, so it stays put.
        kl_weight: weight of the ``kl`` term, mean_b KL(q(z|x_b) || N(0, I)).
        pixel_loss: ``"l1"`` (LDM) or ``"l2"`` (klvae's default recipe, sd-vae-ft-mse).
        pixelloss_weight: weight of the ``rec`` (pixel) term.
        perceptual_weight: weight of the ``p`` (LPIPS) term (0 skips building LPIPS).
        perceptual_backbone: ``"imagenet"``, a weights file, or ``"random"`` (see :func:`load_lpips`).
        reduction: ``"sum"`` (per-sample sum over C·H·W, published) or ``"mean"`` (a plain ``F.mse_loss``).
        disc_num_layers, disc_in_channels, disc_ndf, use_actnorm: the default discriminator's shape
            (taming's PatchGAN); leave them at their defaults when ``discriminator_config`` is given.
        discriminator_config: ``{target, params}`` of another discriminator (e.g.
            :class:`klvae.modules.dino_discriminator.DinoDiscriminator`); None: the PatchGAN.
        disc_factor: multiplier of both adversarial terms once active.
        disc_weight: multiplier of the adaptive generator weight λ.
        disc_loss: ``"hinge"``, ``"vanilla"`` (LDM) or ``"non_saturating"`` (StyleGAN2); also picks the
            generator's adversarial term (−mean D(x̂) for the first two, softplus(−D(x̂)) for the last).
        lecam_weight: weight of the LeCam regulariser of the discriminator (0: off).
        lecam_decay: EMA decay of LeCam's anchors.
        r1_gamma: R1 penalty weight γ (the term is γ/2 · E‖∇D(x)‖²; 0: off).
        r1_interval: compute R1 every this many discriminator updates (lazy; scaled by the interval).
        terms: extra named generator terms, ``{name: {target, params}}``, each a
            :class:`klvae.modules.terms.LossTerm` (e.g. ``{vf: {target: klvae.modules.vf_loss.VFTerm, ...}}``).
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
        discriminator_config: Mapping[str, Any] | None = None,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        disc_loss: str = "hinge",
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
        r1_gamma: float = 0.0,
        r1_interval: int = 16,
        terms: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"reduction must be 'sum' (published models) or 'mean' (an F.mse_loss-style mean), got {reduction!r}"
            )
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(
                f"disc_start must be a non-negative integer (training iterations), got {disc_start!r}"
            )
        for name, value in [
            ("kl_weight", kl_weight), ("pixelloss_weight", pixelloss_weight),
            ("perceptual_weight", perceptual_weight), ("disc_factor", disc_factor),
            ("disc_weight", disc_weight), ("lecam_weight", lecam_weight), ("r1_gamma", r1_gamma),
        ]:  # fmt: skip
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not isinstance(r1_interval, int) or r1_interval < 1:
            raise ValueError(f"r1_interval must be an integer >= 1, got {r1_interval!r}")
        legacy = {"disc_num_layers": (disc_num_layers, 3), "disc_in_channels": (disc_in_channels, 3),
                  "disc_ndf": (disc_ndf, 64), "use_actnorm": (use_actnorm, False)}  # fmt: skip
        changed = [k for k, (value, default) in legacy.items() if value != default]
        if discriminator_config is not None and changed:
            raise ValueError(
                f"{changed} shape the default PatchGAN, but discriminator_config is given: set the "
                "discriminator's shape in discriminator_config.params instead"
            )

        self.disc_start = disc_start
        self.reduction = reduction
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss_name = disc_loss
        self.disc_loss = D_LOSSES[disc_loss]
        self.generator_adversarial = GENERATOR_ADVERSARIAL[disc_loss]
        self.learn_logvar = learn_logvar
        # A Parameter either way so LDM checkpoints (which always hold loss.logvar) load strictly.
        self.logvar = nn.Parameter(torch.ones(()) * logvar_init, requires_grad=learn_logvar)
        self.perceptual_loss = load_lpips(perceptual_backbone) if perceptual_weight > 0 else None
        if discriminator_config is None:
            self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        else:
            self.discriminator = instantiate_from_config(discriminator_config)

        # The generator's named terms, in the order they are summed.
        self.terms = nn.ModuleDict({"rec": PixelTerm(pixel_loss, pixelloss_weight)})
        if self.perceptual_loss is not None:
            self.terms["p"] = PerceptualTerm(self.perceptual_loss, perceptual_weight)
        self.terms["kl"] = KLTerm(kl_weight)
        for name, block in (terms or {}).items():
            if name in self.terms:
                raise ValueError(f"terms.{name}: the name is taken by a built-in term; choose another")
            term = instantiate_from_config(block)
            if not isinstance(term, LossTerm):
                raise ValueError(f"terms.{name}: {block.get('target')} is not a klvae.modules.terms.LossTerm")
            self.terms[name] = term

        # The discriminator's regularisers (each off unless weighted).
        self.lecam_weight = lecam_weight
        self.lecam = LeCam(lecam_decay) if lecam_weight > 0 else None
        self.r1_gamma, self.r1_interval = r1_gamma, r1_interval

    def train(self, mode: bool = True) -> LPIPSWithDiscriminator:
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # LPIPS is a fixed metric: no dropout, whatever Lightning asks for
        return self

    # ---------------------------------------------------------------- the contract (TrainingObjective)
    @property
    def needs_latent_cut(self) -> bool:
        return any(t.adaptive for t in self._latent_terms().values())

    @property
    def trains_encoder(self) -> bool:
        return any(t.needs_encoder for t in self.terms.values())

    @property
    def lpips_target_no_grad(self) -> bool:
        return "p" in self.terms and bool(self.terms["p"].target_no_grad)

    @lpips_target_no_grad.setter
    def lpips_target_no_grad(self, value: bool) -> None:
        if "p" in self.terms:
            self.terms["p"].target_no_grad = bool(value)

    def disc_factor_at(self, iteration: int) -> float:
        return adopt_weight(self.disc_factor, iteration, self.disc_start)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        params = [self.logvar] if self.learn_logvar else []
        return params + [p for term in self.terms.values() for p in term.trainable_parameters()]

    def compile_regions(self) -> dict[str, nn.Module]:
        regions: dict[str, nn.Module] = {"discriminator": self.discriminator}
        if self.perceptual_loss is not None:
            regions["lpips"] = self.perceptual_loss.net  # the VGG trunk: both LPIPS code paths call it
        for name, term in self.terms.items():
            regions.update({f"{name}_{region}": m for region, m in term.compile_regions().items()})
        return regions

    # ---------------------------------------------------------------- LDM's names for the built-in weights
    @property
    def kl_weight(self) -> float:
        return self.terms["kl"].weight

    @property
    def pixel_weight(self) -> float:
        return self.terms["rec"].weight

    @property
    def pixel_loss(self) -> str:
        return self.terms["rec"].loss

    @property
    def perceptual_weight(self) -> float:
        return self.terms["p"].weight if "p" in self.terms else 0.0

    # ---------------------------------------------------------------- pieces
    def _image_terms(self) -> dict[str, LossTerm]:
        return {n: t for n, t in self.terms.items() if t.kind == "image"}

    def _latent_terms(self) -> dict[str, LossTerm]:
        return {n: t for n, t in self.terms.items() if t.kind == "latent"}

    def _reduce(self, per_element: torch.Tensor) -> torch.Tensor:
        if self.reduction == "sum":
            return per_element.sum() / per_element.shape[0]
        return per_element.mean()

    def adaptive_weight(
        self, grad_nll: torch.Tensor, grad_g: torch.Tensor, last_layer: LastLayer
    ) -> torch.Tensor:
        """λ = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight, W the decoder's last conv weight.

        LDM's formula (taming's ``calculate_adaptive_weight``); the two ∇_W are formed from ∂nll/∂x̂ and
        ∂g/∂x̂ and the conv's input instead of two ``autograd.grad`` calls into the decoder.
        """
        ratio = gradient_norm_ratio(last_layer.weight_grad(grad_nll), last_layer.weight_grad(grad_g))
        return ratio * self.discriminator_weight

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
        latents: torch.Tensor | None = None,
        encoder_images: torch.Tensor | None = None,
        latent_cut: LatentCut | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder objective (see the module docstring); call ``backward()`` on it exactly once.

        With the adaptive weight (GAN phase, ``last_layer`` given, grad mode, training) the image terms'
        and the discriminator's backwards run here, once each, down to x̂ only: ∂nll/∂x̂ and ∂g/∂x̂ give λ,
        and the returned loss is built so that its backward is the single remaining pass, x̂ → decoder →
        encoder. No ``retain_graph`` through the network, so it works through compiled regions. With
        adaptive latent terms (``latent_cut``) that backward runs in two passes split at the decoder's
        input (:class:`LatentCut`), still once through each network.

        Args:
            inputs, reconstructions: (B, 3, H, W) in [-1, 1]; gradients flow into ``reconstructions``.
            posterior: the encoder's posterior for the encoder's input.
            iteration: current training iteration (decides whether the GAN term is on).
            last_layer: the decoder's output conv and its input, for λ; without it (or without autograd,
                e.g. validation) λ is 0, as in LDM.
            split: prefix of the logged names.
            grad_scale: loss scale of a ``GradScaler`` (16-mixed): the gradients down to x̂ are taken of
                the scaled terms so fp16 backward does not underflow, then unscaled. None: 1.
            latents: the posterior sample the decoder was given (latent terms such as the VF loss).
            encoder_images: the encoder's input (B, 3, H', W') (the VF loss's backbone sees it).
            latent_cut: required in training when :attr:`needs_latent_cut`.

        Returns:
            (loss, logs) with detached scalars named ``{split}/...``: ``total_loss``, ``nll_loss``,
            ``<term>_loss`` and ``<term>_weight`` per term, ``logvar``, ``g_loss``, ``d_weight`` (λ),
            ``disc_factor``.
        """
        # One dtype (fp32) for every term and D whatever autocast produced: a compiled region specialises
        # on its input dtype, and D also sees the fp32 input images.
        recon = reconstructions.float()
        batch = TermInputs(inputs.float(), recon, posterior, latents, encoder_images)
        logs: dict[str, torch.Tensor] = {}

        # Image terms → LDM's NLL with the scalar log-variance.
        nll_map = None
        for name, term in self._image_terms().items():
            value = term(batch)  # broadcasts to (B, C, H, W)
            logs[f"{name}_loss"], logs[f"{name}_weight"] = (
                value.mean(),
                torch.full_like(value.mean(), term.weight),
            )
            nll_map = term.weight * value if nll_map is None else nll_map + term.weight * value
        nll = self._reduce(nll_map / torch.exp(self.logvar) + self.logvar)

        # Latent terms → weight · value (an adaptive term's weight: the one its last update used).
        latent_values = {name: term(batch) for name, term in self._latent_terms().items()}
        latent_weights = {name: self._latent_weight(term) for name, term in self._latent_terms().items()}
        latent = sum((latent_weights[n] * v for n, v in latent_values.items()), torch.zeros_like(nll))
        for name, value in latent_values.items():
            logs[f"{name}_loss"], logs[f"{name}_weight"] = value, latent_weights[name]
            logs.update(self.terms[name].components())

        # The adversarial term, weighted by LDM's adaptive λ.
        disc_factor = self.disc_factor_at(iteration)
        zero = torch.zeros((), device=inputs.device)
        g_loss, d_weight = zero, zero
        adaptive = False
        if disc_factor > 0:
            # Before disc_start the discriminator is not even run: the GAN terms are exactly 0, not ~0.
            g_loss = self.generator_adversarial(self.discriminator(recon.contiguous()).float())
            adaptive = last_layer is not None and torch.is_grad_enabled() and self.training
        if adaptive:
            scale = 1.0 if grad_scale is None else grad_scale.detach().reshape(())  # GradScaler's is (1,)
            # nll's graph (image terms) and g's graph (D) meet only at x̂; each is run backward once here,
            # down to x̂ (and logvar), and freed. The network's part of the graph is untouched.
            targets = [recon] + ([self.logvar] if self.logvar.requires_grad else [])
            nll_grads = torch.autograd.grad(nll * scale, targets)
            (grad_g,) = torch.autograd.grad(g_loss * scale, [recon])
            grad_nll, grad_g = nll_grads[0] / scale, grad_g / scale
            d_weight = self.adaptive_weight(grad_nll, grad_g, last_layer)

        # The objective: what reaches the network through x̂, plus the latent terms.
        through_recon = nll + d_weight * disc_factor * g_loss
        if adaptive:  # same value; its gradient into x̂ (and logvar) is already known
            grad_recon = grad_nll + (d_weight * disc_factor) * grad_g  # (B, 3, H, W)
            logvar_grads = [g / scale for g in nll_grads[1:]]
            through_recon = through_output(through_recon, recon, grad_recon, targets[1:], logvar_grads)
        loss = through_recon + latent
        if latent_cut is not None and torch.is_grad_enabled() and self.training:
            loss = self._two_passes(through_recon, latent_values, latent_cut, loss)

        logs.update(
            total_loss=loss, logvar=self.logvar, nll_loss=nll, g_loss=g_loss, d_weight=d_weight,
            disc_factor=zero + disc_factor,  # a device op: torch.tensor(x, device=cuda) is a host copy
        )  # fmt: skip
        return loss, {f"{split}/{k}": v.detach().float() for k, v in logs.items()}

    def _latent_weight(self, term: LossTerm) -> torch.Tensor:
        if term.adaptive:
            return term.adaptive_weight  # a buffer the backward updates (the weight this update used)
        return torch.full((), term.weight, device=self.logvar.device)

    def _two_passes(
        self,
        through_recon: torch.Tensor,
        latent_values: dict[str, torch.Tensor],
        cut: LatentCut,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """The objective's backward split at the decoder's input, for adaptive latent weights (VA-VAE).

        Pass 1 runs the decoder side down to ``cut.decoder_leaf``. The adaptive weight of a latent term is
        then weight · clamp(‖∇_W rec‖ / (‖∇_W term‖ + 1e-4), 0, max), W the encoder's last conv, with
        ``rec`` the gradient the decoder sends back to the latent (the reconstruction NLL, plus λ·g once the
        GAN is on: VA-VAE differentiates the NLL alone, which would cost a second decoder backward). Pass 2
        runs the encoder's backward once with the decoder's gradient, the weighted latent terms and KL.
        """
        layer = cut.encoder_last_layer
        assert layer.outputs is not None, "LatentCut.encoder_last_layer needs the conv's output"

        def passes(grad: torch.Tensor) -> None:
            torch.autograd.backward(through_recon, grad)  # decoder side; stops at the leaf
            grad_latent = cut.decoder_leaf.grad  # scaled like every gradient of this backward
            cut.decoder_leaf.grad = None
            if grad_latent is None:  # nothing reached the decoder's input (e.g. a frozen decoder)
                grad_latent = torch.zeros_like(cut.decoder_leaf)
            from_decoder = (cut.decoder_input * grad_latent).sum()
            reference = None
            total = from_decoder
            for name, value in latent_values.items():
                term = self.terms[name]
                weight: torch.Tensor = torch.full((), term.weight, device=value.device)
                if term.adaptive:
                    if reference is None:
                        (g_ref,) = torch.autograd.grad(from_decoder, layer.outputs, retain_graph=True)
                        reference = layer.weight_grad(g_ref) / grad  # unscaled: eps is in loss units
                    (g_term,) = torch.autograd.grad(value * grad, layer.outputs, retain_graph=True,
                                                    allow_unused=True)  # fmt: skip
                    g_term = torch.zeros_like(layer.outputs) if g_term is None else g_term
                    ratio = gradient_norm_ratio(
                        reference, layer.weight_grad(g_term) / grad, 1e-4, term.max_adaptive_weight
                    )
                    weight = ratio * term.weight
                    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                        # One weight on every rank (the ratio of each rank's own gradients differs): the
                        # update is then the average of the ranks' with a common weight, and every rank
                        # holds the same buffer. One scalar all-reduce per update, no host sync.
                        dist.all_reduce(weight)
                        weight = weight / dist.get_world_size()
                    term.adaptive_weight.copy_(weight)
                total = total + (weight * grad) * value
            torch.autograd.backward(total)  # the encoder side, once

        return two_passes(value, passes)

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        iteration: int,
        split: str = "train",
        update_index: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator objective: disc_factor · D loss (+ LeCam, + lazy R1 in training).

        ``reconstructions`` are detached so no gradient leaks into the autoencoder (the diffusers
        example's bug). ``update_index`` counts the discriminator updates before this one (the lazy R1
        clock; the same for every micro-batch of an accumulation round).

        Returns:
            (loss, logs) with ``{split}/disc_loss`` (the total), its weight ``disc_factor``, ``logits_real``,
            ``logits_fake`` and, when
            on, ``lecam_loss``/``lecam_weight``, ``r1_loss``/``r1_weight``.
        """
        disc_factor = self.disc_factor_at(iteration)
        training = torch.is_grad_enabled() and self.training
        r1_now = training and self.r1_gamma > 0 and disc_factor > 0 and update_index % self.r1_interval == 0
        # fp32 inputs, as in generator_loss: one compiled graph serves the real and the fake batch.
        real = inputs.float().contiguous().detach()
        if r1_now:
            real.requires_grad_(True)
        fake = reconstructions.float().contiguous().detach()
        if r1_now:
            # R1 differentiates ∇_x D(x) again: compiled regions and fused attention kernels have no
            # double backward, so this forward runs eagerly with plain attention (its logits also serve the
            # D loss: no extra forward). The fake batch goes first: a BatchNorm's backward keeps its running
            # statistics, which the next forward would update in place before R1's double backward.
            logits_fake = self.discriminator(fake).float()
            with torch.compiler.set_stance("force_eager"), double_backward_attention():
                logits_real = self.discriminator(real).float()
        else:
            logits_real = self.discriminator(real).float()
            logits_fake = self.discriminator(fake).float()
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        if self.lecam is not None:
            lecam = self.lecam(logits_real, logits_fake)
            d_loss = d_loss + disc_factor * self.lecam_weight * lecam
            logs.update(lecam_loss=lecam, lecam_weight=torch.full_like(lecam, self.lecam_weight))
            if training and disc_factor > 0:
                self.lecam.update(logits_real, logits_fake)
        if r1_now:
            r1 = r1_penalty(logits_real, real)
            weight = 0.5 * self.r1_gamma * self.r1_interval
            d_loss = d_loss + disc_factor * weight * r1
            logs.update(r1_loss=r1, r1_weight=torch.full_like(r1, weight))
        logs["disc_loss"] = d_loss
        logs["disc_factor"] = torch.zeros_like(d_loss.detach()) + disc_factor  # the D loss's weight
        return d_loss, {f"{split}/{k}": v.detach() for k, v in logs.items()}
