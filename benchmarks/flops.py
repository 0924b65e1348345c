"""FLOPs of the autoencoder and LPIPS: counted by ``FlopCounterMode`` and derived from the config by hand.

The counted number is what MFU uses; the analytic one (convolutions and attention only, 2 FLOP per
multiply-add) cross-checks it. Counting on the ``meta`` device costs no compute, so the full kl-f8 model at
256² is counted in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from klvae.modules.config import NetworkConfig

__all__ = ["analytic_codec_flops", "analytic_vgg_lpips_flops", "count_flops", "count_module_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (matmul/conv/attention, forward and whatever backward ``fn`` runs) of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_module_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``module(*inputs)`` under ``no_grad`` (run on ``meta`` tensors to make it free)."""
    with torch.no_grad():
        return count_flops(lambda: module(*inputs))


def _conv(c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * c_in * c_out * k * k * h_out * w_out


def _resnet(c_in: int, c_out: int, h: int, w: int) -> int:
    flops = _conv(c_in, c_out, 3, h, w) + _conv(c_out, c_out, 3, h, w)
    return flops + (_conv(c_in, c_out, 1, h, w) if c_in != c_out else 0)


def _attn(c: int, h: int, w: int) -> int:
    n = h * w
    return 4 * _conv(c, c, 1, h, w) + 2 * (2 * n * n * c)  # q, k, v, proj_out; q·kᵀ and attn·v


def _mid(c: int, h: int, w: int) -> int:
    return 2 * _resnet(c, c, h, w) + _attn(c, h, w)


def analytic_codec_flops(network: NetworkConfig, height: int, width: int) -> dict[str, int]:
    """Forward FLOPs per image of encoder (+quant_conv) and (post_quant_conv +) decoder.

    Args:
        network: the network's shape (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, quant convs).
        height, width: image size (multiples of the downsampling factor).

    Returns:
        ``{"encoder": ..., "decoder": ...}`` in FLOPs (2 per multiply-add; norms and activations ignored).
    """
    ddconfig, embed_dim = network.network_kwargs(), network.embed_dim
    use_quant_conv, use_post_quant_conv = network.use_quant_conv, network.use_post_quant_conv
    ch, mult = ddconfig["ch"], list(ddconfig["ch_mult"])
    nrb, attn_res = ddconfig["num_res_blocks"], set(ddconfig.get("attn_resolutions", ()))
    z, res = ddconfig["z_channels"], ddconfig["resolution"]
    levels = len(mult)
    enc = _conv(ddconfig["in_channels"], ch, 3, height, width)
    h, w, cur, c_in = height, width, res, ch
    for i, m in enumerate(mult):
        for _ in range(nrb):
            enc += _resnet(c_in, ch * m, h, w)
            c_in = ch * m
            enc += _attn(c_in, h, w) if cur in attn_res else 0
        if i != levels - 1:
            h, w, cur = h // 2, w // 2, cur // 2
            enc += _conv(c_in, c_in, 3, h, w)  # stride-2 conv, output size
    enc += _mid(c_in, h, w) + _conv(c_in, 2 * z, 3, h, w)
    enc += _conv(2 * z, 2 * embed_dim, 1, h, w) if use_quant_conv else 0

    dec = _conv(embed_dim, z, 1, h, w) if use_post_quant_conv else 0
    dec += _conv(z, ch * mult[-1], 3, h, w)
    c_in = ch * mult[-1]
    dec += _mid(c_in, h, w)
    for i in reversed(range(levels)):
        for _ in range(nrb + 1):
            dec += _resnet(c_in, ch * mult[i], h, w)
            c_in = ch * mult[i]
            dec += _attn(c_in, h, w) if cur in attn_res else 0
        if i != 0:
            h, w, cur = h * 2, w * 2, cur * 2
            dec += _conv(c_in, c_in, 3, h, w)
    dec += _conv(c_in, ddconfig["out_ch"], 3, h, w)
    return {"encoder": enc, "decoder": dec}


# VGG16 features up to relu5_3 as LPIPS uses them: (in, out) per 3×3 conv, grouped by resolution stage.
_VGG16_STAGES: Sequence[Sequence[tuple[int, int]]] = (
    ((3, 64), (64, 64)),
    ((64, 128), (128, 128)),
    ((128, 256), (256, 256), (256, 256)),
    ((256, 512), (512, 512), (512, 512)),
    ((512, 512), (512, 512), (512, 512)),
)


def analytic_vgg_lpips_flops(height: int, width: int) -> int:
    """Forward FLOPs of VGG-LPIPS on one image *pair* (two trunks; the 1×1 heads are included)."""
    trunk, heads, h, w = 0, 0, height, width
    for stage, convs in enumerate(_VGG16_STAGES):
        if stage:
            h, w = h // 2, w // 2  # max-pool between stages
        trunk += sum(_conv(ci, co, 3, h, w) for ci, co in convs)
        heads += _conv(convs[-1][1], 1, 1, h, w)
    return 2 * trunk + heads
