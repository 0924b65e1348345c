"""Measurement utilities shared by the benchmark scripts (``train_step.py``, ``codec.py``).

Timing brackets only device work (``synchronize`` on both ends); peak memory is CUDA's
``max_memory_allocated`` on GPU and the process's peak RSS on CPU (a coarse upper bound, labelled so, and
not resettable: on CPU the steady-state and warm-up peaks are the same number).

Fairness: :func:`set_backend_flags` puts cudnn.benchmark/TF32 to the same values before every case (a
klvae variant turning cudnn.benchmark on must not speed up the next case), and the warm-up iterations
(where torch.compile compiles and cudnn autotunes) are timed and measured apart from the steady state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

__all__ = [
    "BackendFlags",
    "autocast_context",
    "device_info",
    "emit",
    "peak_memory_gib",
    "peak_tflops_for",
    "reset_peak_memory",
    "set_backend_flags",
    "summarize",
    "synchronize",
    "time_calls",
]

log = logging.getLogger(__name__)

# Dense bf16 matmul throughput actually reached (not the data-sheet number), per device name fragment.
_PEAK_BF16_TFLOPS = {"H100": 798.0, "H200": 798.0}


@dataclasses.dataclass(frozen=True)
class BackendFlags:
    """Global numerics/autotuning switches every benchmark case runs under (reported with each record)."""

    cudnn_benchmark: bool
    tf32: bool

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


def set_backend_flags(flags: BackendFlags) -> None:
    """Set cudnn.benchmark and TF32 (cuBLAS and cuDNN) to ``flags``; call before every case."""
    torch.backends.cudnn.benchmark = flags.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = flags.tf32
    torch.backends.cudnn.allow_tf32 = flags.tf32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(peak GiB, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_memory_allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 2**30 if sys.platform == "darwin" else 2**20
    return rss_kib / scale, "cpu_process_max_rss"


def peak_tflops_for(device: torch.device, override: float | None) -> float | None:
    """``override`` if given, else the table value for a known GPU, else None (MFU not reported)."""
    if override is not None:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def device_info(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast (weights stay fp32) or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def time_calls(
    fn: Callable[[], Any], device: torch.device, warmup: int, steps: int, warmup_record: dict | None = None
) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` calls after ``warmup`` ones.

    With ``warmup_record`` (a dict), the warm-up calls are timed into ``warmup_record["times"]``, their
    peak memory goes to ``warmup_record["peak_gib"]`` and the peak counter is reset before timing.
    """
    warmup_times = []
    for _ in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        warmup_times.append(time.perf_counter() - t0)
    if warmup_record is not None:
        warmup_record["times"] = warmup_times
        warmup_record["peak_gib"] = peak_memory_gib(device)[0] if warmup else None
        if warmup:
            reset_peak_memory(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(
    times: list[float],
    batch: int,
    flops_per_iter: float | None,
    peak_tflops: float | None,
    warmup_times: list[float] | None = None,
) -> dict[str, Any]:
    """img/s, ms/iteration (mean, median, min, max), achieved TFLOP/s and MFU from per-iteration times.

    With ``warmup_times``: ``warmup_s`` (their sum) and ``compile_s``, the warm-up's excess over as many
    steady-state iterations (torch.compile and autotuning time, an estimate).
    """
    mean = statistics.fmean(times)
    out: dict[str, Any] = {}
    if warmup_times:
        out["warmup_s"] = round(sum(warmup_times), 3)
        out["compile_s"] = round(
            max(sum(warmup_times) - len(warmup_times) * statistics.median(times), 0.0), 3
        )
    out |= {
        "iterations_timed": len(times),
        "ms_per_iter": round(1e3 * mean, 3),
        "ms_per_iter_median": round(1e3 * statistics.median(times), 3),
        "ms_per_iter_min": round(1e3 * min(times), 3),
        "ms_per_iter_max": round(1e3 * max(times), 3),
        "img_per_s": round(batch / mean, 3),
        "flops_per_iter": flops_per_iter,
        "gflops_per_img": round(flops_per_iter / batch / 1e9, 2) if flops_per_iter else None,
        "tflops_per_s": round(flops_per_iter / mean / 1e12, 4) if flops_per_iter else None,
        "peak_tflops": peak_tflops,
        "mfu": round(flops_per_iter / mean / (peak_tflops * 1e12), 4)
        if flops_per_iter and peak_tflops
        else None,
    }
    return out


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout (the benchmark's result format)."""
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()
