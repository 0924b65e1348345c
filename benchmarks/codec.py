#!/usr/bin/env python
"""Encode-only and decode-only throughput of klvae's KLAutoencoder next to diffusers' AutoencoderKL.

Inference mode, bf16 autocast on CUDA. Also decodes one ``--big-resolution`` image (1024² by default)
whole and, when ``klvae.inference.InferenceVAE`` is present, in ``--tile-size`` tiles, to report peak memory.

    python benchmarks/codec.py --device cpu --model tiny --batch 1 --resolution 64 --steps 2 --big-resolution 128 \
        --tile-size 64 --tile-overlap 16
    python benchmarks/codec.py --batch 32 --resolution 256 --steps 30 --sweep     # H100
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, parse_variant, resolve_common  # noqa: E402

from klvae.modules.config import NetworkConfig  # noqa: E402
from klvae.modules.vae import KLAutoencoder  # noqa: E402
from klvae.perf.apply import apply_runtime_optimizations  # noqa: E402
from klvae.perf.bench import (  # noqa: E402
    autocast_context,
    device_info,
    emit,
    peak_memory_gib,
    peak_tflops_for,
    reset_peak_memory,
    summarize,
    time_calls,
)
from klvae.perf.diffusers_ref import build_diffusers_vae, diffusers_available, diffusers_codec_fns  # noqa: E402
from klvae.perf.flops import count_flops  # noqa: E402

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
    """Peak memory of decoding one big image, whole and (if klvae.inference exists) tiled."""
    side = args.big_resolution // 8
    z = torch.randn(1, 4, side, side, device=device)
    runs: dict[str, Callable[[], Any]] = {"whole": klvae_codec_fns(vae, z, z, args.precision)["decode"]}
    try:
        from klvae.inference import InferenceVAE

        wrapped = InferenceVAE(vae)

        @torch.inference_mode()
        def tiled() -> torch.Tensor:
            with autocast_context(device, args.precision):
                return wrapped.decode(z, tile_size=args.tile_size, tile_overlap=args.tile_overlap)

        runs[f"tiled-{args.tile_size}"] = tiled
    except (
        ImportError,
        TypeError,
        ValueError,
    ) as err:  # API not there (yet): measure the untiled decode only
        log.warning("tiled decode not benchmarked: %s", err)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device, ddconfig, variants = resolve_common(args)
    base = {"bench": "codec", "model": args.model, "batch": args.batch, "resolution": args.resolution,
            "precision": args.precision, **device_info(device)}  # fmt: skip
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    latents = torch.randn(args.batch, 4, args.resolution // 8, args.resolution // 8, device=device)

    eager = KLAutoencoder.from_ddconfig(ddconfig, 4).to(device).eval()
    fns = klvae_codec_fns(eager, images, latents, args.precision)
    flops = {op: count_flops(fn) for op, fn in fns.items()}  # counted once, eagerly
    if args.big_resolution:
        big_decode(eager, args, device, base)
    del eager, fns
    for spec in variants:
        opts = parse_variant(spec)
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
                vae.encoder.compile()
                vae.decoder.compile()
            measure(f"diffusers-{flavour}", diffusers_codec_fns(vae, images, latents, args.precision), flops,
                    args, device, base, {"variant": f"diffusers-{flavour}"})  # fmt: skip
            del vae
            gc.collect()


if __name__ == "__main__":
    main()
