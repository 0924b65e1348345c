"""Shared helpers of the interop tests: random weights that expose a wrong mapping, and diffusers' own model."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from klvae.interop.configs import diffusers_config
from klvae.interop.keys import ldm_to_diffusers
from klvae.modules.config import NetworkConfig


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter random, in eval mode.

    Default init leaves GroupNorm at (1, 0); random values make a wrong mapping visible in outputs.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def diffusers_from(ddconfig: dict, state: dict) -> DiffusersAutoencoderKL:
    """diffusers' ``AutoencoderKL`` for a 4-channel ``ddconfig``, loaded strictly from an LDM-layout state dict."""
    config = diffusers_config(NetworkConfig.from_params(ddconfig, 4), scaling_factor=0.5)
    config.pop("_class_name")
    model = DiffusersAutoencoderKL(**config)
    model.load_state_dict(ldm_to_diffusers(state), strict=True)
    return model.eval()
