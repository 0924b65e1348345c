"""Discriminator weights on their own: warm-starting a GAN, and sharing one.

Stable Diffusion's VAE discriminator was never released (lavinal712/AutoencoderKL#6), so every fine-tune
restarts its GAN from scratch unless the user has one; REPA-E ships one for its SD-VAE
(``--disc-pretrained-ckpt``). klvae reads a discriminator from:

* a training checkpoint that carries one: ``loss.discriminator.*`` (a klvae run, LDM's kl-f8 ``.ckpt``);
* a discriminator file written by ``klvae-export --include-discriminator``: the discriminator's own keys
  (``main.0.weight`` ..., ``heads.*`` ...), with the ``{target, params}`` that built it in the metadata.

Both work for any discriminator type; :func:`check_discriminator_fits` names every key that does not fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from klvae.errors import ConfigError
from klvae.interop.keys import LOSS_PREFIX
from klvae.io.files import read_tensor_file, save_safetensors

__all__ = [
    "DISCRIMINATOR_META_KEY",
    "check_discriminator_fits",
    "discriminator_path_for",
    "read_discriminator_weights",
    "write_discriminator",
]

DISCRIMINATOR_PREFIX = LOSS_PREFIX + "discriminator."
DISCRIMINATOR_META_KEY = (
    "klvae_discriminator"  # {target, params} of the discriminator, in the file's metadata
)


def read_discriminator_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The discriminator's state dict (its own keys) and the recorded ``{target, params}`` (or {}).

    Raises:
        FileNotFoundError / ValueError: no readable file (see :func:`klvae.io.files.read_tensor_file`).
        ConfigError: the file holds no discriminator.
    """
    file = read_tensor_file(path)
    nested = {
        k.split(DISCRIMINATOR_PREFIX, 1)[1]: v for k, v in file.tensors.items() if DISCRIMINATOR_PREFIX in k
    }
    if nested:
        return nested, {}
    recorded = file.metadata.get(DISCRIMINATOR_META_KEY)
    if not isinstance(recorded, Mapping):
        raise ConfigError(
            f"disc_ckpt_path {str(path)!r} holds no discriminator: neither {DISCRIMINATOR_PREFIX}* tensors (a "
            "klvae or LDM training checkpoint) nor a file written by klvae-export --include-discriminator"
        )
    return dict(file.tensors), dict(recorded)


def check_discriminator_fits(
    path: str | os.PathLike,
    own: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    recorded: Mapping,
) -> None:
    """A :class:`~klvae.errors.ConfigError` naming the keys that are missing, extra or of another shape."""
    missing = sorted(set(own) - set(given))
    extra = sorted(set(given) - set(own))
    shapes = [f"{k}: file {tuple(given[k].shape)} vs config {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(given)) if given[k].shape != own[k].shape]  # fmt: skip
    if missing or extra or shapes:
        built_by = f" (the file's discriminator: {recorded.get('target')})" if recorded else ""
        raise ConfigError(
            f"disc_ckpt_path {str(path)!r} does not fit the configured discriminator{built_by}: "
            f"{len(missing)} missing (first: {missing[:3]}), {len(extra)} unexpected (first: {extra[:3]}), "
            f"{len(shapes)} of another shape (first: {shapes[:3]}); set lossconfig.params.discriminator_config "
            "(or disc_num_layers/disc_ndf) to the file's discriminator"
        )


def discriminator_path_for(out: str | os.PathLike) -> Path:
    """Where ``klvae-export --include-discriminator`` writes next to ``out``: ``my-vae/discriminator.safetensors``
    for a folder, ``my-vae.discriminator.safetensors`` beside a file."""
    out = Path(out)
    if out.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return out.with_name(out.stem + ".discriminator.safetensors")
    return out / "discriminator.safetensors"


def write_discriminator(
    loss_state_dict: Mapping[str, torch.Tensor], out: str | os.PathLike, config: Mapping[str, Any] | None
) -> Path:
    """Write the ``loss.discriminator.*`` tensors of a training checkpoint as a discriminator file.

    Args:
        loss_state_dict: the checkpoint's ``loss.*`` tensors (:attr:`klvae.interop.formats.VAEWeights.loss_state_dict`).
        out: the discriminator file (see :func:`discriminator_path_for`).
        config: the ``{target, params}`` that built it (None: taming's PatchGAN, LDM's default).
    """
    tensors = {
        k[len(DISCRIMINATOR_PREFIX) :]: v
        for k, v in loss_state_dict.items()
        if k.startswith(DISCRIMINATOR_PREFIX)
    }
    if not tensors:
        raise ConfigError("--include-discriminator: the checkpoint holds no loss.discriminator.* tensors")
    config = dict(config or {"target": "klvae.modules.discriminator.NLayerDiscriminator", "params": {}})
    return save_safetensors(tensors, out, metadata={DISCRIMINATOR_META_KEY: json.dumps(config)})
