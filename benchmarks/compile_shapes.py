#!/usr/bin/env python
"""What many input shapes cost a compiled autoencoder: graphs, compile time and step time per bucket.

Aspect-ratio buckets and resolution phases feed the compiled regions (encoder, decoder) a dozen shapes.
For each ``compile_dynamic`` setting this compiles the regions afresh (``klvae.perf.apply``, graph counting)
and runs a forward + backward step (MSE to the input; bf16 autocast on CUDA) on every bucket shape in
turn: the first call of a shape (compile, if dynamo needs a new graph, plus cuDNN autotuning) and the
median of ``--steps`` further calls. Static graphs (``false``) compile once per shape until dynamo's
recompile limit (8) and then run eager; ``true`` compiles graphs symbolic in batch, height and width.
One JSON line per (setting, shape), then one summary line per setting.

    # H100/H200: kl-f8 at the 1024² buckets, batch 2, inductor
    python benchmarks/compile_shapes.py --model kl-f8 --size 1024 --step 64 --batch 2 --dynamic true false
    # CPU smoke (tiny network, aot_eager)
    python benchmarks/compile_shapes.py --device cpu --model tiny --size 32 --step 8 --batch 2 \\
        --backend aot_eager --dynamic true
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import TINY_DDCONFIG
from benchmarks.measure import autocast_context, device_info, emit, synchronize
from klvae.data.buckets import make_buckets
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder
from klvae.perf.apply import apply_runtime_optimizations
from klvae.perf.options import parse_optimizations


def step(model: KLAutoencoder, x: torch.Tensor, precision: str) -> None:
    with autocast_context(x.device, precision):
        recon = model.decode(model.encode(x).sample())
        loss = torch.nn.functional.mse_loss(recon.float(), x)
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed_step(model: KLAutoencoder, x: torch.Tensor, precision: str) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    step(model, x, precision)
    synchronize(x.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["kl-f8", "tiny"], default="kl-f8")
    parser.add_argument("--size", type=int, default=1024, help="bucket target (area size²)")
    parser.add_argument("--step", type=int, default=64, help="buckets.step")
    parser.add_argument("--max-aspect", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per shape after its first")
    parser.add_argument("--backend", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--dynamic", nargs="+", choices=["true", "false", "null"], default=["true", "false"])
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 CUDA, fp32 CPU"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    ddconfig = dict(KL_F8_DDCONFIG if args.model == "kl-f8" else TINY_DDCONFIG)
    shapes = make_buckets(args.size, args.step, args.max_aspect)
    base = {"bench": "compile_shapes", "model": args.model, "size": args.size, "batch": args.batch,
            "backend": args.backend, "precision": precision, **device_info(device)}  # fmt: skip
    for setting in args.dynamic:
        dynamic = {"true": True, "false": False, "null": None}[setting]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = KLAutoencoder(NetworkConfig.from_params(ddconfig, 4)).to(device).train()
        opts = parse_optimizations({"compile": True, "compile_backend": args.backend, "compile_dynamic": dynamic,
                                    "compile_regions": ["encoder", "decoder"]})  # fmt: skip
        applied = apply_runtime_optimizations(
            {"encoder": model.encoder, "decoder": model.decoder}, opts, device
        )
        first_total = 0.0
        for height, width in shapes:
            x = torch.rand(args.batch, 3, height, width, device=device) * 2 - 1
            first = timed_step(model, x, precision)
            steady = [timed_step(model, x, precision) for _ in range(args.steps)]
            first_total += first
            emit({**base, "compile_dynamic": dynamic, "shape": [height, width], "first_call_s": round(first, 3),
                  "step_s_median": round(statistics.median(steady), 4), "graphs": applied.graph_counts()})  # fmt: skip
        emit({**base, "compile_dynamic": dynamic, "shapes": len(shapes), "first_calls_total_s": round(first_total, 2),
              "graphs": applied.graph_counts(), "summary": True})  # fmt: skip
    torch._dynamo.reset()


if __name__ == "__main__":
    main()
