#!/usr/bin/env python
"""Throughput, memory and MFU of klvae's real training step, next to diffusers' AutoencoderKL.

klvae's step is ``AutoencoderKL.training_step`` driven by a Lightning Trainer (manual optimization, both
update schedules, before and after ``disc_start``); diffusers' is the same pre-GAN loss in plain PyTorch
(see ``klvae.perf.diffusers_ref``). FLOPs are counted with ``FlopCounterMode`` on one eager step per case
(model FLOPs: no recomputation), MFU = FLOPs / time / ``--peak-tflops``. One JSON line per measurement.

Like-for-like: every case starts from the same cudnn.benchmark/TF32 flags (``backend_flags`` in each
record), set again before each case: klvae variants use their own ``cudnn_benchmark`` switch, diffusers
uses what klvae's defaults use on the device (``--cudnn-benchmark`` overrides), TF32 is ``--tf32`` for all.
``peak_mem_gib`` is the steady-state peak (counter reset after the warm-up); ``warmup_peak_mem_gib`` the
warm-up's, which holds torch.compile's transients; ``compile_s`` the warm-up's excess time over as many
steady iterations. The GAN cases' warm-up covers whole autoencoder/discriminator pairs, so both updates'
graphs are compiled before timing starts.

    # CPU smoke (seconds):
    python benchmarks/train_step.py --device cpu --model tiny --batch 1 --resolution 64 --steps 2
    # H100 at the default recipe's batch 12, 256², every switch:
    python benchmarks/train_step.py --batch 12 --resolution 256 --steps 30 --sweep
    # peak memory of one step of the decoder-only fine-tune at 1024² (no FLOP counting, no diffusers):
    python benchmarks/train_step.py --batch 2 --resolution 1024 --steps 3 --cases pre --decoder-only \
        --no-flops --diffusers none --variant default+gradient_checkpointing=true
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, batch_loader, parse_variant, resolve_common  # noqa: E402

from klvae.models.autoencoder import AutoencoderKL  # noqa: E402
from klvae.modules.config import NetworkConfig  # noqa: E402
from klvae.modules.perceptual import load_lpips  # noqa: E402
from klvae.perf.bench import (  # noqa: E402
    BackendFlags,
    FlopCounterCallback,
    StepTimer,
    device_info,
    emit,
    peak_memory_gib,
    peak_tflops_for,
    reset_peak_memory,
    set_backend_flags,
    summarize,
    time_calls,
)
from klvae.perf.diffusers_ref import build_diffusers_vae, diffusers_available, diffusers_train_step  # noqa: E402
from klvae.perf.flops import count_flops  # noqa: E402
from klvae.perf.options import Optimizations  # noqa: E402

log = logging.getLogger("benchmarks.train_step")

# case -> (disc_start, update_schedule); "pre" = before the GAN starts (the case diffusers' step is compared on).
CASES = {
    "pre": (10**9, "alternate"),
    "post-alternate": (0, "alternate"),
    "post-every_batch": (0, "every_batch"),
}


def build_model(
    ddconfig: dict, case: str, opts: Optimizations, backbone: str, decoder_only: bool = False
) -> AutoencoderKL:
    disc_start, schedule = CASES[case]
    lossconfig = {
        "target": "klvae.modules.losses.LPIPSWithDiscriminator",
        "params": {
            "disc_start": disc_start, "kl_weight": 1e-6, "pixel_loss": "l2", "perceptual_weight": 0.5,
            "perceptual_backbone": backbone, "reduction": "sum",
        },
    }  # fmt: skip
    return AutoencoderKL(
        ddconfig,
        lossconfig,
        embed_dim=4,
        update_schedule=schedule,
        optimizations=opts.to_dict(),
        monitor=None,
        train_decoder_only=decoder_only,
    )


def fit(
    model: AutoencoderKL, args: argparse.Namespace, device: torch.device, batches: int, callback: Any
) -> None:
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_epochs=1, limit_train_batches=batches, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=batch_loader(args.batch, args.resolution, batches, device))


def case_flags(args: argparse.Namespace, device: torch.device, cudnn_benchmark: bool | None) -> BackendFlags:
    """The flags a case runs under: its own cudnn_benchmark choice (None: klvae's default on the device)."""
    if cudnn_benchmark is None:
        cudnn_benchmark = Optimizations().cudnn_benchmark_on(device)
    return BackendFlags(cudnn_benchmark=cudnn_benchmark, tf32=args.tf32)


def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()  # fresh compile caches per variant: no recompile-limit fallback to eager
    gc.collect()
    reset_peak_memory(device)


def count_klvae_flops(args: argparse.Namespace, device: torch.device, ddconfig: dict, case: str) -> float:
    """Model FLOPs per iteration of ``case`` (mean over an AE and a D iteration when they alternate)."""
    model = build_model(ddconfig, case, parse_variant("plain"), args.perceptual_backbone, args.decoder_only)
    counter = FlopCounterCallback()
    fit(model, args, device, 2, counter)
    del model
    cleanup(device)
    return sum(counter.flops) / len(counter.flops)


def bench_klvae(args: argparse.Namespace, device: torch.device, ddconfig: dict, base: dict) -> None:
    peak = peak_tflops_for(device, args.peak_tflops)
    for case in args.cases:
        flops = None if args.no_flops else count_klvae_flops(args, device, ddconfig, case)
        gan = CASES[case][0] == 0
        steps = args.steps + (args.steps % 2 if gan else 0)  # whole AE/D pairs
        warmup = args.warmup + (args.warmup % 2 if gan else 0)
        for spec in args.variants:
            opts = parse_variant(spec)
            flags = case_flags(args, device, opts.cudnn_benchmark_on(device))
            set_backend_flags(flags)
            model = build_model(ddconfig, case, opts, args.perceptual_backbone, args.decoder_only)
            timer = StepTimer(warmup)
            cleanup(device)
            fit(model, args, device, warmup + steps, timer)
            mem, mem_kind = peak_memory_gib(device)
            emit({**base, "impl": "klvae", "case": case, "variant": spec, "optimizations": opts.to_dict(),
                  "decoder_only": args.decoder_only,
                  "backend_flags": flags.to_dict(),
                  **summarize(timer.times, args.batch, flops, peak, timer.warmup_times),
                  "peak_mem_gib": round(mem, 3), "warmup_peak_mem_gib": _round(timer.warmup_peak_gib),
                  "mem_kind": mem_kind})  # fmt: skip
            del model, timer
            cleanup(device)


def bench_diffusers(args: argparse.Namespace, device: torch.device, ddconfig: dict, base: dict) -> None:
    if args.diffusers == "none" or "pre" not in args.cases:
        return
    if not diffusers_available():
        log.warning("diffusers is not installed: no side-by-side numbers")
        return
    peak = peak_tflops_for(device, args.peak_tflops)
    fused = Optimizations().fused_adam_on(device)
    flavours = ["eager", "compiled"] if args.diffusers == "both" else [args.diffusers]
    flops = None
    for flavour in flavours:
        flags = case_flags(args, device, args.cudnn_benchmark)
        set_backend_flags(flags)
        torch.manual_seed(0)
        vae = build_diffusers_vae(NetworkConfig.from_params(ddconfig, 4)).to(device).train()
        lpips_model = load_lpips(args.perceptual_backbone).to(device)
        images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
        step = diffusers_train_step(vae, lpips_model, images, args.precision, fused)
        if flops is None:  # counted on the eager model (compiled kernels bypass the counter)
            flops = count_flops(step)
        if flavour == "compiled":
            vae.encoder.compile()
            vae.decoder.compile()
        cleanup(device)
        warmup: dict = {}
        times = time_calls(step, device, args.warmup, args.steps, warmup)
        mem, mem_kind = peak_memory_gib(device)
        emit({**base, "impl": f"diffusers-{flavour}", "case": "pre", "variant": f"diffusers-{flavour}",
              "optimizations": {"fused_adam": fused, "compile": flavour == "compiled"},
              "backend_flags": flags.to_dict(), **summarize(times, args.batch, flops, peak, warmup["times"]),
              "peak_mem_gib": round(mem, 3), "warmup_peak_mem_gib": _round(warmup["peak_gib"]), "mem_kind": mem_kind})  # fmt: skip
        del vae, lpips_model, step
        cleanup(device)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument(
        "--cases", default="pre,post-alternate,post-every_batch", help=f"comma list of {list(CASES)}"
    )
    parser.add_argument(
        "--perceptual-backbone", default="random", help="timing does not depend on the weights"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions in every case")
    parser.add_argument(
        "--decoder-only", action="store_true", help="train_decoder_only (the fine-tune recipes)"
    )
    parser.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count (two eager steps per case): memory runs"
    )
    parser.add_argument(
        "--cudnn-benchmark", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
        help="cudnn.benchmark for the diffusers cases (default: klvae's default on the device)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device, ddconfig, args.variants = resolve_common(args)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    base = {"bench": "train_step", "model": args.model, "batch": args.batch, "resolution": args.resolution,
            "precision": args.precision, **device_info(device)}  # fmt: skip
    bench_klvae(args, device, ddconfig, base)
    bench_diffusers(args, device, ddconfig, base)


if __name__ == "__main__":
    main()
