"""LPIPS assembled from ``lpips.LPIPS``'s own pieces, optionally with the target image's branch outside autograd.

``lpips.LPIPS.forward(in0, in1)`` = Σ_l mean_{h,w} lin_l((n(φ_l(s(in0))) − n(φ_l(s(in1))))²), with s the
scaling layer, φ_l the VGG slices, n the channel-wise unit normalisation (eps 1e-10) and lin_l a 1×1 conv.
The trunk is called as ``model.net(...)`` (``Module.__call__``), so a compiled trunk (``Module.compile()``)
is used; ``lpips.LPIPS.forward`` calls ``net.forward`` and would silently bypass it.
With ``target_no_grad`` φ(s(target)) is evaluated under ``no_grad``: the target (the input image) never
needs a gradient, so nothing of its branch can be kept for backward even if a caller makes ``target``
require grad. Only ``lpips.LPIPS(net="vgg", lpips=True, spatial=False, version="0.1")`` is supported, the
configuration the loss uses.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["lpips_distance", "lpips_features"]


def _check(model: torch.nn.Module) -> None:
    if (
        getattr(model, "version", "0.1") != "0.1"
        or getattr(model, "spatial", False)
        or not getattr(model, "lpips", True)
    ):
        raise ValueError(
            "lpips_distance supports lpips.LPIPS(lpips=True, spatial=False, version='0.1') only "
            "(the configuration klvae.modules.perceptual.load_lpips builds)"
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
