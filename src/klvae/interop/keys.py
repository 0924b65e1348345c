"""Key/shape mapping between LDM's ``first_stage_model`` layout and diffusers' ``AutoencoderKL`` layout.

klvae's network uses LDM's 248 names (CompVis/latent-diffusion). diffusers renames the same tensors; the mapping is a
bijection for the kl-f8 family (no attention inside the levels, ``embed_dim == z_channels``,
``ch_mult[0] == 1``), which :func:`check_diffusers_compatible` enforces. Loading any file into a network
lives in :mod:`klvae.interop.formats`; this module only renames, reshapes and translates configs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "check_diffusers_compatible",
    "ddconfig_from_diffusers_config",
    "ddconfig_from_state_dict",
    "detect_layout",
    "diffusers_config_from_ddconfig",
    "diffusers_to_ldm",
    "embed_dim_from_state_dict",
    "ldm_to_diffusers",
    "quant_convs_in_state_dict",
    "load_vae",
]

DIFFUSERS_DOWN_BLOCK = "DownEncoderBlock2D"
DIFFUSERS_UP_BLOCK = "UpDecoderBlock2D"
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
# diffusers < 0.14 saved the mid attention as query/key/value/proj_attn; such files are still around.
_ATTN_DIFFUSERS_TO_LDM.update({"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"})
_ATTN_WEIGHT = re.compile(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the key layout of a VAE state dict.

    Returns:
        ``"sd"`` (keys under ``first_stage_model.``), ``"klvae"`` (a klvae/LDM training checkpoint: network
        keys plus ``loss.*`` and/or ``ema.*``), ``"ldm"`` (bare network keys) or ``"diffusers"``.

    Raises:
        ValueError: none of these layouts (the message lists a few keys).
    """
    keys = list(state_dict)
    if any(k.startswith("first_stage_model.") for k in keys):
        return "sd"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    if any(k.startswith("encoder.down.") for k in keys):
        return "klvae" if any(k.startswith(("ema.", "loss.")) for k in keys) else "ldm"
    raise ValueError(
        f"unrecognised VAE state dict ({len(keys)} keys, e.g. {keys[:4]}): expected LDM/SD keys "
        "(encoder.down.0.block.0.conv1.weight, optionally under first_stage_model.) or diffusers keys "
        "(encoder.down_blocks.0.resnets.0.conv1.weight)"
    )


def _num_levels(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise ValueError(f"no keys match {pattern!r}: not a complete VAE state dict")
    return max(found) + 1


def ldm_key_to_diffusers(key: str, num_levels: int) -> str:
    """Rename one LDM key (``decoder.up.3.block.0.conv1.weight``) to diffusers' name."""
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    # LDM indexes decoder levels by resolution (up.{L-1} runs first); diffusers by execution order.
    k = re.sub(
        r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.", k
    )
    k = re.sub(r"^(decoder\.up_blocks\.\d+)\.block\.", r"\1.resnets.", k)
    k = re.sub(r"^(decoder\.up_blocks\.\d+)\.upsample\.", r"\1.upsamplers.0.", k)
    k = re.sub(r"\.mid\.block_(1|2)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
    k = re.sub(
        r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
        lambda m: f".mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[m.group(1)]}.",
        k,
    )
    k = k.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)


def diffusers_key_to_ldm(key: str, num_levels: int) -> str:
    """Rename one diffusers key to LDM's name (inverse of :func:`ldm_key_to_diffusers`)."""
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.", k
    )
    k = re.sub(r"^(decoder\.up\.\d+)\.resnets\.", r"\1.block.", k)
    k = re.sub(r"^(decoder\.up\.\d+)\.upsamplers\.0\.", r"\1.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(0|1)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    k = re.sub(
        r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.",
        lambda m: f".mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[m.group(1)]}.",
        k,
    )
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    return re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM-layout network state dict → diffusers ``AutoencoderKL`` state dict (same tensors, renamed).

    The mid-block attention projections are 1×1 convs in LDM, (C, C, 1, 1), and ``nn.Linear`` in
    diffusers, (C, C); they are squeezed. Non-network keys (``loss.*``) must be removed beforehand.
    """
    num_levels = _num_levels(list(state_dict), r"^decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        if _ATTN_WEIGHT.search(key):
            value = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) -> (C, C)
        out[ldm_key_to_diffusers(key, num_levels)] = value
    return out


def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict → LDM layout (attention weights back to (C, C, 1, 1))."""
    num_levels = _num_levels(list(state_dict), r"^decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        new = diffusers_key_to_ldm(key, num_levels)
        if _ATTN_WEIGHT.search(new) and value.dim() == 2:
            value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[new] = value
    return out


def ddconfig_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], resolution: int = 256, norm_num_groups: int | None = None
) -> tuple[dict[str, Any], int]:
    """Infer ``(ddconfig, embed_dim)`` from the tensor shapes of an LDM-layout state dict.

    Shapes fix every width and depth, but not the GroupNorm group count (a GroupNorm's weights do not
    depend on it) nor the nominal ``resolution``; those come from the arguments. With
    ``norm_num_groups=None`` the published value 32 is used when it divides every width.

    Raises:
        ValueError: a required tensor is missing, widths are inconsistent, or 32 does not divide them.
    """

    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise ValueError(
                f"cannot infer the network config: tensor {key!r} is missing from the state dict"
            )
        return state_dict[key].shape

    keys = list(state_dict)
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _num_levels(keys, r"^encoder\.down\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        width = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"encoder.down.{i} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    num_res_blocks = _num_levels(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
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
    ddconfig = {
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
    return ddconfig, embed_dim_from_state_dict(state_dict)


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


def ddconfig_from_diffusers_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Translate a diffusers ``AutoencoderKL`` ``config.json`` into ``(ddconfig, embed_dim)``.

    Raises:
        ValueError: a diffusers option klvae's network cannot express (other block types or activation,
            no mid attention, widths not multiples of the first). ``use_quant_conv``/``use_post_quant_conv``
            false (SD3, FLUX.1) are fine: the loader reads them from which tensors exist.
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
    for name, want in [
        ("act_fn", "silu"),
        ("mid_block_add_attention", True),
    ]:
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
    return ddconfig, latent


def check_diffusers_compatible(ddconfig: Mapping[str, Any], embed_dim: int) -> None:
    """Raise ``ValueError`` when diffusers' ``AutoencoderKL`` cannot represent this network."""
    problems = []
    if ddconfig.get("attn_resolutions"):
        problems.append(
            f"attn_resolutions={ddconfig['attn_resolutions']} (diffusers' DownEncoderBlock2D has no attention)"
        )
    if embed_dim != ddconfig["z_channels"]:
        problems.append(
            f"embed_dim={embed_dim} != z_channels={ddconfig['z_channels']} (diffusers ties both to latent_channels)"
        )
    if ddconfig["ch_mult"][0] != 1:
        problems.append(
            f"ch_mult[0]={ddconfig['ch_mult'][0]} (diffusers' conv_in outputs block_out_channels[0], so it must be 1)"
        )
    if not ddconfig.get("double_z", True):
        problems.append("double_z must be true")
    if problems:
        raise ValueError("this network cannot be exported to diffusers: " + "; ".join(problems))


def diffusers_config_from_ddconfig(
    ddconfig: Mapping[str, Any],
    embed_dim: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    use_quant_conv: bool = True,
    use_post_quant_conv: bool = True,
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` ``config.json`` content for this network (keys of its ``__init__``).

    Args:
        ddconfig: LDM network config.
        embed_dim: posterior channels; must equal ``z_channels``.
        scaling_factor: 1/std of the latents (``klvae-latent-stats``); 0.18215 only for SD's VAE.
        shift_factor: mean of the latents, written only when not None (diffusers then uses
            ``(z - shift) * scale``).
        use_quant_conv, use_post_quant_conv: whether the network has them (False in SD3/FLUX.1).
    """
    check_diffusers_compatible(ddconfig, embed_dim)
    levels = len(ddconfig["ch_mult"])
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "in_channels": int(ddconfig["in_channels"]),
        "out_channels": int(ddconfig["out_ch"]),
        "down_block_types": [DIFFUSERS_DOWN_BLOCK] * levels,
        "up_block_types": [DIFFUSERS_UP_BLOCK] * levels,
        "block_out_channels": [int(ddconfig["ch"] * m) for m in ddconfig["ch_mult"]],
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(ddconfig["z_channels"]),
        "norm_num_groups": int(ddconfig.get("norm_num_groups", 32)),
        "sample_size": int(ddconfig["resolution"]),
        "scaling_factor": float(scaling_factor),
        "force_upcast": True,
        "use_quant_conv": bool(use_quant_conv),
        "use_post_quant_conv": bool(use_post_quant_conv),
        "mid_block_add_attention": True,
    }
    if shift_factor is not None:
        config["shift_factor"] = float(shift_factor)
    return config


def load_vae(
    path: str,
    ddconfig: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    use_ema: bool | None = None,
):  # -> KLAutoencoder
    """Load any supported VAE file or folder strictly; see :func:`klvae.interop.formats.load_vae` (same function).

    Kept here so ``from klvae.interop.keys import load_vae`` works; the loader lives in :mod:`klvae.interop.formats`
    because it depends on this module's mapping.
    """
    from klvae.interop.formats import load_vae as _load_vae

    return _load_vae(path, ddconfig, embed_dim, use_ema)
