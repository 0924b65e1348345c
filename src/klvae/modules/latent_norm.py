"""FLUX.2's latent normaliser: a BatchNorm over 2×2-patchified latents, frozen at its running statistics.

FLUX.2's transformer sees latents ``(B, 4·32, H/16, W/16)``: each 2×2 patch of the VAE's 32-channel latent
folded into channels (channel order ``(c, row, column)``), then normalised per channel with a BatchNorm's
running statistics, ``(z − running_mean) / sqrt(running_var + eps)`` (black-forest-labs/flux2
``AutoEncoder.encode``/``normalize``; diffusers ``Flux2Pipeline._patchify_latents`` and
``_encode_vae_image``, undone before decoding). The statistics are part of the VAE's weights
(``bn.running_mean`` ...) and the transformer was trained on them, so here they never move: the module
is always in eval mode and normalises with ``training=False``; only loading weights changes them (new ones
are measured by ``klvae-latent-stats`` and written by ``klvae-export --batch-norm-stats``).

It is a plain module with BatchNorm2d's tensor names rather than a ``BatchNorm2d`` subclass, so that nothing
that converts or re-modes batch norms (``SyncBatchNorm.convert_sync_batchnorm``, ``model.train()``) can turn
it into a layer that updates its statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klvae.modules.config import LatentBatchNormConfig

__all__ = ["LatentBatchNorm", "patchify", "unpatchify"]


def patchify(z: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) → (B, C·p·q, h/p, w/q), channel order (c, row in patch, column in patch) as FLUX.2's.

    Raises:
        ValueError: ``h`` or ``w`` not a multiple of the patch (the image side must be a multiple of
            ``downsampling · patch``, 16 for FLUX.2).
    """
    b, c, h, w = z.shape
    p, q = patch_size
    if h % p or w % q:
        raise ValueError(
            f"latents of {h}x{w} cannot be cut into {p}x{q} patches: the image side must be a multiple of "
            f"{p}x{q} times the VAE's downsampling factor"
        )
    z = z.reshape(b, c, h // p, p, w // q, q)  # (B, C, h/p, p, w/q, q)
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * q, h // p, w // q)


def unpatchify(z: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, C·p·q, h, w) → (B, C, h·p, w·q)."""
    b, cpq, h, w = z.shape
    p, q = patch_size
    if cpq % (p * q):
        raise ValueError(f"{cpq} channels are not a whole number of {p}x{q} patches")
    z = z.reshape(b, cpq // (p * q), p, q, h, w)  # (B, C, p, q, h, w)
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, cpq // (p * q), h * p, w * q)


class LatentBatchNorm(nn.Module):
    """Normalise latents (B, C, h, w) to the transformer's (B, C·p·q, h/p, w/q) and back.

    State-dict keys are ``BatchNorm2d``'s: ``running_mean``, ``running_var`` (C·p·q,), ``num_batches_tracked``
    (and ``weight``, ``bias`` with ``affine``, frozen). Fresh statistics are mean 0, variance 1 (torch's
    defaults), i.e. no normalisation until measured.

    Args:
        channels: the latent channels C (``embed_dim``; 32 for FLUX.2).
        config: patch size, eps, momentum, affine.
    """

    def __init__(self, channels: int, config: LatentBatchNormConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = channels * config.patch_area
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        if config.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(self.num_features), requires_grad=False)
        else:
            self.weight = self.bias = None
        super().train(False)

    def train(self, mode: bool = True) -> LatentBatchNorm:
        """Always eval: the statistics belong to the diffusion model trained on them (``mode`` is ignored)."""
        return super().train(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.normalize(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → normalised patches (B, C·p·q, h/p, w/q), what FLUX.2's transformer sees."""
        x = patchify(z, self.config.patch_size)
        return F.batch_norm(
            x, self.running_mean.to(x.dtype), self.running_var.to(x.dtype),
            None if self.weight is None else self.weight.to(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype),
            training=False, momentum=0.0, eps=self.config.eps,
        )  # fmt: skip

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised patches (B, C·p·q, h, w) → latents (B, C, h·p, w·q), ready for the decoder."""
        shape = (1, -1, 1, 1)
        if self.weight is not None:
            x = (x - self.bias.view(shape).to(x.dtype)) / self.weight.view(shape).to(x.dtype)
        std = torch.sqrt(self.running_var.view(shape) + self.config.eps).to(x.dtype)
        return unpatchify(x * std + self.running_mean.view(shape).to(x.dtype), self.config.patch_size)

    def extra_repr(self) -> str:
        c = self.config
        return f"{self.num_features}, patch_size={c.patch_size}, eps={c.eps}, affine={c.affine}"
