"""Argument and model-building helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from klvae.modules.vae import KL_F8_DDCONFIG
from klvae.perf.options import Optimizations, parse_optimizations

# Same tiny network as tests/conftest.py (f = 8, widths 8-16): for CPU smoke runs.
TINY_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 8,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_num_groups": 4,
}  # fmt: skip

# Every switch off: the eager fp32-style reference path.
PRESETS: dict[str, dict[str, Any]] = {
    "plain": {
        "compile": False, "fused_adam": False, "channels_last": [], "lpips_target_no_grad": False,
        "gradient_checkpointing": False, "cudnn_benchmark": False,
    },
    "default": {},
}  # fmt: skip

# --sweep: each switch alone on top of "plain", then the defaults and memory-saving variants.
SWEEP = [
    "plain",
    "plain+cudnn_benchmark=true",
    "plain+fused_adam=true",
    "plain+lpips_target_no_grad=true",
    "plain+channels_last=[lpips]",
    "plain+channels_last=[encoder,decoder,lpips]",
    "plain+compile=true+compile_regions=[encoder,decoder]",
    "plain+compile=true",
    "default",
    "default+compile_mode=max-autotune-no-cudagraphs",
    "default+gradient_checkpointing=true",
]


def parse_variant(spec: str) -> Optimizations:
    """``preset[+key=value...]`` → Optimizations; values are YAML (``true``, ``[lpips]``)."""
    name, *overrides = spec.split("+")
    if name not in PRESETS:
        raise ValueError(f"variant {spec!r}: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    config = dict(PRESETS[name])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"variant {spec!r}: expected key=value after '+', got {item!r}")
        config[key] = yaml.safe_load(value)
    return parse_optimizations(config)


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) for a command-line flag."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["kl-f8", "tiny"], default="kl-f8")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 CUDA, fp32 CPU"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed iterations")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations (default: 1 CPU, 5 CUDA)"
    )
    parser.add_argument("--variant", action="append", default=None, help="preset[+key=value...]; repeatable")
    parser.add_argument("--sweep", action="store_true", help="run the standard list of variants")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU denominator (default: 798 on H100/H200)"
    )
    parser.add_argument("--diffusers", choices=["auto", "none", "eager", "compiled", "both"], default="auto")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions in every case")
    parser.add_argument(
        "--cudnn-benchmark", type=parse_bool, default=None, metavar="{true,false}",
        help="cudnn.benchmark for every case (default: each klvae variant's own switch; diffusers: "
        "klvae's default on the device)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-backend", choices=["inductor", "aot_eager"], default="inductor",
        help="torch.compile backend of every compiled case. aot_eager (the same graphs with eager kernels, "
        "seconds to compile) also compiles on a CPU what a GPU run compiles: klvae variants whose compile "
        "switch is auto, and diffusers with --diffusers auto",
    )  # fmt: skip


def quiet_lightning() -> None:
    """Keep stdout to JSON lines: Lightning's per-run notices are irrelevant to a benchmark."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    for pattern in (
        ".*no logger configured.*",
        ".*val_dataloader.*",
        ".*module\\(s\\) in eval mode.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def resolve_common(args: argparse.Namespace) -> tuple[torch.device, dict[str, Any], list[str]]:
    quiet_lightning()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    if args.precision is None:  # bf16 convolutions are very slow on CPUs without AMX
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.warmup is None:
        args.warmup = 5 if device.type == "cuda" else 1
    if args.diffusers == "auto":  # inductor on a CPU takes minutes; aot_eager compiles in seconds
        args.diffusers = "both" if device.type == "cuda" or args.compile_backend == "aot_eager" else "eager"
    ddconfig = copy.deepcopy(KL_F8_DDCONFIG if args.model == "kl-f8" else TINY_DDCONFIG)
    ddconfig["resolution"] = args.resolution
    variants = SWEEP if args.sweep else (args.variant or ["default"])
    for spec in variants:
        parse_variant(spec)  # fail before any model is built
    return device, ddconfig, variants


class RepeatedBatch(Dataset):
    """``length`` identical batches ``{"image": (B, 3, H, W)}`` in [-1, 1] (use with ``batch_size=None``)."""

    def __init__(self, batch: int, resolution: int, length: int) -> None:
        self.images = torch.rand(batch, 3, resolution, resolution) * 2 - 1
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images}


def batch_loader(batch: int, resolution: int, length: int, device: torch.device) -> DataLoader:
    return DataLoader(
        RepeatedBatch(batch, resolution, length), batch_size=None, pin_memory=device.type == "cuda"
    )
