"""Encode/decode API for people who only use a trained VAE: no LPIPS, no discriminator, no Lightning.

Example::

    vae = InferenceVAE.from_pretrained("my-vae/", device="cuda")   # any format klvae.interop.formats reads
    z = vae.encode(images, scale=True)                              # (B, 4, H/8, W/8), diffusion-ready
    x = vae.decode(z, scale=True, tile_size=512)                    # tiled: 1024² and beyond on one GPU

A FLUX.2-shaped VAE (``AutoencoderKLFlux2``) has no scale/shift factors: ``scale=True`` gives the latents FLUX.2's
transformer sees, 2×2 patches normalised by the VAE's BatchNorm statistics, ``(B, 128, H/16, W/16)``, and
``decode(z, scale=True)`` takes them back (:class:`klvae.modules.latent_norm.LatentBatchNorm`).

Tiling runs the network on overlapping tiles and blends them with linear ramps over the overlap, so
memory depends on the tile, not the image. Far from seams the result is close to the untiled one; it is
not identical, because the mid-block self-attention and GroupNorm statistics see a tile, not the image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from klvae.errors import ConfigError
from klvae.interop.formats import build_vae, read_vae_weights
from klvae.modules.distributions import DiagonalGaussianDistribution
from klvae.modules.vae import KLAutoencoder

__all__ = ["InferenceVAE", "resolve_device", "tiled_apply"]


def resolve_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """The tools' ``--device`` as a ``torch.device`` that this machine has.

    Raises:
        ConfigError: not a device name, or a CUDA/MPS device that is not there; the message says what to use.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {str(device)!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{flag} {str(device)!r}: no CUDA GPU is visible on this machine (torch.cuda.is_available() is "
                "False); use --device cpu, or check CUDA_VISIBLE_DEVICES and the driver"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"{flag} {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {str(device)!r}: MPS is not available on this machine; use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag} {str(device)!r}: klvae's tools run on cpu, cuda[:N] or mps")
    return resolved


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]  # the last tile is flush with the border (overlaps more if needed)


def _ramp(length: int, overlap: int, left: bool, right: bool, device: torch.device) -> torch.Tensor:
    """1-D blend weights: rising over ``overlap`` on sides that touch another tile, 1 elsewhere."""
    w = torch.ones(length, device=device)
    if overlap > 0:
        rise = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        if left:
            w[:overlap] = torch.minimum(w[:overlap], rise)
        if right:
            w[-overlap:] = torch.minimum(w[-overlap:], rise.flip(0))
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """Apply a resolution-changing ``fn`` tile by tile and blend the outputs linearly over overlaps.

    Args:
        fn: maps (B, C, h, w) to (B, C', h·scale, w·scale).
        x: input (B, C, H, W).
        tile: tile side in input pixels (tiles are clipped to the input when it is smaller).
        overlap: overlap between neighbouring tiles in input pixels, ``0 <= overlap < tile``.
        scale: output/input resolution ratio (8 for decode, 1/8 for encode at f = 8).

    Returns:
        (B, C', H·scale, W·scale). With a single tile covering ``x`` this equals ``fn(x)`` exactly.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must satisfy 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    _, _, height, width = x.shape
    th, tw = min(tile, height), min(tile, width)
    rows, cols = _tile_starts(height, th, tile - overlap), _tile_starts(width, tw, tile - overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    ov_out = int(round(overlap * scale))
    out = weight = None
    for top in rows:
        for left in cols:
            y = fn(x[:, :, top : top + th, left : left + tw]).float()  # (B, C', th·s, tw·s)
            oh, ow = y.shape[-2:]
            t, lft = int(round(top * scale)), int(round(left * scale))
            if out is None:
                out = y.new_zeros(
                    y.shape[0], y.shape[1], int(round(height * scale)), int(round(width * scale))
                )
                weight = y.new_zeros(1, 1, out.shape[2], out.shape[3])
            wy = _ramp(oh, ov_out, top > 0, top + th < height, y.device)
            wx = _ramp(ow, ov_out, left > 0, left + tw < width, y.device)
            w = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, oh, ow)
            out[:, :, t : t + oh, lft : lft + ow] += y * w
            weight[:, :, t : t + oh, lft : lft + ow] += w
    return out / weight


class InferenceVAE(nn.Module):
    """A loaded VAE plus its latent scale/shift, with (optionally tiled) encode and decode.

    Args:
        model: the network (see :func:`klvae.interop.formats.load_vae`).
        scaling_factor: latent scale (1/std); needed only for ``scale=True``. None for a network with a
            latent BatchNorm (FLUX.2), which normalises with its statistics instead.
        shift_factor: latent shift (mean); 0 when None.

    Raises:
        ValueError: factors given for a network with a latent BatchNorm.
    """

    def __init__(
        self, model: KLAutoencoder, scaling_factor: float | None = None, shift_factor: float | None = None
    ) -> None:
        if model.bn is not None and (scaling_factor is not None or shift_factor is not None):
            raise ValueError(
                "this VAE normalises latents with its BatchNorm (FLUX.2): scale=True uses its running statistics, "
                f"so scaling_factor={scaling_factor}/shift_factor={shift_factor} do not apply; pass neither"
            )
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.downsampling = model.network.downsampling  # f (8 for kl-f8)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        ddconfig: Mapping[str, Any] | None = None,
        use_ema: bool | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> InferenceVAE:
        """Load from any format :func:`klvae.interop.formats.read_vae_weights` accepts.

        ``scaling_factor``/``shift_factor`` default to what the source records (diffusers config, export).
        ``dtype`` bfloat16 halves memory; float16 can overflow in this network.
        """
        weights = read_vae_weights(path, ddconfig, use_ema)
        vae = cls(
            build_vae(weights),
            scaling_factor if scaling_factor is not None else weights.scaling_factor,
            shift_factor if shift_factor is not None else weights.shift_factor,
        )
        return vae.to(device=device, dtype=dtype)

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def _check_scale(self) -> float:  # the factors' scale; a latent BatchNorm needs none
        if self.scaling_factor is None:
            raise ValueError(
                "scale=True needs a scaling_factor: pass scaling_factor= to from_pretrained (klvae-latent-stats "
                "computes it) or call with scale=False"
            )
        return self.scaling_factor

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x.to(self._param)).parameters  # (b, 2·embed_dim, h/f, w/f)

    @torch.inference_mode()
    def posterior(
        self, x: torch.Tensor, tile_size: int | None = None, tile_overlap: int = 64
    ) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] → the posterior over raw latents (B, embed_dim, H/f, W/f), float32.

        ``tile_size``/``tile_overlap`` as in :meth:`encode`.
        """
        f = self.downsampling
        if tile_size is None:
            return DiagonalGaussianDistribution(self._moments(x).float())
        if tile_size % f or tile_overlap % f:
            raise ValueError(
                f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of f={f}"
            )
        return DiagonalGaussianDistribution(tiled_apply(self._moments, x, tile_size, tile_overlap, 1.0 / f))

    @torch.inference_mode()
    def encode(
        self,
        x: torch.Tensor,
        sample: bool = False,
        scale: bool = False,
        tile_size: int | None = None,
        tile_overlap: int = 64,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → latents (B, embed_dim, H/f, W/f), float32.

        Args:
            sample: draw from the posterior (LDM's convention for training a diffusion model) instead of
                returning its mean.
            scale: return the diffusion model's latents: ``(z - shift_factor) · scaling_factor``; with a latent
                BatchNorm (FLUX.2) the normalised 2×2 patches instead, (B, 4·embed_dim, H/2f, W/2f), as
                diffusers' ``Flux2Pipeline`` prepares them (posterior mean: ``sample=False``, its "argmax").
            tile_size: encode in tiles of this many image pixels (None: whole image).
            tile_overlap: overlap between tiles in image pixels.
            generator: RNG for ``sample``.
        """
        posterior = self.posterior(x, tile_size, tile_overlap)
        z = posterior.sample(generator) if sample else posterior.mode()
        if scale and self.model.bn is not None:
            return self.model.bn.normalize(z)
        if scale:
            z = (z - (self.shift_factor or 0.0)) * self._check_scale()
        return z

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.to(self._param))

    @torch.inference_mode()
    def decode(
        self, z: torch.Tensor, scale: bool = False, tile_size: int | None = None, tile_overlap: int = 64
    ) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) → images (B, 3, h·f, w·f), float32, roughly in [-1, 1] (not clamped).

        Args:
            scale: ``z`` is in the diffusion model's space; undo ``(z - shift) · scale`` first (with a latent
                BatchNorm: ``z`` is FLUX.2's normalised patches (B, 4·embed_dim, h/2, w/2), denormalised and
                unpatchified first).
            tile_size: decode tiles of this many *image* pixels (e.g. 512), None: whole image.
            tile_overlap: overlap between tiles in image pixels (a multiple of f).
        """
        if scale and self.model.bn is not None:
            z = self.model.bn.denormalize(z.float())
        elif scale:
            z = z / self._check_scale() + (self.shift_factor or 0.0)
        if tile_size is None:
            return self._decode(z).float()
        f = self.downsampling
        if tile_size % f or tile_overlap % f:
            raise ValueError(
                f"tile_size={tile_size} and tile_overlap={tile_overlap} must be multiples of f={f}"
            )
        return tiled_apply(self._decode, z, tile_size // f, tile_overlap // f, float(f))
