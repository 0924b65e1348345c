"""Loader throughput: JPEG shards of ~512-pixel photographs -> 256² training tensors, images/s per worker.

Builds benchmark shards from scikit-image's bundled photographs (random crops of random aspect ratio,
shorter side resized to 512, JPEG quality 90), then times ``WebDataModule``'s training loader with ONE
worker process (decode + resize + crop + flip + float conversion + IPC), after a warm-up. Prints one JSON
line per configuration. A 16-GPU run at batch 12 and ~1 it/s needs ~12 img/s per GPU, i.e. one or two
workers; LDM's 384 -> 256 recipe costs more (no 2x DCT shortcut from 512).

    python benchmarks/loader.py [--samples 1536] [--batch-size 32] [--resize-to 256 384]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

from klvae.data import WebDataModule
from klvae.data.sample_images import skimage_photo_paths
from klvae.data.transforms import to_rgb


def build_shards(out: Path, samples: int, side: int = 512, per_shard: int = 256, seed: int = 0) -> str:
    """Write ``samples`` JPEG crops (shorter side ``side``) of the bundled photographs; return the pattern."""
    rng = random.Random(seed)
    photos = [to_rgb(Image.open(p)) for p in skimage_photo_paths()]
    n_shards = (samples + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"bench-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                photo = rng.choice(photos)
                w, h = photo.size
                crop = rng.uniform(0.6, 1.0) * min(w, h)
                aspect = rng.uniform(0.75, 4 / 3)
                cw, ch = min(w, crop * aspect), min(h, crop)
                left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                scale = side / min(cw, ch)
                size = (round(cw * scale), round(ch * scale))
                image = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue()})
    return str(out / f"bench-{{000000..{n_shards - 1:06d}}}.tar")


def _timed(loader, warmup: int, clock) -> tuple[int, float, tuple]:
    images, start = 0, None
    for i, batch in enumerate(loader):
        if i == warmup:  # worker started, first shard open, shuffle buffer filled
            start = clock()
        elif i > warmup:
            images += batch["image"].shape[0]
    return images, clock() - start, tuple(batch["image"].shape[1:])


def measure(pattern: str, samples: int, batch_size: int, size: int, resize_to: int, warmup: int) -> dict:
    """Images/s of one loader worker process (wall clock) and images per CPU-second of the same pipeline
    run in-process (insensitive to other jobs sharing the CPU), excluding ``warmup`` batches."""
    results = {}
    for workers, clock in ((1, time.perf_counter), (0, time.process_time)):
        images, elapsed, shape = _timed(
            _loader(pattern, samples, batch_size, size, resize_to, workers), warmup, clock
        )
        assert shape == (3, size, size), shape
        results[workers] = (images, round(images / elapsed, 1))
    return {
        "benchmark": "loader",
        "img_per_s_per_worker": results[1][1],
        "img_per_cpu_s_in_process": results[0][1],
        "workers": 1,
        "images_timed": results[1][0],
        "batch_size": batch_size,
        "source_shorter_side": 512,
        "resize_to": resize_to,
        "size": size,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _loader(pattern: str, samples: int, batch_size: int, size: int, resize_to: int, workers: int):
    dm = WebDataModule(
        train={"shards": pattern, "epoch_length": samples},
        size=size,
        resize_to=resize_to,
        random_flip=True,
        batch_size=batch_size,
        num_workers=workers,
        shuffle_buffer=256,
        pin_memory=False,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1536, help="benchmark images to write and time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--resize-to", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--warmup", type=int, default=3, help="batches excluded from timing")
    parser.add_argument("--shard-dir", default=None, help="reuse/keep shards here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.shard_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        existing = sorted(out.glob("bench-*.tar"))
        if existing:
            pattern = str(out / f"bench-{{000000..{len(existing) - 1:06d}}}.tar")
        else:
            pattern = build_shards(out, args.samples)
        for resize_to in args.resize_to:
            result = measure(pattern, args.samples, args.batch_size, args.size, resize_to, args.warmup)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
