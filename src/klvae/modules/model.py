"""Encoder and Decoder of the KL-f8 autoencoder (Rombach et al., LDM, CVPR 2022; CompVis/latent-diffusion `ldm/modules/diffusionmodules/model.py`), in plain torch.

Module names reproduce LDM's layout exactly (``down.{i}.block.{j}``, ``mid.attn_1.q``, ``up.{i}.upsample``
...) so that Latent/Stable Diffusion ``first_stage_model`` weights load with ``strict=True``. Both classes
take the same ``ddconfig`` keys (LDM's vocabulary) so one YAML block builds both; keys that only concern
the other side (``out_ch`` for the encoder, ``double_z`` for the decoder) are accepted and ignored by
design, any other key is a ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample", "validate_ddconfig"]


def Normalize(channels: int, num_groups: int) -> nn.GroupNorm:  # noqa: N802 (LDM's name)
    # eps 1e-6 (not torch's 1e-5) matters for exact agreement with the published weights.
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm → SiLU → dropout → conv3×3, plus a (1×1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm_num_groups: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, residual. q/k/v/proj_out are 1×1 convs."""

    def __init__(self, channels: int, norm_num_groups: int) -> None:
        super().__init__()
        self.norm = Normalize(channels, norm_num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, H·W, C): one head whose tokens are the pixels, SDPA's (batch, heads, L, E).
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c") for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v, flash/mem-efficient on GPU
        y = rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a stride-2 3×3 conv without padding (LDM kl-f8's choice)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric: a symmetric padding=1 would shift the sampling grid by a pixel against LDM's weights.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour ×2 then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def validate_ddconfig(
    *,
    ch: int,
    out_ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    dropout: float,
    in_channels: int,
    resolution: int,
    z_channels: int,
    norm_num_groups: int,
) -> None:
    """Raise ``ValueError`` naming the first invalid ``ddconfig`` value."""

    def positive_int(name: str, value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"ddconfig.{name} must be a positive integer, got {value!r}")

    for name, value in [
        ("ch", ch),
        ("out_ch", out_ch),
        ("in_channels", in_channels),
        ("resolution", resolution),
        ("z_channels", z_channels),
        ("norm_num_groups", norm_num_groups),
    ]:
        positive_int(name, value)
    if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
        raise ValueError(f"ddconfig.num_res_blocks must be an integer >= 1, got {num_res_blocks!r}")
    if not isinstance(ch_mult, Sequence) or len(ch_mult) == 0:
        raise ValueError(f"ddconfig.ch_mult must be a non-empty list of positive integers, got {ch_mult!r}")
    for m in ch_mult:
        positive_int("ch_mult entries", m)
    for width in {ch, *(ch * m for m in ch_mult)}:
        if width % norm_num_groups:
            raise ValueError(
                f"ddconfig.norm_num_groups={norm_num_groups} must divide every block width "
                f"(ch * ch_mult = {[ch * m for m in ch_mult]}); {width} is not divisible"
            )
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(
            f"ddconfig.resolution={resolution} must be divisible by 2**(len(ch_mult)-1) = {factor}"
        )
    if not isinstance(attn_resolutions, Sequence):
        raise ValueError(f"ddconfig.attn_resolutions must be a list of resolutions, got {attn_resolutions!r}")
    if not (isinstance(dropout, int | float) and 0.0 <= dropout < 1.0):
        raise ValueError(f"ddconfig.dropout must be in [0, 1), got {dropout!r}")


class _Mid(nn.Module):
    """ResnetBlock → self-attention → ResnetBlock at the lowest resolution (names as in LDM)."""

    def __init__(self, channels: int, dropout: float, norm_num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_num_groups)
        self.attn_1 = AttnBlock(channels, norm_num_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_num_groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (maybe empty), then down/upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


def _run(module: nn.Module, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    # Activation checkpointing per ResnetBlock trades ~30 % more compute for far less memory (512² training).
    if use_checkpoint and torch.is_grad_enabled() and h.requires_grad:
        return checkpoint(module, h, use_reentrant=False)
    return module(h)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) → moments (B, 2·z_channels, H/f, W/f) with f = 2**(len(ch_mult)-1).

    Args:
        ch: base width (128 for kl-f8); level i has width ``ch * ch_mult[i]``.
        out_ch: decoder output channels; accepted so one ``ddconfig`` builds both halves.
        ch_mult: width multipliers per level, e.g. ``[1, 2, 4, 4]``.
        num_res_blocks: ResnetBlocks per level.
        attn_resolutions: resolutions at which levels also get self-attention (``[]`` for kl-f8).
        dropout: dropout inside ResnetBlocks.
        in_channels: image channels.
        resolution: nominal training resolution (used to place ``attn_resolutions``).
        z_channels: latent channels.
        double_z: output mean and log-variance (2·z_channels) rather than z_channels.
        norm_num_groups: GroupNorm groups (32 in the published models; small values for tiny tests).
        gradient_checkpointing: recompute ResnetBlock activations in backward to save memory.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        validate_ddconfig(
            ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
            resolution=resolution, z_channels=z_channels, norm_num_groups=norm_num_groups,
        )  # fmt: skip
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_num_groups))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, norm_num_groups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(
        self, x: torch.Tensor, return_last_input: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Moments (B, 2·z_channels, H/f, W/f); with ``return_last_input`` also ``conv_out``'s input
        (B, C, H/f, W/f), which adaptive loss weights differentiate against (:mod:`klvae.modules.adaptive`)."""
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = _run(level.block[i_block], h, ckpt)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = _run(self.mid, h, ckpt)  # (B, ch·ch_mult[-1], H/f, W/f)
        last_input = F.silu(self.norm_out(h))
        out = self.conv_out(last_input)  # (B, 2·z_channels, H/f, W/f)
        return (out, last_input) if return_last_input else out


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, out_ch, h·f, w·f).

    ``up`` is indexed by resolution like the encoder's ``down``: ``up[0]`` is the full-resolution level and
    ``up[len(ch_mult)-1]`` the lowest, which runs first. Arguments are those of :class:`Encoder`.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        validate_ddconfig(
            ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
            resolution=resolution, z_channels=z_channels, norm_num_groups=norm_num_groups,
        )  # fmt: skip
        del double_z  # only the encoder's output width depends on it
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.gradient_checkpointing = gradient_checkpointing

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, norm_num_groups)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):  # build lowest resolution first
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_num_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_num_groups))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)  # keep LDM's indexing: up[0] is full resolution
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(
        self, z: torch.Tensor, return_last_input: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image (B, out_ch, h·f, w·f); with ``return_last_input`` also ``conv_out``'s input (B, C, h·f, w·f),
        for the adaptive GAN weight (:mod:`klvae.modules.adaptive`): no forward hook, works compiled."""
        ckpt = self.gradient_checkpointing
        h = self.conv_in(z)  # (B, ch·ch_mult[-1], h, w)
        h = _run(self.mid, h, ckpt)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = _run(level.block[i_block], h, ckpt)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        last_input = F.silu(self.norm_out(h))
        out = self.conv_out(last_input)  # (B, out_ch, h·f, w·f)
        return (out, last_input) if return_last_input else out
