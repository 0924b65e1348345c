#!/usr/bin/env python
"""``klvae-encode`` throughput and where its time goes (read+decode images, to device, encode, to host, write).

Runs the real tool (``klvae.diffusability.encode.encode_to_shards``) several times into fresh directories
on scikit-image's photographs (tiled to ``--images`` files) with an SD-shaped VAE (kl-f8: ch 128,
ch_mult 1,2,4,4, 2 res blocks; random weights: speed does not depend on them) or ``--vae``.

    OMP_NUM_THREADS=2 python benchmarks/encode.py --device cpu --resolution 256 --images 32 --batch 8 --repeats 3
    python benchmarks/encode.py --device cuda --resolution 256 --images 2048 --batch 64 --precision bf16 --flip
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from klvae.data.sample_images import skimage_photo_paths
from klvae.diffusability.encode import encode_to_shards
from klvae.interop.formats import VAEWeights, write_vae
from klvae.modules.config import NetworkConfig
from klvae.modules.vae import KL_F8_DDCONFIG, KLAutoencoder


def write_images(folder: Path, count: int, size: int) -> Path:
    """``count`` JPEGs: the photographs resized to shorter side ``size`` + 16 and cycled."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in skimage_photo_paths()]
    for i in range(count):
        img = photos[i % len(photos)]
        scale = (size + 16) / min(img.size)
        img.resize((round(img.width * scale), round(img.height * scale))).save(
            folder / f"{i:05d}.jpg", quality=90
        )
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", default=None, help="a VAE file (default: SD-shaped kl-f8, random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="klvae-encode-bench-"))
    try:
        vae = args.vae
        if vae is None:
            network = NetworkConfig.from_params(KL_F8_DDCONFIG, 4)
            vae = str(write_vae(VAEWeights(KLAutoencoder(network).state_dict(), network, "klvae-run"),
                                work / "kl-f8-random.safetensors"))  # fmt: skip
        images = write_images(work / "images", args.images, args.resolution)
        runs = []
        for r in range(args.repeats):
            cpu0, t0 = time.process_time(), time.perf_counter()
            result = encode_to_shards(vae, str(images), work / f"out{r}", args.resolution, args.batch,
                                      samples_per_shard=max(1, args.images // 4), flip=args.flip,
                                      precision=args.precision, device=args.device, num_workers=args.num_workers,
                                      progress=False)  # fmt: skip
            wall = time.perf_counter() - t0
            encoded = result.images * (2 if args.flip else 1)
            runs.append({"img_per_s": encoded / wall, "wall_s": wall, "main_cpu_s": time.process_time() - cpu0,
                         **{f"{k}_s": v for k, v in result.seconds.items()}})  # fmt: skip
        keys = [k for k in runs[0] if k != "cpu_total_s"]
        summary = {
            k: (statistics.mean(r[k] for r in runs), statistics.pstdev(r[k] for r in runs)) for k in keys
        }
        print(json.dumps({"config": vars(args), "torch_threads": torch.get_num_threads(), "runs": runs,
                          "mean_std": summary}, indent=2))  # fmt: skip
        parts = ("read", "to_device", "encode", "to_host", "write")
        total = sum(summary[f"{k}_s"][0] for k in parts)
        print(f"{summary['img_per_s'][0]:.2f} ± {summary['img_per_s'][1]:.2f} img/s over {args.repeats} runs; "
              + ", ".join(f"{k} {100 * summary[f'{k}_s'][0] / total:.1f}%" for k in parts))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
