"""Held-out images for evaluation and latent statistics: a folder tree or webdataset shards, center-cropped.

Uses the data package's readers and transform (resize the shorter side to ``resolution``, center crop
``resolution``², bicubic), the protocol of the published 256² evaluations, so the pixels match training's
validation path exactly.

Unlike training, nothing is ever substituted: a file or sample that cannot be used is skipped and
recorded (key and reason) in :attr:`ImageBatches.skipped`, so the image count and per-image scores are
exact and the report can list what was left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset
from webdataset.tariterators import tarfile_samples

from klvae.data.folder import ImageFolderDataset
from klvae.data.sharding import assign_shards, expand_shards, worker_info
from klvae.data.transforms import ImageTransform, find_image_key, to_model_batch
from klvae.data.workers import ignore_stop_signals
from klvae.errors import ConfigError

__all__ = ["ImageBatches", "check_resolution", "image_batches", "is_folder"]


def is_folder(source: str) -> bool:
    """True for an existing directory; anything else is treated as a shard spec."""
    return Path(source).expanduser().is_dir()


def check_resolution(resolution: int, downsampling: int, flag: str = "--resolution") -> None:
    """The evaluation crop side must be a multiple of the VAE's downsampling factor ``f``: else the
    latents cover a cropped or padded image and the reconstruction does not match the input's size.

    Raises:
        ConfigError: naming the value and the nearest sides that work.
    """
    if resolution % downsampling:
        lower = resolution - resolution % downsampling
        choices = f"{lower} or {lower + downsampling}" if lower else str(downsampling)
        raise ConfigError(
            f"{flag} {resolution} is not a multiple of the VAE's downsampling factor {downsampling}; use {choices}"
        )


def _collate(samples: list[dict]) -> dict:
    good = [s for s in samples if s["image"] is not None]
    return {
        "image": to_model_batch([s["image"] for s in good]) if good else None,
        "__key__": [s["__key__"] for s in good],
        "skipped": [{"key": s["__key__"], "error": s["error"]} for s in samples if s["image"] is None],
    }


class _ShardSamples(IterableDataset):
    """Every sample of the shards once, in order, split over workers; bad ones reported, not replaced."""

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        batch_size: int,
        select: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__()
        self.urls, self.transform, self.batch_size, self.select = urls, transform, batch_size, select

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        assignment = assign_shards(self.urls, 0, 1, worker, num_workers)
        images: list = []
        keys: list[str] = []
        skipped: list[dict[str, str]] = []

        def flush() -> dict:
            batch = {"image": to_model_batch(images) if images else None, "__key__": list(keys),
                     "skipped": list(skipped)}  # fmt: skip
            images.clear(), keys.clear(), skipped.clear()
            return batch

        for url in assignment.urls:
            errors: list[Exception] = []

            def handler(exn: Exception, errors: list = errors) -> bool:
                errors.append(exn)
                return True

            for index, sample in enumerate(tarfile_samples([{"url": url}], handler=handler)):
                if index % assignment.stride != assignment.offset:
                    continue
                key = f"{Path(url).name}:{sample.get('__key__')}"
                if self.select is not None and not self.select(key):
                    continue
                image_key = find_image_key(sample)
                try:
                    if image_key is None:
                        raise ValueError(
                            f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})"
                        )
                    images.append(self.transform(sample[image_key], None))
                    keys.append(key)
                except Exception as exn:
                    skipped.append({"key": key, "error": f"{type(exn).__name__}: {exn}"[:300]})
                if len(images) == self.batch_size:
                    yield flush()
            skipped.extend({"key": Path(url).name, "error": f"read error: {e!r}"[:300]} for e in errors)
            if os.path.isfile(url) and os.path.getsize(url) % 512 and assignment.offset == 0:
                skipped.append(
                    {"key": Path(url).name, "error": "truncated tar: samples after the cut are lost"}
                )
        if images or skipped:
            yield flush()


class ImageBatches:
    """Iterate ``(images (B, 3, R, R) float in [-1, 1], keys)``; ``skipped`` fills up while iterating.

    Attributes:
        total: number of candidate images when known in advance (folders), else None.
        skipped: ``{"key", "error"}`` for every file or sample that could not be used.
    """

    def __init__(self, loader: DataLoader, total: int | None) -> None:
        self.loader, self.total = loader, total
        self.skipped: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        for batch in self.loader:
            self.skipped.extend(batch["skipped"])
            if batch["image"] is not None:
                yield batch["image"], list(batch["__key__"])


def image_batches(
    source: str,
    resolution: int,
    batch_size: int,
    num_workers: int = 0,
    select: Callable[[str], bool] | None = None,
) -> ImageBatches:
    """Batches of (images (B, 3, R, R) float in [-1, 1], keys) from a folder or shard spec.

    Args:
        source: an image folder (recursive) or shards (``/data/val-{000000..000009}.tar``, a glob, ``a::b``).
        resolution: R, the evaluation crop side.
        batch_size: images per batch (the last one, and batches with skipped files, may be smaller).
        num_workers: DataLoader workers for decoding.
        select: keep only the images whose key it accepts (e.g. a deterministic random subset); the others
            are not decoded. Keys are the folder-relative path without suffix, or ``shard.tar:key``.
    """
    transform = ImageTransform(resolution, train=False)
    common = {"num_workers": num_workers, "worker_init_fn": ignore_stop_signals if num_workers else None}
    if is_folder(source):
        dataset = ImageFolderDataset(source, transform, substitute=False)
        if select is not None:
            dataset = Subset(dataset, [i for i, f in enumerate(dataset.files) if select(dataset._key(f))])
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate, **common)
        return ImageBatches(loader, len(dataset))
    urls = expand_shards(source, where="--data")
    loader = DataLoader(_ShardSamples(urls, transform, batch_size, select), batch_size=None, **common)
    return ImageBatches(loader, None)
