"""A discriminator on frozen DINO features with small trainable heads (ProjectedGAN / StyleGAN-T lineage).

As in lavinal712/AutoencoderKL ``sgm/modules/autoencoding/discriminators/dino.py`` (itself the discriminator of
RAE, nyu-visionx, and VAR's tokenizer): a frozen self-supervised ViT — DINO ViT-S/16 by default (``recipe:
S_16``, L11-21; RAE's config uses ViT-S/8), here timm's ``vit_small_patch16_224.dino``, the same Meta
weights — reads the image resized to 224² (L166) and normalised with ImageNet's mean/std (L139-142); the
patch tokens (class token dropped) of blocks 2, 5, 8, 11 (``key_depths``, L101) and of the last block
(L177: for a 12-block ViT that is block 11 again, so it gets two independent heads) each go through a head
of 1-D convolutions over the token sequence (L149-156):

    conv1d k=1 → norm → LeakyReLU(0.2),  (x + [conv1d k=ks, circular padding → norm → LeakyReLU(0.2)](x)) / √2,
    conv1d k=1 → 1 channel,

every convolution spectrally normalised (``eps=1e-12``, L78), ``ks`` 9 in RAE's recipe and StyleGAN-T. The
logits of all heads are concatenated: (B, heads · tokens), e.g. (B, 5 · 196) for ViT-S/16 at 224².

Normalisation in the heads: each sample's channels are normalised over its own tokens (GroupNorm with one
group per channel, fp32, eps 1e-6). That is what the reference's ``BatchNormLocal`` computes (mean/var over
the token axis only, L52-57; RAE's with ``virtual_bs=1``); StyleGAN-T pooled statistics over groups of 8
samples. Per-sample statistics need no synchronisation across DDP ranks (a real BatchNorm would, and its
running statistics would make real and fake batches leak into each other), make D(x) of one image independent
of the rest of the batch (so R1's per-image gradient is well defined), and run in fp32 under bf16 autocast.

Not reproduced: the reference builds its ViT with tanh-approximated GELU (L126) and zeroes the key bias
(L131-133, a no-op for softmax attention); timm's DINO uses exact GELU, as DINO was trained. No DiffAugment
or random crops (StyleGAN-T's): lavinal712's discriminator has none either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from klvae.errors import ConfigError
from klvae.modules.backbones import FrozenViT, build_backbone

__all__ = ["DinoDiscriminator", "TokenNorm"]


class TokenNorm(nn.GroupNorm):
    """Per-sample, per-channel normalisation over the token axis of (B, C, N), computed in fp32.

    GroupNorm with one group per channel: no statistics across samples, nothing to synchronise under DDP.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_groups=channels, num_channels=channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)
        return out.to(x.dtype)


def _conv(in_channels: int, out_channels: int, kernel_size: int, use_spectral_norm: bool) -> nn.Module:
    # Circular padding: the flattened token sequence has no edges worth special treatment (as the reference).
    conv = nn.Conv1d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"
    )
    return spectral_norm(conv, eps=1e-12) if use_spectral_norm else conv


class _Block(nn.Sequential):
    """conv1d → TokenNorm → LeakyReLU(0.2), width-preserving."""

    def __init__(self, channels: int, kernel_size: int, use_spectral_norm: bool) -> None:
        super().__init__(
            _conv(channels, channels, kernel_size, use_spectral_norm),
            TokenNorm(channels),
            nn.LeakyReLU(0.2),  # not in place: R1 differentiates through it twice
        )


class _Residual(nn.Module):
    """(x + f(x)) / √2: keeps the variance of the sum that of its inputs."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fn(x)) * (1.0 / math.sqrt(2.0))


class _Head(nn.Sequential):
    """(B, C, N) tokens of one block → (B, 1, N) logits."""

    def __init__(self, channels: int, kernel_size: int, use_spectral_norm: bool) -> None:
        super().__init__(
            _Block(channels, 1, use_spectral_norm),
            _Residual(_Block(channels, kernel_size, use_spectral_norm)),
            _conv(channels, 1, 1, use_spectral_norm),
        )


class DinoDiscriminator(nn.Module):
    """Frozen ViT features of several blocks, one trainable spectral-norm head per block.

    Only the heads are parameters (the backbone is frozen and outside the module registry), so
    ``parameters()`` is exactly what the discriminator's optimizer needs and ``state_dict()`` holds only the
    heads (``heads.{i}.*``).

    Args:
        backbone: the ``{target: klvae.modules.backbones.FrozenViT, params: {...}}`` block, or a built
            ``FrozenViT``. The reference's: ``params: {model_name: vit_small_patch16_224.dino, image_size:
            224}`` (``vit_small_patch8_224.dino`` for RAE's ViT-S/8).
        blocks: backbone blocks whose tokens get a head (0-based, negative from the end, repeats allowed).
            Default: the reference's 2, 5, 8, 11 and the last block.
        kernel_size: odd width of the heads' middle convolution (``ks``; 9 in RAE and StyleGAN-T).
        use_spectral_norm: spectral normalisation on every head convolution (the reference's default).

    Shapes: ``forward(images (B, 3, H, W) in [-1, 1]) -> (B, len(blocks) · h · w)`` fp32 logits, (h, w) the
    backbone's patch grid (``backbone.grid_size(H, W)``, 14×14 for a /16 ViT at 224²).

    R1 (a double backward through the ViT): run that forward eagerly (AOTAutograd has no double backward:
    "torch.compile with aot_autograd does not currently support double backward") and inside
    :func:`klvae.modules.backbones.double_backward_attention` (fused SDPA kernels have no double backward).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any] | FrozenViT,
        blocks: Sequence[int] = (2, 5, 8, 11, -1),
        kernel_size: int = 9,
        use_spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"discriminator kernel_size must be a positive odd number, got {kernel_size!r}")
        if not blocks:
            raise ConfigError("discriminator blocks must name at least one backbone block")
        self.backbone = build_backbone(backbone)
        self.blocks = [self.backbone.block_index(b) for b in blocks]  # ConfigError for a missing block
        width = self.backbone.width
        self.heads = nn.ModuleList(_Head(width, kernel_size, use_spectral_norm) for _ in self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``images`` (B, 3, H, W) in [-1, 1]: (B, len(blocks) · h · w), fp32."""
        features = self.backbone.block_features(images, self.blocks)  # each (B, width, h, w)
        logits = [head(f.flatten(2)).flatten(1) for head, f in zip(self.heads, features, strict=True)]
        return torch.cat(logits, dim=1).float()
