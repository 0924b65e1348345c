"""``WebDataModule``: webdataset tar shards (OpenImages, LAION via img2dataset, ...) -> training batches.

YAML (``data.params``; see docs/data.md)::

    train:
      sources:
        - {shards: "/data/openimages/train-{000000..004095}.tar", weight: 1.0}
        - {shards: ["/data/laion/a-{00000..00999}.tar"], weight: 1.0}
      epoch_length: 100000
    validation:
      shards: "/data/openimages/val-{000000..000007}.tar"
    size: 256
    resize_to: 384
    buckets: {step: 64, max_aspect: 2.0}      # optional: aspect-ratio buckets (klvae.data.buckets)
    phases: [{iterations: 200000, size: 256, batch_size: 12}, {size: 512, batch_size: 4}]   # optional
    ...
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from klvae.data.buckets import BucketConfig, build_transform
from klvae.data.phases import PhaseSchedule
from klvae.data.resume import EpochStart, ResumableLoader
from klvae.data.sharding import distributed_info, expand_shards
from klvae.data.streams import TrainStream, ValStream, _RankedStream
from klvae.data.workers import ignore_stop_signals
from klvae.errors import ConfigError

__all__ = ["WebDataModule"]

logger = logging.getLogger(__name__)

_TRAIN_KEYS = {"sources", "shards", "weight", "epoch_length"}
_SOURCE_KEYS = {"shards", "weight"}
_VAL_KEYS = {"shards"}


def _check_keys(block: Any, accepted: set[str], where: str) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(accepted)}, got {block!r}")
    unknown = sorted(set(block) - accepted)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; accepted keys are {sorted(accepted)}")
    return block


class WebDataModule(pl.LightningDataModule):
    """Streams webdataset shards to (DDP) training: equal batch counts per rank, distinct data per worker.

    Args:
        train: ``{sources: [{shards, weight}], epoch_length}``; ``{shards, epoch_length}`` is the one-source
            shorthand. ``shards`` is a pattern, a list of patterns, ``pipe:`` command or URL (webdataset's
            syntax, plus local globs). ``epoch_length`` is the nominal number of samples per epoch over all
            ranks: each rank yields ``max(1, epoch_length // (world_size * batch_size))`` batches (with
            phases: the first phase's batch size, in every phase). None disables training (e.g.
            evaluation-only configs).
        validation: ``{shards}``; read once per validation run in a fixed order. None disables validation.
        size: Crop side (training resolution), e.g. 256; with ``buckets`` the target whose area the
            buckets approximate. With ``phases``: the validation resolution.
        resize_to: Shorter side before cropping (LDM OpenImages: 384); None resizes to ``size``.
        buckets: ``{step, max_aspect}`` of :class:`klvae.data.buckets.BucketConfig`: train and validate
            each image in its nearest aspect-ratio bucket, one bucket per batch. None: square crops.
        phases: ``[{iterations, size, batch_size, resize_to}, ...]``: resolution phases
            (:class:`klvae.data.phases.PhaseSchedule`). None: ``size`` and ``batch_size`` for the whole run.
        min_size: Skip (and count) images whose shorter side is below this.
        random_flip: Random horizontal flips in training.
        batch_size: Per-GPU batch size.
        val_batch_size: Validation batch size; None uses ``batch_size``.
        num_workers: Loader worker processes per GPU.
        shuffle_buffer: Samples held per worker for shuffling (0 or 1 disables).
        seed: Base of the per-(rank, worker, epoch) seeds.
        image_key: Batch key of the image tensor (the model's ``image_key``).
        pin_memory: Pin batches (only when CUDA is available).
        persistent_workers: Keep workers alive between epochs (when ``num_workers > 0``).
        prefetch_factor: Batches prefetched per worker (when ``num_workers > 0``).
    """

    def __init__(
        self,
        train: dict | None = None,
        validation: dict | None = None,
        size: int = 256,
        resize_to: int | None = None,
        min_size: int = 0,
        random_flip: bool = False,
        batch_size: int = 12,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_key: str = "image",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        buckets: dict | None = None,
        phases: list | None = None,
    ) -> None:
        super().__init__()
        if train is None and validation is None:
            raise ConfigError("WebDataModule: give at least one of 'train' or 'validation'")
        for name, value in (("batch_size", batch_size), ("prefetch_factor", prefetch_factor)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"WebDataModule: {name} must be an int >= 1, got {value!r}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ConfigError(
                f"WebDataModule: val_batch_size must be None or an int >= 1, got {val_batch_size!r}"
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"WebDataModule: num_workers must be an int >= 0, got {num_workers!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ConfigError(f"WebDataModule: shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.train_sources, self.train_weights, self.epoch_length = self._parse_train(train)
        self.val_shards = _check_keys(validation, _VAL_KEYS, "validation")["shards"] if validation else None
        # Fail on bad crop/resize/bucket/phase settings now, not in a worker.
        self.buckets = BucketConfig.from_config(buckets)
        self.phases = PhaseSchedule.from_config(phases, size, batch_size, resize_to)
        self.train_transforms = [
            build_transform(p.size, p.resize_to, self.buckets, min_size, random_flip, train=True)
            for p in self.phases
        ]
        self.val_transform = build_transform(size, resize_to, self.buckets, min_size, False, train=False)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.image_key = image_key
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self._train_urls: list[list[str]] | None = None
        self._val_urls: list[str] | None = None

    @staticmethod
    def _parse_train(train: dict | None) -> tuple[list[Any], list[float], int]:
        if train is None:
            return [], [], 0
        train = _check_keys(train, _TRAIN_KEYS, "train")
        if ("sources" in train) == ("shards" in train):
            raise ConfigError(
                "train: give either 'sources: [{shards, weight}, ...]' or 'shards' (one source)"
            )
        if "sources" in train:
            if "weight" in train:
                raise ConfigError("train: 'weight' belongs inside each entry of 'sources'")
            sources = train["sources"]
            if not isinstance(sources, list) or not sources:
                raise ConfigError(
                    f"train.sources: expected a non-empty list of {{shards, weight}}, got {sources!r}"
                )
        else:
            sources = [{"shards": train["shards"], "weight": train.get("weight", 1.0)}]
        specs, weights = [], []
        for i, source in enumerate(sources):
            source = _check_keys(source, _SOURCE_KEYS, f"train.sources[{i}]")
            if "shards" not in source:
                raise ConfigError(f"train.sources[{i}]: missing 'shards'")
            weight = source.get("weight", 1.0)
            if not isinstance(weight, int | float) or weight <= 0:
                raise ConfigError(f"train.sources[{i}].weight must be a number > 0, got {weight!r}")
            specs.append(source["shards"])
            weights.append(float(weight))
        epoch_length = train.get("epoch_length")
        if not isinstance(epoch_length, int) or epoch_length < 1:
            raise ConfigError(
                f"train.epoch_length must be an int >= 1 (nominal samples per epoch over all ranks; "
                f"resampled shards have no natural end), got {epoch_length!r}"
            )
        return specs, weights, epoch_length

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard patterns (every rank; fails fast on a typo, naming the pattern)."""
        if self.train_sources and self._train_urls is None:
            self._train_urls = [
                expand_shards(spec, f"train.sources[{i}].shards") for i, spec in enumerate(self.train_sources)
            ]
            for i, urls in enumerate(self._train_urls):
                logger.info("train source %d: %d shard(s), weight %g", i, len(urls), self.train_weights[i])
        if self.val_shards is not None and self._val_urls is None:
            self._val_urls = expand_shards(self.val_shards, "validation.shards")
            logger.info("validation: %d shard(s)", len(self._val_urls))

    def _trainer(self) -> Any:
        return getattr(self, "trainer", None)

    def image_shapes(self) -> set[tuple[int, int]]:
        """Every (height, width) a training or validation batch can have (all phases, all buckets)."""
        return {shape for t in [*self.train_transforms, self.val_transform] for shape in t.shapes}

    def _loader(self, dataset: _RankedStream) -> DataLoader:
        workers = self.num_workers

        def on_iter(start: EpochStart) -> None:
            # Reaches the workers when they are (re)created; persistent workers count epochs on themselves.
            # Stamping the epoch makes non-persistent workers and resumed runs draw a new order each epoch.
            dataset.start_epoch(start)

        return ResumableLoader(
            dataset,
            self._trainer,
            on_iter,
            worker_init_fn=ignore_stop_signals,
            batch_size=None,  # the stream yields whole batches
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        """The training loader: ``len()`` batches per epoch on every rank."""
        if not self.train_sources:
            raise ConfigError("WebDataModule: no 'train' block in the data config")
        self.setup("fit")
        rank, world_size = distributed_info(self._trainer())
        batches = self.batches_per_epoch(world_size)
        readers = world_size * max(1, self.num_workers)
        for i, urls in enumerate(self._train_urls):
            if len(urls) < readers:
                logger.warning(
                    "train source %d has %d shard(s) for %d readers (ranks x workers): each reader opens all "
                    "of them and keeps 1/%d of the samples; write more, smaller shards for efficient I/O",
                    i, len(urls), readers, readers,
                )  # fmt: skip
        stream = TrainStream(
            self._train_urls,
            self.train_weights,
            self.phases,
            self.train_transforms,
            batches,
            self.shuffle_buffer,
            self.image_key,
            rank,
            world_size,
            self.seed,
        )
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader (deterministic order), or [] when no 'validation' block is configured."""
        if self.val_shards is None:
            return []
        self.setup("validate")
        rank, world_size = distributed_info(self._trainer())
        stream = ValStream(
            self._val_urls,
            self.val_transform,
            self.val_batch_size,
            self.image_key,
            rank,
            world_size,
            self.seed,
        )
        return self._loader(stream)

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches each rank runs per epoch for ``world_size`` ranks (the first phase's batch
        size sets the count; later phases keep it, so every epoch has the same length)."""
        return max(1, self.epoch_length // (world_size * self.phases[0].batch_size))
