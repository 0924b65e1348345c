"""Shared helpers of the interop tests: random weights that expose a wrong mapping, and diffusers' own model."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

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


@cache
def flux2_pipeline_functions() -> dict[str, Callable[..., Any]]:
    """diffusers' own latent code of ``Flux2Pipeline`` (``pipelines/flux2/pipeline_flux2.py``), compiled from the
    installed source: ``_patchify_latents``, ``_unpatchify_latents``, ``_encode_vae_image`` and
    ``retrieve_latents``.

    The pipeline module imports ``transformers`` (its text encoder), which this environment does not have, so the
    functions are read out of the file and compiled alone; ``_encode_vae_image`` takes the pipeline as ``self``
    and reads only ``self.vae`` and ``self._patchify_latents``. All four share one namespace (with ``torch``), as
    in the module.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("diffusers")
    path = Path(spec.origin).parent / "pipelines" / "flux2" / "pipeline_flux2.py"
    tree = ast.parse(path.read_text())
    wanted = {"_patchify_latents", "_unpatchify_latents", "_encode_vae_image", "retrieve_latents"}
    found: list[ast.FunctionDef] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []  # @staticmethod: called as plain functions here
            found.append(node)
    assert {f.name for f in found} == wanted, (
        f"diffusers' {path.name} changed: found {[f.name for f in found]}"
    )
    namespace: dict[str, Any] = {"torch": torch}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in wanted}


def flux2_pipeline_latents(vae: Any, image: torch.Tensor) -> torch.Tensor:
    """What ``Flux2Pipeline._encode_vae_image`` gives FLUX.2's transformer for ``image`` (B, 3, H, W):
    normalised 2×2 patches (B, 4·C, H/16, W/16)."""
    from types import SimpleNamespace

    fns = flux2_pipeline_functions()
    pipeline = SimpleNamespace(vae=vae, _patchify_latents=fns["_patchify_latents"])
    with torch.no_grad():
        return fns["_encode_vae_image"](pipeline, image=image, generator=None)


def flux2_pipeline_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """What ``Flux2Pipeline.__call__`` decodes from the transformer's latents (B, 4·C, h, w): its inline
    denormalisation ``latents · sqrt(running_var + batch_norm_eps) + running_mean``, ``_unpatchify_latents``,
    then ``vae.decode``."""
    unpatchify = flux2_pipeline_functions()["_unpatchify_latents"]
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        return vae.decode(unpatchify(latents * std + mean), return_dict=False)[0]
