"""Where klvae looks for (and converters write) pretrained weights. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["cache_dir", "lpips_full_path", "torch_hub_checkpoint", "inception_path"]

# torchvision's ImageNet VGG16: the file torchvision itself caches, so users with internet share it.
VGG16_HUB_FILENAME = "vgg16-397923af.pth"


def cache_dir() -> Path:
    """``$KLVAE_CACHE``, else ``$XDG_CACHE_HOME/klvae``, else ``~/.cache/klvae`` (not created here)."""
    if os.environ.get("KLVAE_CACHE"):
        return Path(os.environ["KLVAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "klvae"


def lpips_full_path() -> Path:
    """A complete VGG-LPIPS state dict (trunk + linear heads) in the ``lpips`` package's key layout."""
    return cache_dir() / "lpips_vgg.pth"


def inception_path() -> Path:
    """The TF-FID Inception network (TorchScript) used for rFID."""
    return cache_dir() / "inception_fid.pt"


def torch_hub_checkpoint(filename: str) -> Path:
    """A file in torch's hub checkpoint cache (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename
