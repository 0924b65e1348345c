"""Write webdataset shards from a folder tree of images or a file list (``klvae-make-shards``).

Each sample is ``{key}.jpg`` + ``{key}.json`` (img2dataset's layout, minus captions), N samples per shard,
``train-000000.tar, train-000001.tar, ...`` and ``val-000000.tar, ...``. The train/validation split is a
hash of each file's relative path: deterministic, independent of file order and of how many files are
added later. JPEGs that need neither resizing nor colour conversion are stored byte for byte.

    klvae-make-shards /data/openimages/train --out /data/shards/oi --samples-per-shard 1000 \
        --resize 512 --val-fraction 0.01 --workers 16
    python -m klvae.data.make_shards --skimage-photos --out demo_shards --val-fraction 0.25
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from klvae.data.folder import _FOLDER_EXTENSIONS, list_images
from klvae.data.sample_images import skimage_photo_paths
from klvae.data.transforms import to_rgb

__all__ = ["ShardSummary", "collect_inputs", "main", "write_shards"]

logger = logging.getLogger(__name__)


@dataclass
class ShardSummary:
    """What ``write_shards`` wrote: counts, bytes, files and the brace patterns to put in a config."""

    count: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bytes: int = 0
    shards: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": []})
    patterns: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def collect_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, str]]:
    """(file, name) pairs from folders (recursive), image files, and list files (one path per line,
    relative paths taken from the list's folder). ``name`` is the path relative to its folder input."""
    found: list[tuple[Path, str]] = []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found.extend((f, f.relative_to(path).as_posix()) for f in list_images(path))
        elif path.is_file() and path.suffix.lower() in _FOLDER_EXTENSIONS:
            found.append((path, path.name))
        elif path.is_file():  # a file list
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    f = Path(line).expanduser()
                    f = f if f.is_absolute() else path.parent / f
                    found.append((f, line))
        else:
            raise ValueError(f"input {str(path)!r} is neither a folder, an image nor a file list")
    if not found:
        raise ValueError(f"no images found in inputs {[str(i) for i in inputs]}")
    return found


def is_validation(name: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split: a hash of (seed, name) mapped to [0, 1) and compared with ``val_fraction``."""
    digest = hashlib.sha1(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def encode_image(path: Path, resize: int | None, quality: int, min_size: int) -> tuple[bytes, dict] | str:
    """JPEG bytes and metadata for one file, or the reason it is skipped (a string)."""
    try:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        fmt, (width, height) = img.format, img.size
        if min(width, height) < min_size:
            return f"too small ({width}x{height} < {min_size})"
        needs_resize = resize is not None and min(width, height) > resize
        if needs_resize and fmt == "JPEG":
            img.draft("RGB", (resize, resize))  # DCT-domain pre-shrink, still >= resize
        img.load()  # decode now: corrupt or truncated files fail here
        meta = {"source": str(path), "original_width": width, "original_height": height}
        if fmt == "JPEG" and img.mode == "RGB" and not needs_resize:
            return data, {**meta, "width": width, "height": height}
        img = to_rgb(img)
        if needs_resize:
            scale = resize / min(img.size)
            size = (max(resize, round(img.width * scale)), max(resize, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
        return out.getvalue(), {**meta, "width": img.width, "height": img.height}
    except Exception as exn:  # any unreadable file is skipped and reported, never fatal
        return f"{type(exn).__name__}: {exn}"


class _SplitWriter:
    """Rolls ``{prefix}-{index:06d}.tar`` files every ``samples_per_shard`` samples."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int, summary: ShardSummary, split: str):
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, samples_per_shard
        self.summary, self.split = summary, split
        self.writer: wds.TarWriter | None = None

    def write(self, jpg: bytes, meta: dict) -> None:
        count = self.summary.count[self.split]
        if count % self.per_shard == 0:
            self.close()
            path = self.out_dir / f"{self.prefix}-{count // self.per_shard:06d}.tar"
            self.writer = wds.TarWriter(str(path))
            self.summary.shards[self.split].append(str(path))
        self.writer.write({"__key__": f"{count:09d}", "jpg": jpg, "json": json.dumps(meta).encode()})
        self.summary.count[self.split] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    resize: int | None = None,
    quality: int = 95,
    val_fraction: float = 0.0,
    seed: int = 0,
    min_size: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> ShardSummary:
    """Write images from folders, image files or file lists into webdataset shards.

    Args:
        inputs: Folders (recursive), image files, or text files listing image paths.
        out_dir: Output folder (created); receives ``train-*.tar``, ``val-*.tar`` and ``summary.json``.
        samples_per_shard: Samples per tar file (webdataset's sweet spot is ~100 MB-1 GB per shard).
        resize: Downscale so the shorter side is this (never upscales); None keeps the size.
        quality: JPEG quality for re-encoded images.
        val_fraction: Fraction of files going to validation (hash split, deterministic).
        seed: Salt of the split hash.
        min_size: Skip images whose shorter side is smaller.
        workers: Processes decoding/encoding in parallel.
        progress: Show a tqdm bar.

    Returns:
        The ``ShardSummary`` (also written to ``out_dir/summary.json``).
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"output folder {str(out)!r} is an existing file; give a folder (created if missing)"
        )
    out.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    summary = ShardSummary()
    writers = {s: _SplitWriter(out, s, samples_per_shard, summary, s) for s in ("train", "val")}
    encode = partial(encode_image, resize=resize, quality=quality, min_size=min_size)
    paths = [f for f, _ in files]
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        results: Iterator = pool.map(encode, paths, chunksize=8) if workers > 1 else map(encode, paths)
        for (path, name), result in tqdm(
            zip(files, results), total=len(files), disable=not progress, unit="img"
        ):
            if isinstance(result, str):
                summary.skipped.append((str(path), result))
                logger.warning("skipping %s: %s", path, result)
                continue
            jpg, meta = result
            writers["val" if is_validation(name, val_fraction, seed) else "train"].write(jpg, meta)
            summary.bytes += len(jpg)
    for split, writer in writers.items():
        writer.close()
        if summary.shards[split]:
            last = len(summary.shards[split]) - 1
            summary.patterns[split] = str(out / f"{split}-{{000000..{last:06d}}}.tar")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2))
    return summary


class _Inline:
    """No-op context manager standing in for the process pool when workers <= 1."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point of ``klvae-make-shards``."""
    parser = argparse.ArgumentParser(prog="klvae-make-shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="folders, image files, or text files listing image paths")
    parser.add_argument(
        "--skimage-photos", action="store_true", help="add scikit-image's bundled photographs"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--resize", type=int, default=None, help="downscale the shorter side to this")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="salt of the train/val hash split")
    parser.add_argument("--min-size", type=int, default=0, help="skip images with a smaller shorter side")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    inputs = list(args.inputs) + ([str(p) for p in skimage_photo_paths()] if args.skimage_photos else [])
    if not inputs:
        parser.error("give at least one input or --skimage-photos")
    from klvae.errors import ConfigError, run_tool

    def body() -> None:
        try:
            _write_and_report(args, inputs)
        except ValueError as exn:  # write_shards rejects bad inputs and settings with ValueError
            raise ConfigError(str(exn)) from exn

    return run_tool("klvae-make-shards", body, args.traceback)


def _write_and_report(args: argparse.Namespace, inputs: list[str]) -> None:
    summary = write_shards(
        inputs,
        args.out,
        samples_per_shard=args.samples_per_shard,
        resize=args.resize,
        quality=args.quality,
        val_fraction=args.val_fraction,
        seed=args.seed,
        min_size=args.min_size,
        workers=args.workers,
        progress=not args.no_progress,
    )
    logger.info(
        "wrote %d train + %d val samples (%.1f MB) in %d + %d shards; skipped %d",
        summary.count["train"],
        summary.count["val"],
        summary.bytes / 1e6,
        len(summary.shards["train"]),
        len(summary.shards["val"]),
        len(summary.skipped),
    )
    for split, pattern in summary.patterns.items():
        logger.info("%s shards: %s", split, pattern)


if __name__ == "__main__":
    raise SystemExit(main())
