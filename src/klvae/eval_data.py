"""Held-out images for evaluation and latent statistics: a folder tree or webdataset shards, center-cropped.

Uses the data package's readers and transform (resize the shorter side to ``resolution``, center crop
``resolution``², bicubic), the protocol of the published 256² evaluations, so the pixels match training's
validation path exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from klvae.data.folder import ImageFolderDataset
from klvae.data.sharding import expand_shards
from klvae.data.streams import ValStream
from klvae.data.transforms import ImageTransform, to_model_batch

__all__ = ["image_batches", "is_folder"]


def is_folder(source: str) -> bool:
    """True for an existing directory; anything else is treated as a shard spec."""
    return Path(source).expanduser().is_dir()


def _collate(samples: list[dict]) -> dict:
    return {
        "image": to_model_batch([s["image"] for s in samples]),
        "__key__": [s["__key__"] for s in samples],
    }


def image_batches(
    source: str, resolution: int, batch_size: int, num_workers: int = 0
) -> tuple[Iterator[tuple[torch.Tensor, list[str]]], int | None]:
    """Batches of (images (B, 3, R, R) float in [-1, 1], keys) from a folder or shard spec.

    Args:
        source: an image folder (recursive) or shards (``/data/val-{000000..000009}.tar``, a glob, ``a::b``).
        resolution: R, the evaluation crop side.
        batch_size: images per batch (the last one may be smaller).
        num_workers: DataLoader workers for decoding.

    Returns:
        (iterator, number of images if known (folders) else None).
    """
    transform = ImageTransform(resolution, train=False)
    if is_folder(source):
        dataset = ImageFolderDataset(source, transform)
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
        )
        total = len(dataset)
    else:
        urls = expand_shards(source, where="--data")
        stream = ValStream(urls, transform, batch_size, "image", rank=0, world_size=1, seed=0)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        total = None

    def batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
        for batch in loader:
            yield batch["image"], list(batch["__key__"])

    return batches(), total
