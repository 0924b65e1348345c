#!/usr/bin/env python
"""Activation memory of klvae's autoencoder update at any resolution, counted exactly without computing.

The model is built on the ``meta`` device (shapes only, no storage, no FLOPs), and a saved-tensor hook
adds up the bytes autograd keeps for the backward pass of one autoencoder update: the encoder (unless
decoder-only), the decoder, VGG-LPIPS and, after ``disc_start``, the PatchGAN discriminator on x̂. That is
the part of a training step's memory that grows with the resolution and the batch size (weights, gradients
and Adam state are fixed: 4 × 4 bytes per trainable parameter). fp32 only: autocast does not act on meta
tensors (under bf16-mixed convolutions save bf16 inputs, GroupNorm keeps fp32; measure that on a GPU with
``benchmarks/train_step.py``). One JSON line per configuration.

    python benchmarks/activation_memory.py --resolution 256 512 1024
    python benchmarks/activation_memory.py --resolution 1024 --decoder-only --gradient-checkpointing both
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import TINY_DDCONFIG
from benchmarks.measure import emit
from klvae.models.autoencoder import AutoencoderKL
from klvae.modules.vae import KL_F8_DDCONFIG


def saved_bytes(model: AutoencoderKL, batch: int, height: int, width: int, gan: bool) -> dict[str, int]:
    """Bytes saved for backward by each part of one autoencoder update, cumulative in forward order."""
    total, seen = [0], set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # A tensor saved by two ops (a block's input for its GroupNorm and its shortcut conv) is stored once.
        # (The graph keeps every packed tensor alive, so ids are not reused while counting.)
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    x = torch.empty(batch, 3, height, width, device="meta")
    parts = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad() if model.train_decoder_only else torch.enable_grad():
            posterior = model.encode(x)
        parts["encoder"] = total[0]
        recon = model.decode(posterior.sample())
        parts["decoder"] = total[0] - parts["encoder"]
        model.loss.perceptual_loss(x, recon)
        parts["lpips"] = total[0] - parts["encoder"] - parts["decoder"]
        if gan:
            model.loss.discriminator(recon)
        parts["discriminator"] = total[0] - sum(parts.values())
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["kl-f8", "tiny"], default="kl-f8")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512, 1024], help="square sides")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--decoder-only", action="store_true", help="train_decoder_only (the fine-tune recipes)"
    )
    parser.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--gan", action="store_true", help="after disc_start: the discriminator on x̂ too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("klvae.modules.perceptual").setLevel(logging.ERROR)  # the random-VGG notice
    ddconfig = dict(KL_F8_DDCONFIG if args.model == "kl-f8" else TINY_DDCONFIG)
    lossconfig = {
        "target": "klvae.modules.losses.LPIPSWithDiscriminator",
        "params": {"disc_start": 0, "perceptual_weight": 0.5, "perceptual_backbone": "random"},
    }  # the VGG weights do not change the shapes
    switches = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    for checkpointing in switches:
        with torch.device("meta"):
            model = AutoencoderKL(ddconfig, lossconfig, embed_dim=4, monitor=None,
                                  train_decoder_only=args.decoder_only,
                                  optimizations={"gradient_checkpointing": checkpointing})  # fmt: skip
        model.to("meta").train()  # the few tensors made outside the device context (LPIPS' scaling layer)
        trainable = sum(p.numel() for p in model._trainable_codec_parameters())
        for resolution in args.resolution:
            parts = saved_bytes(model, args.batch, resolution, resolution, args.gan)
            emit({
                "bench": "activation_memory", "model": args.model, "resolution": resolution, "batch": args.batch,
                "decoder_only": args.decoder_only, "gradient_checkpointing": checkpointing, "gan": args.gan,
                "saved_gib": round(sum(parts.values()) / 2**30, 3),
                **{f"saved_{k}_gib": round(v / 2**30, 3) for k, v in parts.items()},
                "weights_grads_adam_gib": round(4 * 4 * trainable / 2**30, 3), "dtype": "float32",
            })  # fmt: skip


if __name__ == "__main__":
    main()
