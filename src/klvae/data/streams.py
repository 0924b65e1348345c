"""The per-worker webdataset pipelines, as IterableDatasets yielding ready batches.

Training (``TrainStream``): each (rank, worker) loops forever over its own shards of every source, in a
fresh random order each pass (resampling without replacement), mixes sources by weight, shuffles through a
buffer, decodes, batches, and stops after a fixed number of batches: every rank yields exactly
``len(stream)`` batches per epoch whatever the shard sizes, so DDP never waits on a rank that ran dry.

Validation (``ValStream``): the shards once, in order, no shuffle, center crops: deterministic.

Aspect-ratio buckets (``klvae.data.buckets``): decoded crops wait in one list per bucket shape until a
list holds a full batch, which is emitted; every batch is one shape. The lists live in each worker: at
most ``(buckets - 1) · (batch_size - 1) + batch_size`` decoded crops, e.g. 13 buckets at 1024², batch 4:
at most 40 crops of ~3 MiB (uint8), 120 MiB per worker. Resolution phases (``klvae.data.phases``): each
batch is made at the phase of its position in the run; at a phase change a worker drops its partly filled
buckets (crops of the old size).

Batches: ``{image_key: float32 (B, 3, H, W) in [-1, 1], "__key__": [str] * B,
"_skipped": {kind: int}}`` (see ``klvae.data.stats``), plus ``"_phase": int`` when phases are configured.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import tarfile_samples

from klvae.data.phases import PHASE_KEY, PhaseSchedule
from klvae.data.resume import EpochStart
from klvae.data.sharding import ShardAssignment, assign_shards, worker_info
from klvae.data.stats import SKIPPED_KEY, SkipCounter
from klvae.data.transforms import ImageTooSmallError, find_image_key, to_model_batch
from klvae.errors import DataError

__all__ = ["TrainStream", "ValStream", "worker_rng"]

# A source that has yielded this many samples without a single one decoding is broken (every image
# corrupt, or min_size above all of them): fail, naming it, instead of spinning forever.
MAX_UNDECODED = 10_000

# ImageTransform or BucketTransform: encoded bytes + generator -> uint8 (H, W, 3).
Transform = Callable[[bytes, random.Random], np.ndarray]


def worker_rng(seed: int, rank: int, worker: int, epoch: int) -> random.Random:
    """A generator distinct for every (seed, rank, worker, epoch): no two workers repeat a crop sequence."""
    return random.Random(f"klvae/{seed}/{rank}/{worker}/{epoch}")


def read_shard(url: str, assignment: ShardAssignment, counter: SkipCounter) -> Iterator[dict]:
    """Samples of one shard kept by ``assignment``; unreadable shards and broken tar streams are counted
    as ``read_error`` and end that shard, never the run."""
    samples = tarfile_samples([{"url": url}], handler=counter.handler("read_error"))
    for index, sample in enumerate(samples):
        if index % assignment.stride == assignment.offset:
            yield sample
    # A tar cut inside a member header ends the stream silently (tarfile reads it as the end of the
    # archive). Tar files are whole 512-byte blocks: any other size on disk means a cut-off file.
    size = os.path.getsize(url) if os.path.isfile(url) else None
    if size is not None and size % 512 and assignment.offset == 0:
        counter.add("read_error", f"{url}: truncated tar ({size} bytes, not whole 512-byte blocks); "
                    "the samples before the cut were kept")  # fmt: skip


def decode_sample(
    sample: dict, transform: Transform, rng: random.Random, counter: SkipCounter
) -> tuple[str, np.ndarray] | None:
    """(key, uint8 (H, W, 3) crop) or None after counting why the sample was skipped."""
    image_key = find_image_key(sample)
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if image_key is None:
        counter.add(
            "missing_image", f"{where} has members {sorted(k for k in sample if not k.startswith('__'))}"
        )
        return None
    try:
        return sample["__key__"], transform(sample[image_key], rng)
    except ImageTooSmallError as exn:
        counter.add("too_small", f"{where}: {exn}")
    except Exception as exn:  # any decoder failure is a bad sample, never a crashed run
        counter.add("corrupt_image", f"{where}: {exn!r}")
    return None


class _SourceProgress:
    """Samples read and decoded per source: turns "nothing decodes" into an error instead of a hang."""

    def __init__(self, n_sources: int, what: str) -> None:
        self.read = [0] * n_sources
        self.decoded = [0] * n_sources
        self.pass_size: list[int | None] = [None] * n_sources  # samples in one pass over the shards
        self.what = what

    def check(self, source: int, counter: SkipCounter) -> None:
        if self.decoded[source]:
            return
        limit = min(self.pass_size[source] or MAX_UNDECODED, MAX_UNDECODED)
        if self.read[source] >= limit:
            raise DataError(
                f"0 of {self.pass_size[source] or self.read[source]} samples in {self.what} {source} decoded; "
                f"first error: "
                f"{counter.first_error or 'none recorded'} (check the shards and data.params.min_size)"
            )


def _make_batch(items: list, image_key: str, counter: SkipCounter, phase: int | None = None) -> dict:
    keys, images = zip(*items)
    batch = {image_key: to_model_batch(images), "__key__": list(keys), SKIPPED_KEY: counter.take()}
    if phase is not None:
        batch[PHASE_KEY] = phase
    return batch


class BucketLists:
    """Decoded crops grouped by shape until a group holds a full batch (one list per bucket)."""

    def __init__(self) -> None:
        self.lists: dict[tuple[int, int], list] = {}

    def add(self, item: tuple[str, np.ndarray], batch_size: int) -> list | None:
        """Add (key, crop); return the full list of its shape (removed) once it holds ``batch_size``."""
        shape = item[1].shape[:2]
        group = self.lists.setdefault(shape, [])
        group.append(item)
        return self.lists.pop(shape) if len(group) == batch_size else None

    def leftovers(self) -> list[list]:
        """The partly filled lists in shape order (validation emits them as short batches), emptied."""
        lists, self.lists = self.lists, {}
        return [lists[shape] for shape in sorted(lists)]


class _RankedStream(IterableDataset):
    """Common state: the rank/world size captured in the main process, and an epoch counter."""

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        super().__init__()
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # Set from the main process before each epoch's workers start (see WebDataModule); with persistent
        # workers the copies inside the workers count on from there.
        self.epoch = 0
        # Mid-epoch resume: batches of this epoch the rank already trained on (regenerated and dropped).
        self.skip_batches = 0

    def start_epoch(self, start: EpochStart) -> None:
        """Called in the main process before an epoch's workers are created (``ResumableLoader``): they
        take this state with them. Persistent workers are created once and count epochs themselves."""
        self.epoch, self.skip_batches = start.epoch, start.skip


class TrainStream(_RankedStream):
    """Endless, weighted mix of sources cut into ``batches_per_rank`` batches per epoch.

    Args:
        sources: One URL list per source.
        weights: Mixing weight per source (normalised).
        phases: The run's phases (one phase without ``data.params.phases``).
        transforms: The train transform of each phase (``ImageTransform`` or ``BucketTransform``).
        batches_per_rank: Batches this rank yields per epoch (summed over its workers).
        shuffle_buffer: Samples held for shuffling (0 disables).
        image_key, rank, world_size, seed: see ``WebDataModule``.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        phases: PhaseSchedule,
        transforms: Sequence[Transform],
        batches_per_rank: int,
        shuffle_buffer: int,
        image_key: str,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__(rank, world_size, seed)
        assert len(transforms) == len(phases), (len(transforms), len(phases))
        self.sources = [list(s) for s in sources]
        self.weights = list(weights)
        self.phases = phases
        self.transforms = list(transforms)
        self.batches_per_rank = batches_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.image_key = image_key
        # Stamped before the workers start (see start_epoch); persistent workers count on by themselves.
        self.position = 0
        self.batches_per_iteration = 1

    def __len__(self) -> int:
        return self.batches_per_rank

    def start_epoch(self, start: EpochStart) -> None:
        super().start_epoch(start)
        self.position, self.batches_per_iteration = start.position, start.batches_per_iteration

    def _endless(
        self, source: int, role: int, num_workers: int, rng: random.Random, counter: SkipCounter,
        progress: _SourceProgress,
    ) -> Iterator[dict]:  # fmt: skip
        assignment = assign_shards(self.sources[source], self.rank, self.world_size, role, num_workers)
        while True:
            order = list(assignment.urls)
            rng.shuffle(order)
            produced = 0
            for url in order:
                for sample in read_shard(url, assignment, counter):
                    produced += 1
                    sample["__source__"] = source
                    yield sample
            if produced == 0:  # looping on would hang the run silently
                raise DataError(
                    f"0 samples readable in train source {source} ({len(order)} shard(s) of this reader, "
                    f"first {order[0]!r}); first error: {counter.first_error or 'none recorded'}"
                )
            progress.pass_size[source] = progress.pass_size[source] or produced

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        skip = self.skip_batches
        self.skip_batches = 0  # once: persistent workers keep this copy for the next epochs
        # Batch j of the epoch comes from worker j % num_workers (the DataLoader's round robin). After a
        # resume k batches in, the new worker 0 must continue with batch k: worker ids rotate by k.
        role = (worker + skip) % num_workers
        rng = worker_rng(self.seed, self.rank, role, self.epoch)
        start = self.position
        self.epoch += 1  # persistent workers: the next epoch draws a new order and new crops
        self.position += self.batches_per_rank  # ... and starts where this one ends
        counter = SkipCounter()
        progress = _SourceProgress(len(self.sources), "train source")
        streams = [
            self._endless(i, role, num_workers, rng, counter, progress) for i in range(len(self.sources))
        ]
        indices = range(len(streams))

        def mixed() -> Iterator[dict]:
            while True:
                yield next(streams[rng.choices(indices, weights=self.weights)[0]])

        samples: Iterator[dict] = mixed()
        if self.shuffle_buffer > 1:
            initial = min(self.shuffle_buffer, 100)
            samples = iter(wds.filters.shuffle(self.shuffle_buffer, initial, rng=rng)(samples))
        buckets, phase = BucketLists(), None
        # This role's share of the rank's batches (the DataLoader interleaves workers round-robin).
        for k in range(role, self.batches_per_rank, num_workers):
            batch_phase = self.phases.index_of_batch(start + k, self.batches_per_iteration)
            if batch_phase != phase:  # crops of another phase's size are of no use any more
                buckets, phase = BucketLists(), batch_phase
            transform, batch_size = self.transforms[phase], self.phases[phase].batch_size
            full = None
            while full is None:
                sample = next(samples)
                source = sample.pop("__source__")
                progress.read[source] += 1
                item = decode_sample(sample, transform, rng, counter)
                if item is None:
                    progress.check(source, counter)
                    continue
                progress.decoded[source] += 1
                full = buckets.add(item, batch_size)
            batch = _make_batch(full, self.image_key, counter, phase if self.phases.configured else None)
            if k < skip:  # regenerated exactly as before the resume (same rng), then dropped
                continue
            yield batch


class ValStream(_RankedStream):
    """The validation shards once, in order, split over ranks and workers; the last batch of each
    bucket shape may be partial."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Transform,
        batch_size: int,
        image_key: str,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__(rank, world_size, seed)
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = batch_size
        self.image_key = image_key

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        assignment = assign_shards(self.urls, self.rank, self.world_size, worker, num_workers)
        rng = worker_rng(self.seed, self.rank, worker, 0)  # unused by center crops; kept for the signature
        counter = SkipCounter()
        buckets = BucketLists()
        read = decoded = 0
        for url in assignment.urls:
            for sample in read_shard(url, assignment, counter):
                read += 1
                item = decode_sample(sample, self.transform, rng, counter)
                if item is None:
                    continue
                decoded += 1
                full = buckets.add(item, self.batch_size)
                if full is not None:
                    yield _make_batch(full, self.image_key, counter)
        leftovers = buckets.leftovers()
        for items in leftovers:
            yield _make_batch(items, self.image_key, counter)
        if not leftovers and decoded == 0 and sum(counter.total.values()):
            # Nothing to carry the skip counts on: an unreadable validation set must not pass silently.
            raise DataError(
                f"0 of {read} samples in the validation shards of reader {self.rank}/{worker} decoded "
                f"({dict((k, v) for k, v in counter.total.items() if v)}); first error: {counter.first_error}"
            )
