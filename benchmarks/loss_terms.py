#!/usr/bin/env python
"""What the 2025 recipe's pieces cost, next to the 2021 step, in one run: the VF loss (DINOv2 ViT-S/14 and
ViT-L/14, adaptive weight) on the autoencoder update, and the discriminator update with each discriminator
(PatchGAN, DINO ViT-S/16) and regulariser (LeCam, R1).

Per case: model FLOPs of one update (forward and backward, ``FlopCounterMode``; R1's double backward cannot be
counted by it, so its FLOPs are left empty), the median wall time of ``--repeats`` updates after one warm-up,
and the bytes autograd keeps for the backward (exact, from saved-tensor hooks: the activation memory the
update adds, independent of the machine). Ratios are to the first case of each group. Backbones are random
(timing and memory do not depend on the weights). One JSON line per case, then a markdown table.

    python benchmarks/loss_terms.py --device cpu --batch 1 --resolution 256 --repeats 2
    python benchmarks/loss_terms.py --device cuda --batch 12 --resolution 256 --repeats 10   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import TINY_DDCONFIG
from benchmarks.flops import count_flops
from klvae.models.autoencoder import AutoencoderKL
from klvae.modules.equivariance import Branch
from klvae.modules.vae import KL_F8_DDCONFIG


def backbone(name: str, image_size: int) -> dict[str, Any]:
    return {"target": "klvae.modules.backbones.FrozenViT",
            "params": {"model_name": name, "allow_random_backbone": True, "image_size": image_size}}  # fmt: skip


def vf_term(name: str, channels: int) -> dict[str, Any]:
    return {"target": "klvae.modules.vf_loss.VFLoss",
            "params": {"latent_channels": channels, "weight": 0.1, "adaptive": True, "cos_margin": 0.5,
                       "distmat_margin": 0.25, "backbone": backbone(name, 224)}}  # fmt: skip


DINO_D = {"target": "klvae.modules.dino_discriminator.DinoDiscriminator",
          "params": {"backbone": backbone("vit_small_patch16_224.dino", 224)}}  # fmt: skip

GENERATOR_CASES = {
    "2021 step (L2 + LPIPS + KL)": {},
    "+ VF loss, DINOv2 ViT-S/14": {"terms": {"vf": vf_term("vit_small_patch14_dinov2.lvd142m", 4)}},
    "+ VF loss, DINOv2 ViT-L/14": {"terms": {"vf": vf_term("vit_large_patch14_dinov2.lvd142m", 4)}},
    "GAN on: PatchGAN (λ)": {"disc_start": 0},
    "GAN on: DINO ViT-S/16 (λ)": {"disc_start": 0, "discriminator_config": DINO_D},
}
DISCRIMINATOR_CASES = {
    "PatchGAN": {},
    "PatchGAN + LeCam": {"lecam_weight": 0.1},
    "PatchGAN + R1 (an R1 update)": {"r1_gamma": 1.0, "r1_interval": 1},
    "DINO ViT-S/16": {"discriminator_config": DINO_D},
    "DINO ViT-S/16 + R1 (an R1 update)": {"discriminator_config": DINO_D, "r1_gamma": 1.0, "r1_interval": 1},
}


def build(args: argparse.Namespace, extra: dict[str, Any]) -> AutoencoderKL:
    params = {"disc_start": 0 if args.group == "discriminator" else 10**9, "kl_weight": 1e-6, "pixel_loss": "l2",
              "perceptual_weight": 0.5, "perceptual_backbone": "random", **copy.deepcopy(extra)}  # fmt: skip
    ddconfig = KL_F8_DDCONFIG if args.model == "kl-f8" else TINY_DDCONFIG
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig, {"target": "klvae.modules.losses.LPIPSWithDiscriminator", "params": params},
                          embed_dim=4)  # fmt: skip
    return model.to(args.device).train()


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def generator_update(model: AutoencoderKL, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    model.loss.discriminator.requires_grad_(False)  # as toggle_optimizer leaves it in the autoencoder update

    def forward() -> torch.Tensor:
        fwd = model._reconstruct(x, Branch(), for_generator=True)
        loss, _ = model.loss.generator_loss(
            x, fwd.reconstructions, fwd.posterior, 0, fwd.decoder_last_layer, latents=fwd.latents,
            encoder_images=x, latent_cut=fwd.latent_cut,
        )  # fmt: skip
        return loss

    return forward


def discriminator_update(model: AutoencoderKL, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    with torch.no_grad():
        recon = model.decode(model.encode(x).sample())

    def forward() -> torch.Tensor:
        loss, _ = model.loss.discriminator_loss(x, recon, 0, update_index=0)
        return loss

    return forward


def measure(args: argparse.Namespace, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    model = build(args, extra)
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=args.device) * 2 - 1
    make = generator_update if args.group == "generator" else discriminator_update
    forward = make(model, x)

    def update() -> None:
        forward().backward()
        model.zero_grad(set_to_none=True)

    kept = saved_bytes(forward)  # builds a graph that is dropped (no backward)
    update()  # warm-up
    flops = None
    if "r1_gamma" not in extra:
        flops = count_flops(update)
    times = []
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        update()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"group": args.group, "case": name, "model": args.model, "batch": args.batch,
            "resolution": args.resolution, "device": args.device, "gflops": None if flops is None else flops / 1e9,
            "seconds": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times),
            "saved_for_backward_gib": kept / 2**30, "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["kl-f8", "tiny"], default="kl-f8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--groups", default="generator,discriminator")
    args = parser.parse_args(argv)
    rows = []
    for group in args.groups.split(","):
        args.group = group
        cases = GENERATOR_CASES if group == "generator" else DISCRIMINATOR_CASES
        for name, extra in cases.items():
            row = measure(args, name, extra)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        "\n| update | case | GFLOP | × | s (median) | × | saved for backward GiB |\n|---|---|---|---|---|---|---|"
    )
    for group in ("generator", "discriminator"):
        base = next((r for r in rows if r["group"] == group), None)
        for r in (r for r in rows if r["group"] == group):
            flop_ratio = f"{r['gflops'] / base['gflops']:.3f}" if r["gflops"] and base["gflops"] else "—"
            gflops = f"{r['gflops']:.1f}" if r["gflops"] else "—"
            print(f"| {group} | {r['case']} | {gflops} | {flop_ratio} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / base['seconds']:.2f} | {r['saved_for_backward_gib']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
