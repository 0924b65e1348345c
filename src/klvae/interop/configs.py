"""The network's config as files record it: read from tensor shapes or a diffusers ``config.json``, and written
back as a diffusers ``config.json``.

Shapes fix every width and depth and which quant convs exist, but not the GroupNorm group count (a GroupNorm's
weights do not depend on it) nor the nominal ``resolution``: those default to the published values (32 groups,
256) and can be given explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from klvae.interop.keys import num_levels
from klvae.modules.config import NetworkConfig

__all__ = [
    "check_diffusers_compatible",
    "diffusers_config",
    "embed_dim_from_state_dict",
    "network_from_diffusers_config",
    "network_from_state_dict",
    "quant_convs_in_state_dict",
]

DIFFUSERS_DOWN_BLOCK = "DownEncoderBlock2D"
DIFFUSERS_UP_BLOCK = "UpDecoderBlock2D"


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
            or a nominal resolution other than 256); ``embed_dim`` and the quant convs still come from the
            tensors, which cannot be wrong about them.
        resolution, norm_num_groups: what shapes cannot tell; ``norm_num_groups=None`` takes the published 32
            when it divides every width.

    Raises:
        ValueError: a required tensor is missing, widths are inconsistent, or 32 does not divide them.
    """
    use_quant_conv, use_post_quant_conv = quant_convs_in_state_dict(state_dict)
    embed_dim = embed_dim_from_state_dict(state_dict)
    if ddconfig is None:
        ddconfig = _ddconfig_from_shapes(state_dict, resolution, norm_num_groups)
    return NetworkConfig.from_params(ddconfig, embed_dim, use_quant_conv, use_post_quant_conv)


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
    """Translate a diffusers ``AutoencoderKL`` ``config.json`` into the network it describes.

    Raises:
        ValueError: a diffusers option klvae's network cannot express (other block types or activation,
            no mid attention, widths not multiples of the first).
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"config.json describes {cls!r}; only diffusers' AutoencoderKL can be loaded")
    blocks = list(config.get("block_out_channels", [64]))
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
    latent = int(config.get("latent_channels", 4))
    ddconfig = {
        "double_z": True,
        "z_channels": latent,
        "resolution": int(config.get("sample_size", 256)),
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)),
        "ch": int(ch),
        "ch_mult": [b // ch for b in blocks],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "attn_resolutions": [],
        "dropout": 0.0,
        "norm_num_groups": int(config.get("norm_num_groups", 32)),
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
    if problems:
        raise ValueError("this network cannot be exported to diffusers: " + "; ".join(problems))


def diffusers_config(
    network: NetworkConfig, scaling_factor: float, shift_factor: float | None = None
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` ``config.json`` content for this network (keys of its ``__init__``).

    Args:
        network: must pass :func:`check_diffusers_compatible`.
        scaling_factor: 1/std of the latents (``klvae-latent-stats``); 0.18215 only for SD's VAE.
        shift_factor: mean of the latents, written only when not None (diffusers then uses
            ``(z - shift) * scale``).
    """
    check_diffusers_compatible(network)
    levels = len(network.ch_mult)
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
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
        "scaling_factor": float(scaling_factor),
        "force_upcast": True,
        "use_quant_conv": network.use_quant_conv,
        "use_post_quant_conv": network.use_post_quant_conv,
        "mid_block_add_attention": True,
    }
    if shift_factor is not None:
        config["shift_factor"] = float(shift_factor)
    return config
