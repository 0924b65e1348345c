#!/usr/bin/env python
"""Throughput, memory and MFU of klvae's real training step, next to diffusers' AutoencoderKL.

klvae's step is ``AutoencoderKL.training_step`` driven by a Lightning Trainer (manual optimization, both
update schedules, before and after ``disc_start``); diffusers' is the same loss in plain PyTorch (see
``benchmarks/diffusers_ref.py``): its pre-GAN step next to the ``pre`` case, its alternating GAN step next
to ``post-alternate`` (diffusers has no every-batch schedule). FLOPs are counted with ``FlopCounterMode``
on one eager step per case (model FLOPs: no recomputation), MFU = FLOPs / time / ``--peak-tflops``. One
JSON line per measurement.

Like-for-like: every case starts from the same cudnn.benchmark/TF32 flags (``backend_flags`` in each
record), set again before each case: ``--cudnn-benchmark`` sets cudnn.benchmark for every case (klvae
variants and diffusers alike); without it klvae variants use their own ``cudnn_benchmark`` switch and
diffusers what klvae's defaults use on the device. TF32 is ``--tf32`` for all. ``peak_mem_gib`` is the
steady-state peak (counter reset after the warm-up); ``warmup_peak_mem_gib`` the warm-up's, which holds
torch.compile's transients; ``compile_s`` the warm-up's excess time over as many steady iterations. The
GAN cases' warm-up covers whole autoencoder/discriminator pairs, so both updates' graphs are compiled
before timing starts.

    # CPU smoke (seconds):
    python benchmarks/train_step.py --device cpu --model tiny --batch 1 --resolution 64 --steps 2
    # H100 at the default recipe's batch 12, 256², every switch:
    python benchmarks/train_step.py --batch 12 --resolution 256 --steps 30 --sweep
    # peak memory of the decoder-only fine-tune at 1024² (no FLOP counting, no diffusers):
    python benchmarks/train_step.py --batch 2 --resolution 1024 --steps 3 --cases pre --decoder-only \
        --no-flops --diffusers none --variant default+gradient_checkpointing=true
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_common_args, batch_loader, parse_variant, resolve_common
from benchmarks.diffusers_ref import (
    build_diffusers_vae,
    compile_diffusers_vae,
    diffusers_available,
    diffusers_gan_step,
    diffusers_train_step,
    retained_graphs_allowed,
)
from benchmarks.flops import count_flops
from benchmarks.measure import (
    BackendFlags,
    device_info,
    emit,
    peak_memory_gib,
    peak_tflops_for,
    reset_peak_memory,
    set_backend_flags,
    summarize,
    synchronize,
    time_calls,
)
from klvae.models.autoencoder import AutoencoderKL
from klvae.modules.config import NetworkConfig
from klvae.modules.discriminator import NLayerDiscriminator
from klvae.modules.perceptual import load_lpips
from klvae.perf.options import Optimizations

log = logging.getLogger("benchmarks.train_step")

# case -> (disc_start, update_schedule); "pre" = before the GAN starts.
CASES = {
    "pre": (10**9, "alternate"),
    "post-alternate": (0, "alternate"),
    "post-every_batch": (0, "every_batch"),
}
# The diffusers step timed next to each case (none for every_batch: diffusers' trainer alternates).
DIFFUSERS_STEP = {"pre": "pre", "post-alternate": "gan-alternate"}


class StepTimer(pl.Callback):
    """Device time of every training batch (data loading excluded): ``warmup_times`` for the first
    ``warmup`` batches (compilation, autotuning), ``times`` after them; the peak memory of the warm-up
    (``warmup_peak_gib``) is recorded and the peak counter reset before the first timed batch, so
    :func:`peak_memory_gib` afterwards is the steady-state peak."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.warmup_times, self._t0 = warmup, [], [], 0.0
        self.warmup_peak_gib: float | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        synchronize(pl_module.device)
        if batch_idx == self.warmup:
            self.warmup_peak_gib = peak_memory_gib(pl_module.device)[0]
            reset_peak_memory(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        synchronize(pl_module.device)
        (self.times if batch_idx >= self.warmup else self.warmup_times).append(time.perf_counter() - self._t0)


class FlopCounterCallback(pl.Callback):
    """FLOPs of each training batch (run on an eager model: compiled kernels bypass the counter)."""

    def __init__(self) -> None:
        self.flops: list[int] = []
        self._mode: FlopCounterMode | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._mode is not None
        self._mode.__exit__(None, None, None)
        self.flops.append(int(self._mode.get_total_flops()))
        self._mode = None


def loss_params(args: argparse.Namespace, case: str) -> dict[str, Any]:
    """The loss's ``params``: the default recipe's pre-GAN settings, the case's ``disc_start``, then
    ``--loss-param`` overrides (the way a benchmark of a new loss term is added)."""
    params = {
        "disc_start": CASES[case][0], "kl_weight": 1e-6, "pixel_loss": "l2", "perceptual_weight": 0.5,
        "perceptual_backbone": args.perceptual_backbone, "reduction": "sum",
    }  # fmt: skip
    return params | args.loss_params


def build_model(args: argparse.Namespace, ddconfig: dict, case: str, opts: Optimizations) -> AutoencoderKL:
    lossconfig = {"target": args.loss_target, "params": loss_params(args, case)}
    return AutoencoderKL(
        ddconfig,
        lossconfig,
        embed_dim=4,
        update_schedule=CASES[case][1],
        optimizations=opts.to_dict(),
        monitor=None,
        train_decoder_only=args.decoder_only,
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
    """The flags a case runs under: ``--cudnn-benchmark`` if given, else ``cudnn_benchmark`` (the
    variant's own choice; None: klvae's default on the device)."""
    if args.cudnn_benchmark is not None:
        cudnn_benchmark = args.cudnn_benchmark
    elif cudnn_benchmark is None:
        cudnn_benchmark = Optimizations().cudnn_benchmark_on(device)
    return BackendFlags(cudnn_benchmark=cudnn_benchmark, tf32=args.tf32)


def klvae_options(args: argparse.Namespace, spec: str) -> Optimizations:
    """The variant's switches, with ``--cudnn-benchmark`` and ``--compile-backend`` applied to it."""
    opts = parse_variant(spec)
    changes: dict[str, Any] = {}
    if args.cudnn_benchmark is not None:
        changes["cudnn_benchmark"] = args.cudnn_benchmark
    if args.compile_backend != "inductor":
        changes["compile_backend"], changes["compile_mode"] = args.compile_backend, None
        if opts.compile is None:  # what a GPU run compiles, compiled here too (see --compile-backend)
            changes["compile"] = True
    return dataclasses.replace(opts, **changes)


def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()  # fresh compile caches per variant: no recompile-limit fallback to eager
    gc.collect()
    reset_peak_memory(device)


def count_klvae_flops(args: argparse.Namespace, device: torch.device, ddconfig: dict, case: str) -> float:
    """Model FLOPs per iteration of ``case`` (mean over an AE and a D iteration when they alternate)."""
    model = build_model(args, ddconfig, case, parse_variant("plain"))
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
            opts = klvae_options(args, spec)
            flags = case_flags(args, device, opts.cudnn_benchmark_on(device))
            set_backend_flags(flags)
            model = build_model(args, ddconfig, case, opts)
            timer = StepTimer(warmup)
            cleanup(device)
            fit(model, args, device, warmup + steps, timer)
            mem, mem_kind = peak_memory_gib(device)
            emit({**base, "impl": "klvae", "case": case, "variant": spec, "optimizations": opts.to_dict(),
                  "backend_flags": flags.to_dict(), "loss_params": loss_params(args, case),
                  "decoder_only": args.decoder_only,
                  **summarize(timer.times, args.batch, flops, peak, timer.warmup_times),
                  "peak_mem_gib": round(mem, 3), "warmup_peak_mem_gib": _round(timer.warmup_peak_gib),
                  "mem_kind": mem_kind})  # fmt: skip
            del model, timer
            cleanup(device)


def bench_diffusers(args: argparse.Namespace, device: torch.device, ddconfig: dict, base: dict) -> None:
    cases = [c for c in args.cases if c in DIFFUSERS_STEP]
    if args.diffusers == "none" or not cases:
        return
    if not diffusers_available():
        log.warning("diffusers is not installed: no side-by-side numbers")
        return
    peak = peak_tflops_for(device, args.peak_tflops)
    fused = Optimizations().fused_adam_on(device)
    flavours = ["eager", "compiled"] if args.diffusers == "both" else [args.diffusers]
    for case in cases:
        kind = DIFFUSERS_STEP[case]
        steps, warmup = (
            (args.steps, args.warmup) if kind == "pre" else (_even(args.steps), _even(args.warmup))
        )
        flops = None
        for flavour in flavours:
            flags = case_flags(args, device, None)
            set_backend_flags(flags)
            torch.manual_seed(0)
            vae = build_diffusers_vae(NetworkConfig.from_params(ddconfig, 4)).to(device).train()
            lpips_model = load_lpips(args.perceptual_backbone).to(device)
            images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
            if kind == "pre":
                step = diffusers_train_step(vae, lpips_model, images, args.precision, fused)
            else:
                discriminator = NLayerDiscriminator(3, 64, 3, False).to(device).train()  # klvae's (LDM's) D
                step = diffusers_gan_step(vae, discriminator, lpips_model, images, args.precision, fused)
            if flops is None:  # counted on the eager model (compiled kernels bypass the counter)
                calls = 1 if kind == "pre" else 2  # an AE and a D iteration
                flops = sum(count_flops(step) for _ in range(calls)) / calls
            # λ's retain_graph gradients through a compiled decoder need donated buffers off.
            retain = retained_graphs_allowed() if flavour == "compiled" and kind != "pre" else nullcontext()
            with retain:
                if flavour == "compiled":
                    compile_diffusers_vae(vae, args.compile_backend)
                cleanup(device)
                warmup_record: dict = {}
                times = time_calls(step, device, warmup, steps, warmup_record)
            mem, mem_kind = peak_memory_gib(device)
            emit({**base, "impl": f"diffusers-{flavour}", "case": case, "variant": f"diffusers-{flavour}",
                  "diffusers_step": kind,
                  "optimizations": {"fused_adam": fused, "compile": flavour == "compiled",
                                    "compile_backend": args.compile_backend if flavour == "compiled" else None,
                                    "donated_buffer": not (flavour == "compiled" and kind != "pre")},
                  "backend_flags": flags.to_dict(),
                  **summarize(times, args.batch, flops, peak, warmup_record["times"]),
                  "peak_mem_gib": round(mem, 3), "warmup_peak_mem_gib": _round(warmup_record["peak_gib"]),
                  "mem_kind": mem_kind})  # fmt: skip
            del vae, lpips_model, step
            cleanup(device)


def _even(n: int) -> int:
    return n + n % 2


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument(
        "--cases", default="pre,post-alternate,post-every_batch", help=f"comma list of {list(CASES)}"
    )
    parser.add_argument(
        "--klvae", action=argparse.BooleanOptionalAction, default=True,
        help="time klvae's variants (--no-klvae: only the diffusers reference)",
    )  # fmt: skip
    parser.add_argument(
        "--perceptual-backbone", default="random",
        help="'random' (timing does not depend on the weights), 'imagenet' or a VGG16/LPIPS file",
    )  # fmt: skip
    parser.add_argument(
        "--decoder-only", action="store_true", help="train_decoder_only (the fine-tune recipes)"
    )
    parser.add_argument(
        "--no-flops", action="store_true", help="skip the FLOP count (two eager steps per case): memory runs"
    )
    parser.add_argument(
        "--loss-target", default="klvae.modules.losses.LPIPSWithDiscriminator", help="lossconfig.target"
    )
    parser.add_argument(
        "--loss-param", dest="loss_param", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
        help="lossconfig.params override for klvae's cases (YAML value); repeatable",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device, ddconfig, args.variants = resolve_common(args)
    args.loss_params = dict(args.loss_param)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    base = {"bench": "train_step", "model": args.model, "batch": args.batch, "resolution": args.resolution,
            "precision": args.precision, "perceptual_backbone": args.perceptual_backbone,
            **device_info(device)}  # fmt: skip
    if args.klvae:
        bench_klvae(args, device, ddconfig, base)
    bench_diffusers(args, device, ddconfig, base)


if __name__ == "__main__":
    main()
