"""Bucketed and phased batches from an image folder: which files make each batch, and loading one.

The folder datamodule's plain path samples files; with aspect-ratio buckets or resolution phases it
samples whole batches instead, because a batch must hold one bucket shape and its size depends on the
phase. At ``setup`` every file's size is read from its header (no decode), which puts it in a bucket of
each phase. A *pass* over the folder in a phase is then: each bucket's files shuffled and cut into
batches of the phase's batch size (a bucket's last, incomplete batch is dropped: the dropped-last-batch
rule, per bucket), all batches shuffled together, cut to a multiple of the world size, and dealt to the
ranks round robin. Every rank therefore gets the same number of full batches, disjoint from the other
ranks', and ranks may be in different buckets in the same step (gradients are averaged per optimizer
step over parameters, whatever the shapes: ``klvae.training.ddp``).

Batch ``k`` of the run on a rank is a pure function of ``(seed, phase, pass, k)``: the phase comes from
``k`` (``klvae.data.phases``), the pass and the batch within it from ``k`` minus the phase's start. The
loader's position is in the checkpoint (``klvae.data.resume``), so a resume continues exactly. An epoch
holds as many batches as one pass of the first phase; later phases may span more or less than a pass.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from klvae.data.buckets import BucketTransform
from klvae.data.phases import PHASE_KEY, PhaseSchedule
from klvae.data.resume import EpochStart
from klvae.data.stats import SKIPPED_KEY, SkipCounter
from klvae.data.streams import Transform
from klvae.data.transforms import ImageTooSmallError, to_model_batch
from klvae.errors import DataError

__all__ = ["BatchKey", "FolderBatchPlan", "FolderBatchSampler", "FolderBatches", "read_image_sizes"]

logger = logging.getLogger(__name__)

_MAX_RETRIES = 20


class BatchKey(NamedTuple):
    """One batch: its files (indices into the folder's file list) and where it comes from.

    ``phase`` is None for validation batches; ``pass_index`` seeds the crops (with the file index).
    """

    phase: int | None
    pass_index: int
    bucket: int
    files: tuple[int, ...]


def read_image_sizes(files: Sequence[Path]) -> list[tuple[int, int] | None]:
    """(width, height) of every file from its header (nothing decoded); None where the header is bad."""
    started = time.perf_counter()
    sizes: list[tuple[int, int] | None] = []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except Exception:  # counted and replaced when the batch is loaded, like any corrupt file
            sizes.append(None)
    logger.info("read the sizes of %d images in %.1f s", len(files), time.perf_counter() - started)
    return sizes


def bucket_members(transform: Transform, sizes: Sequence[tuple[int, int] | None]) -> list[list[int]]:
    """File indices per bucket of ``transform`` (one bucket for square crops), each in file order.

    A file whose header could not be read goes to the squarest bucket: loading it fails, and it is
    counted and replaced by a file of that bucket.
    """
    if not isinstance(transform, BucketTransform):
        return [list(range(len(sizes)))]
    square = transform.bucket_of(1, 1)
    members: list[list[int]] = [[] for _ in transform.buckets]
    for index, size in enumerate(sizes):
        members[square if size is None else transform.bucket_of(*size)].append(index)
    return members


class FolderBatchPlan:
    """The training batches of one rank, as a function of their position in the run.

    Args:
        members: per phase, the file indices of each bucket (:func:`bucket_members`).
        phases: the run's phases (their batch sizes).
        rank, world_size: this rank and the number of ranks.
        seed: the data seed.
    """

    def __init__(
        self, members: Sequence[Sequence[Sequence[int]]], phases: PhaseSchedule, rank: int, world_size: int,
        seed: int,
    ) -> None:  # fmt: skip
        self.members, self.phases = members, phases
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._cached: tuple[tuple[int, int], list[tuple[int, tuple[int, ...]]]] | None = None

    def batches_per_pass(self, phase: int) -> int:
        """Full batches each rank gets from one pass in ``phase`` (the same for every pass)."""
        size = self.phases[phase].batch_size
        return sum(len(m) // size for m in self.members[phase]) // self.world_size

    def _pass(self, phase: int, pass_index: int) -> list[tuple[int, tuple[int, ...]]]:
        """(bucket, files) of each batch of this rank in pass ``pass_index`` of ``phase``."""
        if self._cached is not None and self._cached[0] == (phase, pass_index):
            return self._cached[1]
        rng = random.Random(f"klvae/buckets/{self.seed}/{phase}/{pass_index}")
        size = self.phases[phase].batch_size
        batches = []
        for bucket, files in enumerate(self.members[phase]):
            order = list(files)
            rng.shuffle(order)
            batches += [(bucket, tuple(order[i : i + size])) for i in range(0, len(order) - size + 1, size)]
        rng.shuffle(batches)
        mine = batches[: len(batches) // self.world_size * self.world_size][self.rank :: self.world_size]
        self._cached = ((phase, pass_index), mine)
        return mine

    def key(self, position: int, batches_per_iteration: int = 1) -> BatchKey:
        """The batch at ``position`` (batches of this rank since the run began)."""
        phase = self.phases.index_of_batch(position, batches_per_iteration)
        offset = position - self.phases.starts[phase] * batches_per_iteration
        pass_index, index = divmod(offset, self.batches_per_pass(phase))
        bucket, files = self._pass(phase, pass_index)[index]
        return BatchKey(phase, pass_index, bucket, files)


def validation_keys(
    members: Sequence[Sequence[int]], batch_size: int, rank: int, world_size: int
) -> list[BatchKey]:
    """Validation batches of one rank: each bucket's files in file order, cut into ``batch_size``
    (the last of a bucket may be short), buckets in order, dealt to the ranks round robin."""
    keys = [
        BatchKey(None, 0, bucket, tuple(files[i : i + batch_size]))
        for bucket, files in enumerate(members)
        for i in range(0, len(files), batch_size)
    ]
    return keys[rank::world_size]


class FolderBatchSampler(DistributedSampler):
    """Yields the :class:`BatchKey` of every batch of an epoch (a ``DistributedSampler``, so Lightning
    never replaces it under DDP); ``start_epoch`` says where the epoch begins in the run.

    Args:
        dataset: the :class:`FolderBatches` (only passed on to ``DistributedSampler``).
        plan: the training plan, or None for validation.
        length: batches per epoch (training) / the validation keys' count.
        val_keys: the validation keys (when ``plan`` is None).
    """

    def __init__(
        self, dataset: Dataset, plan: FolderBatchPlan | None, length: int, val_keys: Sequence[BatchKey] = ()
    ) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)
        self.plan, self.length, self.val_keys = plan, length, list(val_keys)
        self.start = EpochStart(0, 0, 0)

    def __len__(self) -> int:
        return self.length

    def start_epoch(self, start: EpochStart) -> None:
        self.start = start

    def __iter__(self) -> Iterator[BatchKey]:
        if self.plan is None:
            return iter(self.val_keys)
        plan, start = self.plan, self.start
        return (
            plan.key(start.position + k, start.batches_per_iteration) for k in range(start.skip, self.length)
        )


class FolderBatches(Dataset):
    """``dataset[BatchKey]`` -> one batch ``{image_key: (B, 3, H, W), "__key__", "_skipped"[, "_phase"]}``.

    Each crop is seeded by (seed, phase, pass, file); a corrupt or too-small file is counted and replaced
    by another file of the same bucket (deterministically), so the batch stays full and one shape.

    Args:
        files: the folder's image files.
        root: the folder (sample keys are paths relative to it, without suffix).
        members: per phase, the files of each bucket (training); ``val_members`` for validation.
        train_transforms: the train transform of each phase; ``val_transform`` for validation.
        phases: the run's phases (batches carry ``_phase`` when they were configured).
        seed: the data seed.
        image_key: the batch key of the images.
    """

    def __init__(
        self,
        files: Sequence[Path],
        root: Path,
        members: Sequence[Sequence[Sequence[int]]],
        val_members: Sequence[Sequence[int]],
        train_transforms: Sequence[Transform],
        val_transform: Transform,
        phases: PhaseSchedule,
        seed: int,
        image_key: str,
    ) -> None:
        self.files, self.root = list(files), root
        self.members, self.val_members = members, val_members
        self.train_transforms, self.val_transform = list(train_transforms), val_transform
        self.phases, self.seed, self.image_key = phases, seed, image_key

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: BatchKey) -> dict[str, Any]:
        if key.phase is None:
            transform, members = self.val_transform, self.val_members[key.bucket]
        else:
            transform, members = self.train_transforms[key.phase], self.members[key.phase][key.bucket]
        counter = SkipCounter()
        shape = (*transform.shapes[key.bucket], 3)  # (H, W, 3) of every crop of this batch
        images, keys = [], []
        for index in key.files:
            rng = random.Random(f"klvae/{self.seed}/{key.phase}/{key.pass_index}/{index}")
            image, used = self._load(index, members, transform, rng, counter, shape)
            images.append(image)
            keys.append(str(self.files[used].relative_to(self.root).with_suffix("")))
        batch = {self.image_key: to_model_batch(images), "__key__": keys, SKIPPED_KEY: counter.take()}
        if key.phase is not None and self.phases.configured:
            batch[PHASE_KEY] = key.phase
        return batch

    def _load(
        self, index: int, members: Sequence[int], transform: Transform, rng: random.Random, counter: SkipCounter,
        shape: tuple[int, ...],
    ) -> tuple[Any, int]:  # fmt: skip
        """(uint8 crop, file index used): ``index``, or a replacement from its bucket after a failure."""
        first_error = ""
        start = members.index(index)
        for attempt in range(_MAX_RETRIES):
            used = index if attempt == 0 else members[(start + attempt * 7919) % len(members)]
            path = self.files[used]
            try:
                image = transform(path.read_bytes(), rng)
            except ImageTooSmallError as exn:
                counter.add("too_small", f"{path}: {exn}")
                first_error = first_error or f"{path}: {exn}"
                continue
            except Exception as exn:  # corrupt/truncated/unreadable: count and replace, never crash
                counter.add("corrupt_image", f"{path}: {exn!r}")
                first_error = first_error or f"{path}: {exn!r}"
                continue
            if image.shape != shape:  # the file changed since its header was read
                counter.add("corrupt_image", f"{path}: crop {image.shape[:2]} is not its batch's {shape[:2]}")
                continue
            return image, used
        raise DataError(
            f"{_MAX_RETRIES} images in a row could not be used in {self.root} (first error: {first_error}); "
            "check the files and data.params.min_size"
        )
