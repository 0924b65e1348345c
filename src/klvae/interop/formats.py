"""Load a VAE from any published layout into klvae's network, strictly and without unsafe unpickling.

Accepted: an LDM/SD ``.ckpt`` (Lightning checkpoint or bare dict, with or without ``first_stage_model.``),
a klvae run checkpoint (EMA weights preferred), a file written by ``klvae-export``, a diffusers VAE folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``, or a pipeline folder with ``vae/``),
and a ``.safetensors`` file in either key layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klvae.interop.files import NETWORK_PREFIXES
from klvae.interop.keys import (
    ddconfig_from_diffusers_config,
    ddconfig_from_state_dict,
    detect_layout,
    diffusers_to_ldm,
    embed_dim_from_state_dict,
    quant_convs_in_state_dict,
)
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KLAutoencoder

__all__ = ["VAEWeights", "build_vae", "load_vae", "read_vae_weights"]

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# Keys of klvae-export metadata (safetensors metadata are strings; .ckpt stores the dict itself).
EXPORT_META_KEY = "klvae_export"


@dataclass
class VAEWeights:
    """Network weights in LDM layout plus what is known about them.

    Attributes:
        state_dict: the 248-style network keys (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``).
        ddconfig: LDM network config (from the file's metadata, a diffusers config, or tensor shapes).
        embed_dim: posterior channels.
        source_format: ``"ldm"``, ``"sd"``, ``"klvae"``, ``"klvae-export"`` or ``"diffusers"``.
        scaling_factor: latent scale factor when the source records one (diffusers config, export), else None.
        shift_factor: latent shift when recorded, else None.
        used_ema: whether EMA weights were taken from a run checkpoint.
        use_quant_conv: the file has ``quant_conv.*`` (False for SD3/FLUX.1 VAEs).
        use_post_quant_conv: the file has ``post_quant_conv.*``.
    """

    state_dict: dict[str, torch.Tensor]
    ddconfig: dict[str, Any]
    embed_dim: int
    source_format: str
    scaling_factor: float | None = None
    shift_factor: float | None = None
    used_ema: bool = False
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def network(self) -> NetworkConfig:
        """The typed, validated network these weights belong to."""
        return NetworkConfig.from_params(
            self.ddconfig, self.embed_dim, self.use_quant_conv, self.use_post_quant_conv
        )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError under weights_only: arbitrary Python objects inside
        raise ValueError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
            "Re-save it as a plain state dict or .safetensors from a trusted environment."
        ) from e


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a .safetensors or torch file; metadata holds hyper_parameters / export info."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if EXPORT_META_KEY in meta:
            meta[EXPORT_META_KEY] = json.loads(meta[EXPORT_META_KEY])
        return load_file(str(path), device="cpu"), meta
    obj = _torch_load(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        for key in ("hyper_parameters", EXPORT_META_KEY):
            if isinstance(obj.get(key), dict):
                meta[key] = obj[key]
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return obj, meta


def _network_only(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and k[len(prefix) :].startswith(NETWORK_PREFIXES)
    }


def _resolve_folder(folder: Path) -> tuple[Path, Path]:
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a full diffusers pipeline folder
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is a folder without config.json: not a diffusers VAE folder")
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return config, folder / name
    raise FileNotFoundError(f"{folder} has config.json but none of {list(DIFFUSERS_WEIGHT_NAMES)}")


def read_vae_weights(
    path: str | Path,
    ddconfig: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    use_ema: bool | None = None,
) -> VAEWeights:
    """Read VAE weights from any supported file or folder and convert them to LDM layout.

    Args:
        path: file (``.ckpt``/``.pth``/``.bin``/``.safetensors``) or diffusers folder.
        ddconfig: network config; overrides what the file says or shapes imply (needed only for
            bare state dicts whose widths are not multiples of 32, or non-256 nominal resolution).
        embed_dim: posterior channels; inferred when None.
        use_ema: for run checkpoints with ``ema.*`` weights: None takes them when present, True requires
            them, False takes the live weights.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unknown layout, unsafe pickle, EMA requested but absent, or config inference failed.
    """
    path = Path(path).expanduser()
    diffusers_config = None
    if path.is_dir():
        config_path, path = _resolve_folder(path)
        diffusers_config = json.loads(config_path.read_text())
    elif not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint {str(path)!r} does not exist")
    raw, meta = _read_file(path)
    layout = detect_layout(raw)
    used_ema = False
    scaling = shift = None
    meta_ddconfig, meta_embed = None, None

    if layout == "diffusers":
        state = diffusers_to_ldm(raw)
        if diffusers_config is not None:
            meta_ddconfig, meta_embed = ddconfig_from_diffusers_config(diffusers_config)
            scaling, shift = diffusers_config.get("scaling_factor"), diffusers_config.get("shift_factor")
    elif layout == "sd":
        state = _network_only(raw, "first_stage_model.")
    else:
        has_ema = any(k.startswith("ema.") for k in raw)
        if use_ema and not has_ema:
            raise ValueError(f"{path} has no EMA weights (no 'ema.*' keys); load it with use_ema=False")
        used_ema = bool(has_ema and use_ema is not False)
        state = _network_only(raw, "ema." if used_ema else "")
        hparams = meta.get("hyper_parameters", {})
        if "ddconfig" in hparams:
            meta_ddconfig, meta_embed = dict(hparams["ddconfig"]), hparams.get("embed_dim")
    export = meta.get(EXPORT_META_KEY)
    if isinstance(export, dict):
        layout = "klvae-export"
        meta_ddconfig, meta_embed = dict(export["ddconfig"]), export["embed_dim"]
        scaling, shift = export.get("scaling_factor"), export.get("shift_factor")

    if ddconfig is not None:
        final_ddconfig = dict(ddconfig)
    elif meta_ddconfig is not None:
        final_ddconfig = meta_ddconfig
    else:
        final_ddconfig, inferred_embed = ddconfig_from_state_dict(state)
        meta_embed = meta_embed or inferred_embed
    if embed_dim is None:
        embed_dim = meta_embed if meta_embed is not None else embed_dim_from_state_dict(state)
    # The tensors decide which quant convs exist, whatever the format (a diffusers config says the same).
    use_quant_conv, use_post_quant_conv = quant_convs_in_state_dict(state)
    if diffusers_config is not None:
        for name, present in [
            ("use_quant_conv", use_quant_conv),
            ("use_post_quant_conv", use_post_quant_conv),
        ]:
            if bool(diffusers_config.get(name, True)) != present:
                raise ValueError(
                    f"{path.parent}/config.json says {name}={diffusers_config.get(name, True)} but the weights "
                    f"{'have' if present else 'lack'} its tensors; fix config.json"
                )
    log.info("read %s weights from %s%s", layout, path, " (EMA)" if used_ema else "")
    return VAEWeights(
        state,
        final_ddconfig,
        int(embed_dim),
        layout,
        scaling,
        shift,
        used_ema,
        use_quant_conv,
        use_post_quant_conv,
    )


def build_vae(weights: VAEWeights) -> KLAutoencoder:
    """Build a :class:`KLAutoencoder` and load ``weights`` strictly (eval mode, no grad).

    Raises:
        ValueError: missing/unexpected keys or shape mismatches, each named.
    """
    model = KLAutoencoder(weights.network)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights.state_dict))
    unexpected = sorted(set(weights.state_dict) - set(own))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:8]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:8]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[:4]})")
        raise ValueError(
            f"{weights.source_format} weights do not match the network for ddconfig={weights.ddconfig}, "
            f"embed_dim={weights.embed_dim}: " + "; ".join(parts) + ". Pass the right ddconfig/embed_dim."
        )
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | Path,
    ddconfig: Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    use_ema: bool | None = None,
) -> KLAutoencoder:
    """Load any supported VAE file or folder into klvae's network (strict). See :func:`read_vae_weights`.

    Returns:
        :class:`KLAutoencoder` in eval mode with gradients off; ``encode(x)`` takes (B, 3, H, W) in [-1, 1].
    """
    return build_vae(read_vae_weights(path, ddconfig, embed_dim, use_ema))
