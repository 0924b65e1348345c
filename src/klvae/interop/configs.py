"""The network's config as files record it: read from tensor shapes or a diffusers ``config.json``, and written
back as a diffusers ``config.json``.

Shapes fix every width and depth and which quant convs exist, but not the GroupNorm group count (a GroupNorm's
weights do not depend on it) nor the nominal ``resolution``: those default to the published values (32 groups,
256) and can be given explicitly. FLUX.2's latent BatchNorm (``bn.*``) is read the same way: its presence,
patch (square: channels / embed_dim = p²) and ``affine`` from the tensors, ``eps``/``momentum`` (not in the
weights) from the record or FLUX.2's defaults. diffusers calls such a VAE ``AutoencoderKLFlux2``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from klvae.interop.keys import BATCH_NORM_PREFIX, num_levels
from klvae.modules.config import LatentBatchNormConfig, NetworkConfig

__all__ = [
    "check_diffusers_compatible",
    "diffusers_config",
    "embed_dim_from_state_dict",
    "latent_batch_norm_from_state_dict",
    "network_from_diffusers_config",
    "network_from_state_dict",
    "quant_convs_in_state_dict",
]

DIFFUSERS_DOWN_BLOCK = "DownEncoderBlock2D"
DIFFUSERS_UP_BLOCK = "UpDecoderBlock2D"
DIFFUSERS_CLASS = "AutoencoderKL"
DIFFUSERS_FLUX2_CLASS = "AutoencoderKLFlux2"  # the same network plus the latent BatchNorm (`bn`)
# What each class's __init__ takes when config.json omits a key (diffusers 0.42; AutoencoderKLFlux2's are
# FLUX.2's published VAE). sample_size is only the nominal resolution: 256 (kl-f8's) where diffusers says 32.
_DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    DIFFUSERS_CLASS: {"block_out_channels": [64], "latent_channels": 4, "layers_per_block": 1,
                      "sample_size": 256},
    DIFFUSERS_FLUX2_CLASS: {"block_out_channels": [128, 256, 512, 512], "latent_channels": 32,
                            "layers_per_block": 2, "sample_size": 1024, "batch_norm_eps": 1e-4,
                            "batch_norm_momentum": 0.1, "patch_size": [2, 2]},
}  # fmt: skip


def quant_convs_in_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[bool, bool]:
    """``(use_quant_conv, use_post_quant_conv)`` of an LDM-layout state dict: whether their tensors exist.

    SD3's and FLUX.1's VAEs have neither (diffusers ``use_quant_conv``/``use_post_quant_conv`` false).
    """
    return "quant_conv.weight" in state_dict, "post_quant_conv.weight" in state_dict


def embed_dim_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Posterior channels: post_quant_conv's input width, else (no quant convs) the decoder's input width."""
    for key in ("post_quant_conv.weight", "decoder.conv_in.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[1])
    raise ValueError(
        "cannot infer embed_dim: neither post_quant_conv.weight nor decoder.conv_in.weight is present"
    )


def latent_batch_norm_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], recorded: LatentBatchNormConfig | None = None
) -> LatentBatchNormConfig | None:
    """FLUX.2's latent BatchNorm as the tensors have it (None without ``bn.running_mean``).

    The patch is square, ``sqrt(len(running_mean) / embed_dim)`` (2 for FLUX.2's 128 = 4 · 32), unless
    ``recorded`` has one of that area; ``affine`` is whether ``bn.weight`` exists; ``eps``/``momentum`` are not
    in the weights and come from ``recorded``, else FLUX.2's (1e-4, 0.1).

    Raises:
        ValueError: statistics whose length is no patch area times ``embed_dim``.
    """
    mean_key = BATCH_NORM_PREFIX + "running_mean"
    if mean_key not in state_dict:
        return None
    channels, embed_dim = int(state_dict[mean_key].numel()), embed_dim_from_state_dict(state_dict)
    area, rest = divmod(channels, embed_dim)
    if recorded is not None and recorded.patch_area == area and not rest:
        patch = recorded.patch_size
    else:
        side = round(area**0.5)
        if rest or side * side != area:
            raise ValueError(
                f"bn.running_mean has {channels} values: not a square patch times embed_dim={embed_dim}; "
                "give ddconfig.latent_batch_norm.patch_size"
            )
        patch = (side, side)
    base = recorded if recorded is not None else LatentBatchNormConfig()
    return LatentBatchNormConfig(
        patch_size=patch,
        eps=base.eps,
        momentum=base.momentum,
        affine=BATCH_NORM_PREFIX + "weight" in state_dict,
    )


def network_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    ddconfig: Mapping[str, Any] | None = None,
    resolution: int = 256,
    norm_num_groups: int | None = None,
) -> NetworkConfig:
    """The network an LDM-layout state dict belongs to.

    Args:
        state_dict: network tensors (``encoder.*``, ``decoder.*``, quant convs when present).
        ddconfig: when given, used instead of the shapes (needed only for widths that are not multiples of 32
            or a nominal resolution other than 256); ``embed_dim``, the quant convs and whether there is a
            latent BatchNorm (its patch and ``affine``) still come from the tensors, which cannot be wrong
            about them.
        resolution, norm_num_groups: what shapes cannot tell; ``norm_num_groups=None`` takes the published 32
            when it divides every width.

    Raises:
        ValueError: a required tensor is missing, widths are inconsistent, or 32 does not divide them.
    """
    use_quant_conv, use_post_quant_conv = quant_convs_in_state_dict(state_dict)
    embed_dim = embed_dim_from_state_dict(state_dict)
    if ddconfig is None:
        ddconfig = _ddconfig_from_shapes(state_dict, resolution, norm_num_groups)
    given = NetworkConfig.from_params(ddconfig, embed_dim, use_quant_conv, use_post_quant_conv)
    norm = latent_batch_norm_from_state_dict(state_dict, given.latent_batch_norm)
    if norm == given.latent_batch_norm:
        return given
    return NetworkConfig.from_params(
        {**ddconfig, "latent_batch_norm": None if norm is None else norm.to_dict()},
        embed_dim, use_quant_conv, use_post_quant_conv,
    )  # fmt: skip


def _ddconfig_from_shapes(
    state_dict: Mapping[str, torch.Tensor], resolution: int, norm_num_groups: int | None
) -> dict[str, Any]:
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise ValueError(
                f"cannot infer the network config: tensor {key!r} is missing from the state dict"
            )
        return state_dict[key].shape

    keys = list(state_dict)
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = num_levels(keys)
    ch_mult = []
    for i in range(levels):
        width = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"encoder.down.{i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    num_res_blocks = 1 + max(
        int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))
    )
    z_channels = shape("decoder.conv_in.weight")[1]
    attn_levels = sorted(
        {int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down\.(\d+)\.attn\.", k))}
    )
    widths = sorted({ch, *(ch * m for m in ch_mult)})
    if norm_num_groups is None:
        if any(w % 32 for w in widths):
            raise ValueError(
                f"block widths {widths} are not divisible by 32 and the GroupNorm group count cannot be read "
                "from weights: pass ddconfig (or norm_num_groups) explicitly"
            )
        norm_num_groups = 32
    return {
        "double_z": shape("encoder.conv_out.weight")[0] == 2 * z_channels,
        "z_channels": int(z_channels),
        "resolution": int(resolution),
        "in_channels": int(in_channels),
        "out_ch": int(shape("decoder.conv_out.weight")[0]),
        "ch": int(ch),
        "ch_mult": [int(m) for m in ch_mult],
        "num_res_blocks": int(num_res_blocks),
        "attn_resolutions": [resolution // 2**i for i in attn_levels],
        "dropout": 0.0,
        "norm_num_groups": int(norm_num_groups),
    }


def network_from_diffusers_config(config: Mapping[str, Any]) -> NetworkConfig:
    """Translate a diffusers ``AutoencoderKL`` or ``AutoencoderKLFlux2`` ``config.json`` into its network.

    Raises:
        ValueError: a diffusers option klvae's network cannot express (other block types or activation,
            no mid attention, widths not multiples of the first, a different decoder width).
    """
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls not in _DIFFUSERS_DEFAULTS:
        raise ValueError(
            f"config.json describes {cls!r}; klvae loads diffusers' {sorted(_DIFFUSERS_DEFAULTS)}"
        )
    config = {**_DIFFUSERS_DEFAULTS[cls], **config}
    blocks = list(config["block_out_channels"])
    decoder_blocks = config.get("decoder_block_out_channels")
    if decoder_blocks is not None and list(decoder_blocks) != blocks:
        raise ValueError(
            f"config.json decoder_block_out_channels={list(decoder_blocks)} differs from block_out_channels="
            f"{blocks}: klvae's decoder mirrors the encoder's widths"
        )
    for name, want in [("down_block_types", DIFFUSERS_DOWN_BLOCK), ("up_block_types", DIFFUSERS_UP_BLOCK)]:
        types = list(config.get(name, [want] * len(blocks)))
        if types != [want] * len(blocks):
            raise ValueError(
                f"config.json {name}={types}: only {len(blocks)}x {want!r} matches klvae's network"
            )
    for name, want in [("act_fn", "silu"), ("mid_block_add_attention", True)]:
        if config.get(name, want) != want:
            raise ValueError(
                f"config.json {name}={config[name]!r} is not supported (klvae's network needs {want!r})"
            )
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ValueError(
            f"config.json block_out_channels={blocks}: every width must be a multiple of the first"
        )
    latent = int(config["latent_channels"])
    sample_size = config["sample_size"]
    ddconfig = {
        "double_z": True,
        "z_channels": latent,
        "resolution": int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size),
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)),
        "ch": int(ch),
        "ch_mult": [b // ch for b in blocks],
        "num_res_blocks": int(config["layers_per_block"]),
        "attn_resolutions": [],
        "dropout": 0.0,
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
    }
    if cls == DIFFUSERS_FLUX2_CLASS:  # diffusers builds BatchNorm2d(affine=False, track_running_stats=True)
        ddconfig["latent_batch_norm"] = {
            "patch_size": list(config["patch_size"]),
            "eps": config["batch_norm_eps"],
            "momentum": config["batch_norm_momentum"],
            "affine": False,
        }
    flags = {name: config.get(name, True) for name in ("use_quant_conv", "use_post_quant_conv")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"config.json {name}={value!r} must be true or false")
    return NetworkConfig.from_params(ddconfig, latent, **flags)


def check_diffusers_compatible(network: NetworkConfig) -> None:
    """Raise ``ValueError`` when diffusers' ``AutoencoderKL`` cannot represent this network."""
    problems = []
    if network.attn_resolutions:
        problems.append(
            f"attn_resolutions={list(network.attn_resolutions)} (diffusers' DownEncoderBlock2D has no attention)"
        )
    if network.embed_dim != network.z_channels:
        problems.append(
            f"embed_dim={network.embed_dim} != z_channels={network.z_channels} (diffusers ties both to "
            "latent_channels)"
        )
    if network.ch_mult[0] != 1:
        problems.append(
            f"ch_mult[0]={network.ch_mult[0]} (diffusers' conv_in outputs block_out_channels[0], so it must be 1)"
        )
    if network.latent_batch_norm is not None and network.latent_batch_norm.affine:
        problems.append(
            "latent_batch_norm.affine=true (AutoencoderKLFlux2's BatchNorm has no weight and bias)"
        )
    if problems:
        raise ValueError("this network cannot be exported to diffusers: " + "; ".join(problems))


def diffusers_config(
    network: NetworkConfig, scaling_factor: float | None, shift_factor: float | None = None
) -> dict[str, Any]:
    """diffusers ``config.json`` content for this network (keys of its class's ``__init__``).

    ``AutoencoderKL``, or ``AutoencoderKLFlux2`` for a network with a latent BatchNorm (FLUX.2's pipeline
    normalises with the BatchNorm's statistics: that class has no scaling or shift factor).

    Args:
        network: must pass :func:`check_diffusers_compatible`.
        scaling_factor: 1/std of the latents (``klvae-latent-stats``); 0.18215 only for SD's VAE. Required for
            ``AutoencoderKL``, refused for ``AutoencoderKLFlux2``.
        shift_factor: mean of the latents, written only when not None (diffusers then uses
            ``(z - shift) * scale``).

    Raises:
        ValueError: an incompatible network, or factors missing / given for the wrong class.
    """
    check_diffusers_compatible(network)
    levels = len(network.ch_mult)
    norm = network.latent_batch_norm
    if norm is not None and (scaling_factor is not None or shift_factor is not None):
        raise ValueError(
            "this VAE normalises latents with its BatchNorm (diffusers AutoencoderKLFlux2, FLUX.2's pipeline): "
            "it takes no scaling_factor/shift_factor; fill the BatchNorm's statistics instead "
            "(klvae-export --batch-norm-stats)"
        )
    if norm is None and scaling_factor is None:
        raise ValueError("a diffusers config.json needs scaling_factor (measure it with klvae-latent-stats)")
    config: dict[str, Any] = {
        "_class_name": DIFFUSERS_CLASS if norm is None else DIFFUSERS_FLUX2_CLASS,
        "in_channels": network.in_channels,
        "out_channels": network.out_ch,
        "down_block_types": [DIFFUSERS_DOWN_BLOCK] * levels,
        "up_block_types": [DIFFUSERS_UP_BLOCK] * levels,
        "block_out_channels": [network.ch * m for m in network.ch_mult],
        "layers_per_block": network.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": network.z_channels,
        "norm_num_groups": network.norm_num_groups,
        "sample_size": network.resolution,
        "use_quant_conv": network.use_quant_conv,
        "use_post_quant_conv": network.use_post_quant_conv,
        "mid_block_add_attention": True,
    }
    if norm is not None:
        config.update(
            decoder_block_out_channels=None, batch_norm_eps=norm.eps, batch_norm_momentum=norm.momentum,
            patch_size=list(norm.patch_size),
        )  # fmt: skip
        return config
    config.update(scaling_factor=float(scaling_factor), force_upcast=True)
    if shift_factor is not None:
        config["shift_factor"] = float(shift_factor)
    return config
