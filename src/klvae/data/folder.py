"""``ImageFolderDataModule``: a folder tree of images, same transforms and batch format as the shards.

For small runs, demos and tests. Map-style, so under DDP Lightning adds its DistributedSampler (shuffled
for training, in order for validation). A corrupt or too-small file is counted and replaced by another
file (the batch stays full); the counts travel in ``batch["_skipped"]`` like the webdataset loader's.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from klvae.data.stats import SKIP_KINDS, SKIPPED_KEY, SkipCounter
from klvae.data.transforms import IMAGE_EXTENSIONS, ImageTooSmallError, ImageTransform, to_model_batch

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "list_images"]

_FOLDER_EXTENSIONS = {f".{e}" for e in IMAGE_EXTENSIONS} | {".bmp", ".tif", ".tiff"}
_MAX_RETRIES = 20


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, extension match case-insensitive)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root, followlinks=True)
        for name in names
        if Path(name).suffix.lower() in _FOLDER_EXTENSIONS
    )
    if not files:
        raise ValueError(f"image folder {str(root)!r} holds no {sorted(_FOLDER_EXTENSIONS)} files")
    return files


class ImageFolderDataset(Dataset):
    """Images under a folder -> dict samples ``{"image": uint8 (size, size, 3), "__key__", "_skipped"}``."""

    def __init__(self, root: str | Path, transform: ImageTransform, seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.files = list_images(self.root)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # torch.initial_seed() differs per worker and per epoch (the DataLoader draws a base seed per
        # iterator), so crops change between epochs; validation crops are centred and ignore the rng.
        rng = random.Random(f"{self.seed}/{torch.initial_seed()}/{index}")
        counter = SkipCounter()
        for attempt in range(_MAX_RETRIES):
            # Replace a bad file by a pseudo-random other one, deterministic given index and attempt.
            i = index if attempt == 0 else (index + attempt * 7919) % len(self.files)
            path = self.files[i]
            try:
                image = self.transform(path.read_bytes(), rng)
            except ImageTooSmallError as exn:
                counter.add("too_small", f"{path}: {exn}")
                continue
            except Exception as exn:  # corrupt/truncated/unreadable: count and replace, never crash
                counter.add("corrupt_image", f"{path}: {exn!r}")
                continue
            key = str(path.relative_to(self.root).with_suffix(""))
            return {"image": image, "__key__": key, SKIPPED_KEY: counter.take()}
        raise RuntimeError(f"{_MAX_RETRIES} consecutive unreadable or too-small images in {self.root}")


class _Collate:
    """Picklable collate: stack crops into float [-1, 1] BCHW under ``image_key``; sum the skip counts."""

    def __init__(self, image_key: str) -> None:
        self.image_key = image_key

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = {kind: sum(s[SKIPPED_KEY][kind] for s in samples) for kind in SKIP_KINDS}
        return {
            self.image_key: to_model_batch([s["image"] for s in samples]),
            "__key__": [s["__key__"] for s in samples],
            SKIPPED_KEY: skipped,
        }


class ImageFolderDataModule(pl.LightningDataModule):
    """Folder(s) of images -> batches ``{image_key: float32 (B, 3, size, size) in [-1, 1], "__key__",
    "_skipped"}``.

    Args:
        train_dir: Folder of training images (searched recursively).
        val_dir: Folder of validation images; None disables validation.
        size: Crop side.
        resize_to: Shorter side before cropping; None resizes to ``size``.
        min_size: Skip (count, replace) images whose shorter side is below this.
        random_flip: Random horizontal flips in training.
        batch_size: Per-GPU batch size.
        num_workers: Loader worker processes.
        seed: Seed mixed into the per-sample crop generator.
        image_key: Batch key of the image tensor.
        drop_last: Drop the last partial training batch.
    """

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        size: int = 256,
        resize_to: int | None = None,
        min_size: int = 0,
        random_flip: bool = False,
        batch_size: int = 12,
        num_workers: int = 0,
        seed: int = 0,
        image_key: str = "image",
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ImageFolderDataModule: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"ImageFolderDataModule: num_workers must be an int >= 0, got {num_workers!r}")
        self.train_dir, self.val_dir = train_dir, val_dir
        self.train_transform = ImageTransform(size, resize_to, min_size, random_flip, train=True)
        self.val_transform = ImageTransform(size, resize_to, min_size, False, train=False)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.image_key = image_key
        self.drop_last = drop_last
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """List the image files (fails naming the folder if it is missing or empty)."""
        if self.train_set is None:
            self.train_set = ImageFolderDataset(self.train_dir, self.train_transform, self.seed)
            if self.drop_last and len(self.train_set) < self.batch_size:
                raise ValueError(
                    f"train_dir {self.train_dir!r} has {len(self.train_set)} images, fewer than batch_size "
                    f"{self.batch_size} with drop_last: lower batch_size or set drop_last: false"
                )
        if self.val_dir is not None and self.val_set is None:
            self.val_set = ImageFolderDataset(self.val_dir, self.val_transform, self.seed)

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.image_key),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (DistributedSampler added by Lightning under DDP)."""
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or [] without ``val_dir``."""
        self.setup("validate")
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False, drop_last=False)
