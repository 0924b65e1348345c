"""Reading LDM/SD-layout weights from disk, safely (``weights_only`` / safetensors, never pickle)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["FIRST_STAGE_PREFIX", "NETWORK_PREFIXES", "read_state_dict", "select_first_stage"]

FIRST_STAGE_PREFIX = "first_stage_model."
NETWORK_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file (bare dict or Lightning checkpoint).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no tensor mapping, or needs unsafe unpickling.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated header, bad JSON, cut-off data
            raise ValueError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError under weights_only: arbitrary objects inside
        raise ValueError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
            "Re-save it as a plain state dict or .safetensors from a trusted environment."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return obj


def select_first_stage(
    state_dict: dict[str, torch.Tensor], ignore_keys: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Strip SD's ``first_stage_model.`` prefix (keeping only those keys when present) and drop keys that
    start with any of ``ignore_keys``."""
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state_dict):
        state_dict = {
            k[len(FIRST_STAGE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(FIRST_STAGE_PREFIX)
        }
    ignore = tuple(ignore_keys)
    return {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
