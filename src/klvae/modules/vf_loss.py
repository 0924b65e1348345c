"""VA-VAE's vision-foundation (VF) loss: align the latents with a frozen ViT's patch features.

Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models"
(arXiv:2501.01423). The reference is hustvl/LightningDiT ``vavae/ldm/modules/losses/contperceptual.py``
(L124-134 the two margin losses, L56-67 the adaptive weight) with ``vavae/ldm/models/autoencoder.py``
(L316-325 the projection, L353-367 which latent); lavinal712/AutoencoderKL
``sgm/modules/autoencoding/losses/vf_loss.py`` adds resizing the features to the latent grid.

With z' the projected latents and f the features, both (B, C, h, w), at every position i:

* marginal cosine similarity: ``mean_{b,i} relu(1 − m_cos − cos(z'_i, f_i))``;
* marginal distance matrix: ``mean_{b,i,j} relu(|cos(z'_i, z'_j) − cos(f_i, f_j)| − m_dist)``;

and the VF term is ``distmat_weight · distmat + cos_weight · cos`` (both weights 1 in VA-VAE). The losses
and the adaptive weight are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from klvae.errors import ConfigError
from klvae.modules.backbones import FrozenViT, build_backbone
from klvae.modules.terms import LossTerm, TermInputs

__all__ = [
    "VF_GRAD_EPS",
    "VF_WEIGHT_MAX",
    "VFLoss",
    "adaptive_vf_weight",
    "vf_cos_loss",
    "vf_distmat_loss",
]

# calculate_adaptive_weight_vf (LightningDiT contperceptual.py L64-65): ‖∇nll‖ / (‖∇vf‖ + 1e-4), clamped to
# [0, 1e8] (the GAN's λ clamps at 1e4 instead, L51-52).
VF_GRAD_EPS = 1e-4
VF_WEIGHT_MAX = 1e8


def vf_cos_loss(latents: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean relu(1 − margin − cos)`` of the per-position cosine similarity over channels.

    Args:
        latents: (B, C, h, w), already projected to the features' width (or vice versa).
        features: (B, C, h, w).
        margin: ``cos_margin``: positions whose similarity exceeds ``1 − margin`` cost nothing.
    """
    with torch.autocast(latents.device.type, enabled=False):  # fp32 even inside a bf16 region
        cosine = F.cosine_similarity(latents.float(), features.float(), dim=1)  # (B, h, w)
        return F.relu(1.0 - margin - cosine).mean()


def vf_distmat_loss(latents: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean relu(|S_z − S_f| − margin)`` of the two (h·w)×(h·w) cosine-similarity matrices.

    Memory is O(B · (h·w)²): 4 MB per image for a 32×32 latent grid, 64 MB for 64×64.

    Args:
        latents: (B, C_z, h, w); its width need not match the features' (only self-similarities compare).
        features: (B, C_f, h, w).
        margin: ``distmat_margin``: similarity differences below it cost nothing.
    """
    with torch.autocast(latents.device.type, enabled=False):  # autocast would run the matmuls in bf16
        z = F.normalize(latents.float().flatten(2), dim=1)  # (B, C_z, N)
        f = F.normalize(features.float().flatten(2), dim=1)  # (B, C_f, N)
        sim_z = z.transpose(1, 2) @ z  # (B, N, N)
        sim_f = f.transpose(1, 2) @ f
        return F.relu((sim_z - sim_f).abs() - margin).mean()


def adaptive_vf_weight(nll_grad: torch.Tensor, vf_grad: torch.Tensor, vf_weight: float) -> torch.Tensor:
    """VA-VAE's adaptive VF weight from two gradients at the encoder's last layer.

    ``clamp(‖nll_grad‖ / (‖vf_grad‖ + 1e-4), 0, 1e8) · vf_weight``, detached (LightningDiT
    ``contperceptual.py`` L56-67, called with ``encoder.conv_out.weight`` as the layer, autoencoder.py L385).
    In the reference ``nll`` is the reconstruction term only (``|x − x̂| + perceptual_weight · LPIPS``, summed
    over pixels and averaged over the batch, over ``exp(logvar)`` plus logvar; no KL, no GAN) and ``vf`` the
    combined VF term (``VFLoss(...)["vf"]``). Norms are Frobenius norms of the whole tensors.

    Both gradients must be on the same scale: unscale them first under a GradScaler (the ratio is
    scale-free, the 1e-4 is not).

    Args:
        nll_grad: ∂nll/∂W for the encoder's last layer weight W (any shape).
        vf_grad: ∂vf/∂W, same W.
        vf_weight: the configured ``vf_weight`` the ratio multiplies.

    Returns:
        A 0-dim fp32 tensor without grad.
    """
    ratio = nll_grad.detach().float().norm() / (vf_grad.detach().float().norm() + VF_GRAD_EPS)
    return ratio.clamp(0.0, VF_WEIGHT_MAX) * vf_weight


class VFLoss(LossTerm):
    """The VF loss between latents and a frozen ViT's last-layer patch features of the input images: a
    latent term of the autoencoder objective (``lossconfig.params.terms.vf``), weight ``vf_weight``.

    Which latent: VA-VAE applies it to the posterior **sample** z (autoencoder.py L355-366: ``z =
    posterior.sample()`` is both decoded and projected), the tensor the decoder reads and the one LightningDiT
    trains its diffusion model on (``tokenizer/vavae.py`` L70 encodes with ``posterior.sample()``); the gradient
    reaches the mean and, through the reparameterisation, the log-variance. Pass the same z the decoder gets.

    The projection is a learned 1×1 convolution trained with the autoencoder's optimizer. With
    ``reverse_proj: true`` (VA-VAE's released setting, ``vavae/configs/f16d32_vfdinov2.yaml`` L13) it maps the
    latents to the ViT width, ``Conv2d(latent_channels, width, 1, bias=False)``; with ``false`` it maps the
    features to the latent width, ``Conv2d(width, latent_channels, 1, bias=True)`` (autoencoder.py L322-325).
    The features are resized to the latent grid bilinearly (align_corners=False) when the grids differ, as in
    lavinal712's ``vf_loss.py``: at 256² a ViT-/14 at 224² gives 16×16, VA-VAE's f16 grid exactly, and an f8
    (32×32) grid gets them upsampled 2×.

    Args:
        weight: ``vf_weight`` (VA-VAE: 0.1 in its final stages, 0.5 in the first).
        adaptive: VA-VAE's ``adaptive_vf``: each update, the weight is multiplied by
            clamp(‖∇_W nll‖ / (‖∇_W vf‖ + 1e-4), 0, 1e8), W the encoder's last conv
            (:meth:`klvae.modules.losses.LPIPSWithDiscriminator.generator_loss` computes it without a second
            backward; the weight each update used is the buffer ``adaptive_weight``, logged as ``vf_weight``).
        latent_channels: channels of the latents (``embed_dim``: 32 for VA-VAE's f16d32, 4 for kl-f8).
        backbone: the ``{target: klvae.modules.backbones.FrozenViT, params: {...}}`` block, or a built
            ``FrozenViT``. VA-VAE uses ``vit_large_patch14_dinov2.lvd142m`` (``foundation_models.py`` L25; its
            lavinal712 port the ``reg4`` variant, ``configs/vavae_f16d32.yaml``).
        cos_margin: ``m_cos`` (VA-VAE's final stage: 0.5; 0 in its first stages).
        distmat_margin: ``m_dist`` (VA-VAE's final stage: 0.25).
        cos_weight: weight of the cosine term inside ``vf`` (VA-VAE: 1.0).
        distmat_weight: weight of the distance-matrix term inside ``vf`` (VA-VAE: 1.0).
        reverse_proj: project the latents (true) or the features (false).

    Shapes: ``forward(latents (B, C, h, w), images (B, 3, H, W) in [-1, 1])``.
    """

    kind = "latent"
    needs_encoder = True  # the alignment is learned by the encoder: decoder-only training cannot use it
    max_adaptive_weight = VF_WEIGHT_MAX

    def __init__(
        self,
        latent_channels: int,
        backbone: Mapping[str, Any] | FrozenViT,
        weight: float = 0.1,
        adaptive: bool = False,
        cos_margin: float = 0.0,
        distmat_margin: float = 0.0,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        reverse_proj: bool = True,
    ) -> None:
        super().__init__(weight, adaptive)
        for key, value in (("cos_margin", cos_margin), ("distmat_margin", distmat_margin)):
            if not 0.0 <= value <= 2.0:
                raise ConfigError(f"{key} must be in [0, 2] (a cosine-similarity margin), got {value!r}")
        self.backbone = build_backbone(backbone)
        self.latent_channels = latent_channels
        self.cos_margin, self.distmat_margin = cos_margin, distmat_margin
        self.cos_weight, self.distmat_weight = cos_weight, distmat_weight
        self.reverse_proj = reverse_proj
        width = self.backbone.width
        if reverse_proj:
            self.linear_proj = nn.Conv2d(latent_channels, width, kernel_size=1, bias=False)
        else:
            self.linear_proj = nn.Conv2d(width, latent_channels, kernel_size=1, bias=True)

    def target_features(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The frozen ViT's features of ``images`` (no graph), on a (h, w) = ``size`` grid: (B, width, h, w)."""
        with torch.no_grad():
            features = self.backbone(images)
            if tuple(features.shape[-2:]) != tuple(size):
                features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return features

    def compile_regions(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        """The ``vf`` term of the posterior sample the decoder got against the encoder's input images."""
        if inputs.latents is None or inputs.encoder_images is None:
            raise ValueError("the VF loss needs the latents and the encoder's input images (TermInputs)")
        losses = self.losses(inputs.latents, inputs.encoder_images)
        self._components = {"vf_cos": losses["vf_cos"].detach(), "vf_distmat": losses["vf_distmat"].detach()}
        return losses["vf"]

    def components(self) -> dict[str, torch.Tensor]:
        return getattr(self, "_components", {})

    def losses(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VF loss of ``latents`` against the backbone's features of ``images``.

        Args:
            latents: (B, latent_channels, h, w), the posterior sample the decoder gets.
            images: (B, 3, H, W) in [-1, 1], the encoder's input.

        Returns:
            ``{"vf": cos_weight · vf_cos + distmat_weight · vf_distmat, "vf_cos": ..., "vf_distmat": ...}``,
            fp32 scalars. ``vf`` is the objective's term (unweighted by ``vf_weight``); the other two are its
            parts, for logging: adding all three would count them twice.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"VF loss expects latents (B, {self.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        if images.shape[0] != latents.shape[0]:
            raise ValueError(f"VF loss: {images.shape[0]} images for {latents.shape[0]} latents")
        features = self.target_features(images, tuple(latents.shape[-2:]))  # (B, width, h, w)
        if self.reverse_proj:
            latents = self.linear_proj(latents)  # (B, width, h, w)
        else:
            features = self.linear_proj(features)  # (B, latent_channels, h, w), trains the projection
        cos = vf_cos_loss(latents, features, self.cos_margin)
        distmat = vf_distmat_loss(latents, features, self.distmat_margin)
        return {
            "vf": self.cos_weight * cos + self.distmat_weight * distmat,
            "vf_cos": cos,
            "vf_distmat": distmat,
        }
