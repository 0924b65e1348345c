"""``ImageFolderDataModule``: a folder tree of images, same transforms and batch format as the shards.

For small runs, demos and tests. Map-style, with klvae's own sampler (``klvae.data.resume``): the order is a
function of (seed, epoch) and each crop/flip of (seed, epoch, file index), and the training loader's
position is checkpointed, so a resumed run sees exactly the batches the uninterrupted one would. In
training and validation a corrupt or too-small file is counted and replaced by another file (the batch
stays full); the counts travel in ``batch["_skipped"]`` like the webdataset loader's. Evaluation tools use
``substitute=False``: a bad file is then skipped and reported, never replaced.

With ``buckets`` or ``phases`` the module samples whole batches instead (``klvae.data.folder_batches``):
one bucket shape per batch, the batch size of the batch's phase.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from klvae.data.buckets import BucketConfig, build_transform
from klvae.data.folder_batches import (
    FolderBatches,
    FolderBatchPlan,
    FolderBatchSampler,
    bucket_members,
    read_image_sizes,
    validation_keys,
)
from klvae.data.phases import PhaseSchedule
from klvae.data.resume import ResumableLoader, map_style_loader
from klvae.data.sharding import distributed_info
from klvae.data.stats import SKIP_KINDS, SKIPPED_KEY, SkipCounter
from klvae.data.transforms import IMAGE_EXTENSIONS, ImageTooSmallError, ImageTransform, to_model_batch
from klvae.data.workers import ignore_stop_signals
from klvae.errors import ConfigError, DataError

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "list_images"]

_FOLDER_EXTENSIONS = {f".{e}" for e in IMAGE_EXTENSIONS} | {".bmp", ".tif", ".tiff"}
_MAX_RETRIES = 20


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted, extension match case-insensitive)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root, followlinks=True)
        for name in names
        if Path(name).suffix.lower() in _FOLDER_EXTENSIONS
    )
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no {sorted(_FOLDER_EXTENSIONS)} files")
    return files


class ImageFolderDataset(Dataset):
    """Images under a folder -> dict samples ``{"image": uint8 (size, size, 3), "__key__", "_skipped"}``.

    Indices are ints or ``(epoch, index)`` pairs (from :class:`ResumableSampler`); the crop and flip of a
    sample are drawn from a generator seeded with (seed, epoch, index), so they do not depend on the
    worker, on the process or on what ran before.

    Args:
        root: the folder (searched recursively).
        transform: the train or validation transform.
        seed: mixed into every sample's generator.
        substitute: replace a bad file by another one (training: the batch stays full). Without it a bad
            file yields ``{"image": None, "__key__", "error"}`` for the caller to skip and report.
    """

    def __init__(
        self, root: str | Path, transform: ImageTransform, seed: int = 0, substitute: bool = True
    ) -> None:
        self.root = Path(root).expanduser()
        self.files = list_images(self.root)
        self.transform = transform
        self.seed = seed
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.files)

    def _key(self, path: Path) -> str:
        return str(path.relative_to(self.root).with_suffix(""))

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        rng = random.Random(f"klvae/{self.seed}/{epoch}/{index}")
        counter = SkipCounter()
        first_error = ""
        for attempt in range(_MAX_RETRIES if self.substitute else 1):
            # Replace a bad file by a pseudo-random other one, deterministic given index and attempt.
            i = index if attempt == 0 else (index + attempt * 7919) % len(self.files)
            path = self.files[i]
            try:
                image = self.transform(path.read_bytes(), rng)
            except ImageTooSmallError as exn:
                counter.add("too_small", f"{path}: {exn}")
                first_error = first_error or f"{path}: {exn}"
                continue
            except Exception as exn:  # corrupt/truncated/unreadable: count and replace, never crash
                counter.add("corrupt_image", f"{path}: {exn!r}")
                first_error = first_error or f"{path}: {exn!r}"
                continue
            return {"image": image, "__key__": self._key(path), SKIPPED_KEY: counter.take()}
        if not self.substitute:
            return {"image": None, "__key__": self._key(self.files[index]), "error": first_error,
                    SKIPPED_KEY: counter.take()}  # fmt: skip
        raise DataError(
            f"{_MAX_RETRIES} images in a row could not be used in {self.root} (first error: {first_error}); "
            "check the files and data.params.min_size"
        )


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


def _keep_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The collate of the batch-sampling path: the dataset already returns whole batches."""
    return batch


class ImageFolderDataModule(pl.LightningDataModule):
    """Folder(s) of images -> batches ``{image_key: float32 (B, 3, size, size) in [-1, 1], "__key__",
    "_skipped"}``.

    Args:
        train_dir: Folder of training images (searched recursively).
        val_dir: Folder of validation images; None disables validation.
        size: Crop side; with ``buckets`` the target whose area the buckets approximate; with ``phases``
            the validation resolution.
        resize_to: Shorter side before cropping; None resizes to ``size``.
        min_size: Skip (count, replace) images whose shorter side is below this.
        random_flip: Random horizontal flips in training.
        batch_size: Per-GPU batch size.
        num_workers: Loader worker processes.
        seed: Seed mixed into the per-sample crop generator.
        image_key: Batch key of the image tensor.
        drop_last: Drop the last partial training batch (always, per bucket, with buckets or phases).
        buckets: ``{step, max_aspect}`` (:class:`klvae.data.buckets.BucketConfig`): each image in its
            nearest aspect-ratio bucket, one bucket per batch, in training and validation.
        phases: ``[{iterations, size, batch_size, resize_to}, ...]`` (:class:`klvae.data.phases.PhaseSchedule`).
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
        buckets: dict | None = None,
        phases: list | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"ImageFolderDataModule: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"ImageFolderDataModule: num_workers must be an int >= 0, got {num_workers!r}")
        self.train_dir, self.val_dir = train_dir, val_dir
        self.buckets = BucketConfig.from_config(buckets)
        self.phases = PhaseSchedule.from_config(phases, size, batch_size, resize_to)
        # Batches are sampled whole when their shape or size can vary (see klvae.data.folder_batches).
        self.batch_sampling = self.buckets is not None or self.phases.configured
        if self.batch_sampling and not drop_last:
            raise ConfigError(
                "ImageFolderDataModule: drop_last: false cannot be combined with buckets or phases "
                "(every batch is full and one bucket); remove drop_last"
            )
        self.train_transforms = [
            build_transform(p.size, p.resize_to, self.buckets, min_size, random_flip, train=True)
            for p in self.phases
        ]
        self.train_transform = self.train_transforms[0]
        self.val_transform = build_transform(size, resize_to, self.buckets, min_size, False, train=False)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.image_key = image_key
        self.drop_last = drop_last
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None
        self._train_batches: FolderBatches | None = None
        self._val_batches: FolderBatches | None = None

    def image_shapes(self) -> set[tuple[int, int]]:
        """Every (height, width) a training or validation batch can have (all phases, all buckets)."""
        return {shape for t in [*self.train_transforms, self.val_transform] for shape in t.shapes}

    def setup(self, stage: str | None = None) -> None:
        """List the image files (fails naming the folder if it is missing or empty); with buckets, read
        every file's size from its header."""
        if self.train_set is None:
            self.train_set = ImageFolderDataset(self.train_dir, self.train_transform, self.seed)
            if self.drop_last and len(self.train_set) < self.batch_size:
                raise DataError(
                    f"train_dir {self.train_dir!r} has {len(self.train_set)} images, fewer than batch_size "
                    f"{self.batch_size} with drop_last: lower batch_size or set drop_last: false"
                )
            if self.batch_sampling:
                self._train_batches = self._batches(self.train_set)
                self._plan(self._train_batches, rank=0, world_size=1)  # fails now if a phase has no batch
        if self.val_dir is not None and self.val_set is None:
            self.val_set = ImageFolderDataset(self.val_dir, self.val_transform, self.seed)
            if self.batch_sampling:
                self._val_batches = self._batches(self.val_set)

    def _batches(self, files: ImageFolderDataset) -> FolderBatches:
        needs_sizes = self.buckets is not None
        sizes = read_image_sizes(files.files) if needs_sizes else [None] * len(files)
        return FolderBatches(
            files.files,
            files.root,
            [bucket_members(t, sizes) for t in self.train_transforms],
            bucket_members(self.val_transform, sizes),
            self.train_transforms,
            self.val_transform,
            self.phases,
            self.seed,
            self.image_key,
        )

    def _plan(self, batches: FolderBatches, rank: int, world_size: int) -> FolderBatchPlan:
        plan = FolderBatchPlan(batches.members, self.phases, rank, world_size, self.seed)
        for i, phase in enumerate(self.phases):
            if plan.batches_per_pass(i) == 0:
                raise DataError(
                    f"train_dir {self.train_dir!r}: phase {i} has fewer full batches of {phase.batch_size} "
                    f"images of one bucket than ranks ({world_size}): lower the batch size or add images"
                )
        return plan

    def _batch_loader(self, batches: FolderBatches, train: bool) -> DataLoader:
        rank, world_size = distributed_info(getattr(self, "trainer", None))
        if train:
            plan = self._plan(batches, rank, world_size)
            sampler = FolderBatchSampler(batches, plan, plan.batches_per_pass(0))
        else:
            keys = validation_keys(batches.val_members, self.batch_size, rank, world_size)
            sampler = FolderBatchSampler(batches, None, len(keys), keys)
        return ResumableLoader(
            batches,
            lambda: getattr(self, "trainer", None),
            sampler.start_epoch,
            batch_size=None,  # the dataset returns whole batches
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_keep_batch,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_stop_signals,
        )

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        rank, world_size = distributed_info(getattr(self, "trainer", None))
        return map_style_loader(
            dataset,
            lambda: getattr(self, "trainer", None),
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.image_key),
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches shuffled per epoch, split over ranks; resumable mid-epoch."""
        self.setup("fit")
        if self._train_batches is not None:
            return self._batch_loader(self._train_batches, train=True)
        return self._loader(self.train_set, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or [] without ``val_dir``."""
        self.setup("validate")
        if self._val_batches is not None:
            return self._batch_loader(self._val_batches, train=False)
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False, drop_last=False)
