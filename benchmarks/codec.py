#!/usr/bin/env python
"""Encode-only and decode-only throughput of klvae's KLAutoencoder next to diffusers' AutoencoderKL.

Inference mode, bf16 autocast on CUDA. Also decodes one ``--big-resolution`` image (1024² by default)
whole and in ``--tile-size`` tiles (``klvae.inference.InferenceVAE``), to report peak memory;
``--no-throughput`` measures only that.

    python benchmarks/codec.py --device cpu --model tiny --batch 1 --resolution 64 --steps 2 --big-resolution 128 \
        --tile-size 64 --tile-overlap 16
    python benchmarks/codec.py --batch 32 --resolution 256 --steps 30 --sweep     # H100
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_common_args, parse_variant, resolve_common
from benchmarks.diffusers_ref import (
    build_diffusers_vae,
    compile_diffusers_vae,
    diffusers_available,
    diffusers_codec_fns,
)
from benchmarks.flops import count_flops
from benchmarks.measure import (
    BackendFlags,
    autocast_context,
    device_info,
    emit,
    peak_memory_gib,
    peak_tflops_for,
    reset_peak_memory,
    set_backend_flags,
    summarize,
    time_calls,
)
from klvae.inference import InferenceVAE
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KLAutoencoder
from klvae.perf.apply import apply_runtime_optimizations
from klvae.perf.options import Optimizations

log = logging.getLogger("benchmarks.codec")


def klvae_codec_fns(
    vae: KLAutoencoder, images: torch.Tensor, latents: torch.Tensor, precision: str
) -> dict[str, Callable[[], torch.Tensor]]:
    @torch.inference_mode()
    def encode() -> torch.Tensor:
        with autocast_context(images.device, precision):
            return vae.encode(images).mode()

    @torch.inference_mode()
    def decode() -> torch.Tensor:
        with autocast_context(latents.device, precision):
            return vae.decode(latents)

    return {"encode": encode, "decode": decode}


def measure(
    name: str, fns: dict[str, Callable[[], Any]], flops: dict[str, int], args: argparse.Namespace,
    device: torch.device, base: dict[str, Any], extra: dict[str, Any],
) -> None:  # fmt: skip
    peak = peak_tflops_for(device, args.peak_tflops)
    for op, fn in fns.items():
        reset_peak_memory(device)
        times = time_calls(fn, device, args.warmup, args.steps)
        mem, mem_kind = peak_memory_gib(device)
        emit({**base, "impl": name, "op": op, **extra, **summarize(times, args.batch, flops[op], peak),
              "peak_mem_gib": round(mem, 3), "mem_kind": mem_kind})  # fmt: skip


def big_decode(
    vae: KLAutoencoder, args: argparse.Namespace, device: torch.device, base: dict[str, Any]
) -> None:
    """Time and peak memory of decoding one big image (1, 4, R/8, R/8) whole and in tiles."""
    side = args.big_resolution // 8
    z = torch.randn(1, 4, side, side, device=device)
    wrapped = InferenceVAE(vae)

    @torch.inference_mode()
    def tiled() -> torch.Tensor:
        with autocast_context(device, args.precision):
            return wrapped.decode(z, tile_size=args.tile_size, tile_overlap=args.tile_overlap)

    runs: dict[str, Callable[[], Any]] = {
        "whole": klvae_codec_fns(vae, z, z, args.precision)["decode"],
        f"tiled-{args.tile_size}": tiled,
    }
    for mode, fn in runs.items():
        reset_peak_memory(device)
        try:
            times = time_calls(fn, device, 1 if device.type == "cuda" else 0, 1)
        except torch.OutOfMemoryError:
            emit({**base, "impl": "klvae", "op": f"decode-{args.big_resolution}", "mode": mode, "oom": True})
            continue
        mem, mem_kind = peak_memory_gib(device)
        emit({**base, "impl": "klvae", "op": f"decode-{args.big_resolution}", "mode": mode, "batch": 1,
              "resolution": args.big_resolution, "seconds": round(times[0], 4), "peak_mem_gib": round(mem, 3),
              "mem_kind": mem_kind})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument(
        "--big-resolution", type=int, default=1024, help="single-image decode memory (0: skip)"
    )
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--tile-overlap", type=int, default=64)
    parser.add_argument(
        "--throughput", action=argparse.BooleanOptionalAction, default=True,
        help="encode/decode throughput of the variants and diffusers (--no-throughput: big decode only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device, ddconfig, variants = resolve_common(args)
    # One set of flags for every case (inference has no per-variant cudnn choice worth comparing).
    cudnn = (
        Optimizations().cudnn_benchmark_on(device) if args.cudnn_benchmark is None else args.cudnn_benchmark
    )
    flags = BackendFlags(cudnn_benchmark=cudnn, tf32=args.tf32)
    set_backend_flags(flags)
    base = {"bench": "codec", "model": args.model, "batch": args.batch, "resolution": args.resolution,
            "precision": args.precision, "backend_flags": flags.to_dict(), **device_info(device)}  # fmt: skip
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    latents = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8, device=device)

    eager = KLAutoencoder.from_ddconfig(ddconfig, 4).to(device).eval()
    if args.big_resolution:
        big_decode(eager, args, device, base)
    if not args.throughput:
        return
    fns = klvae_codec_fns(eager, images, latents, args.precision)
    flops = {op: count_flops(fn) for op, fn in fns.items()}  # counted once, eagerly
    del eager, fns
    for spec in variants:
        opts = dataclasses.replace(parse_variant(spec), cudnn_benchmark=flags.cudnn_benchmark)
        if args.compile_backend != "inductor":
            compile_on = True if opts.compile is None else opts.compile  # as on a GPU (--compile-backend)
            opts = dataclasses.replace(
                opts, compile=compile_on, compile_backend=args.compile_backend, compile_mode=None
            )
        torch._dynamo.reset()
        vae = KLAutoencoder.from_ddconfig(ddconfig, 4).to(device).eval()
        applied = apply_runtime_optimizations({"encoder": vae.encoder, "decoder": vae.decoder}, opts, device)
        applied = applied.descriptions
        measure("klvae", klvae_codec_fns(vae, images, latents, args.precision), flops, args, device, base,
                {"variant": spec, "applied": applied})  # fmt: skip
        del vae
        gc.collect()

    if args.diffusers != "none" and diffusers_available():
        flavours = ["eager", "compiled"] if args.diffusers == "both" else [args.diffusers]
        for flavour in flavours:
            torch._dynamo.reset()
            vae = build_diffusers_vae(NetworkConfig.from_params(ddconfig, 4)).to(device).eval()
            if flavour == "compiled":
                compile_diffusers_vae(vae, args.compile_backend)
            measure(f"diffusers-{flavour}", diffusers_codec_fns(vae, images, latents, args.precision), flops,
                    args, device, base, {"variant": f"diffusers-{flavour}"})  # fmt: skip
            del vae
            gc.collect()


if __name__ == "__main__":
    main()
