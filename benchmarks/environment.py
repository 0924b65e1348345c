#!/usr/bin/env python
"""One JSON line describing where the benchmarks run: versions, the device, where LPIPS weights were found.

The GPU check's first step (``benchmarks/gpu_check.py``): a missing wheel or an absent GPU shows here,
before any benchmark starts.

    python benchmarks/environment.py
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable (benchmarks.*)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.measure import emit
from klvae.io.cache import VGG16_HUB_FILENAME, lpips_full_path, torch_hub_checkpoint

# What the benchmarks and the GPU tests import beyond torch (a missing one is named, not raised).
MODULES = ("triton", "pytorch_lightning", "lpips", "diffusers", "omegaconf", "timm", "pytest", "klvae")


def environment() -> dict[str, Any]:
    """Python/torch versions, the CUDA device (if any), each of :data:`MODULES`' version, LPIPS weights."""
    record: dict[str, Any] = {
        "bench": "env",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if record["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        record |= {
            "device_name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        }  # fmt: skip
    for module in MODULES:
        try:
            record[f"version_{module}"] = getattr(importlib.import_module(module), "__version__", "present")
        except Exception as err:  # noqa: BLE001  (reported; the steps that need it fail with the traceback)
            record[f"version_{module}"] = f"MISSING ({type(err).__name__}: {err})"[:160]
    found = [p for p in (torch_hub_checkpoint(VGG16_HUB_FILENAME), lpips_full_path()) if p.is_file()]
    record["lpips_weights"] = str(found[0]) if found else None
    return record


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    emit(environment())


if __name__ == "__main__":
    main()
