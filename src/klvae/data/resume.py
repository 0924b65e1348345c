"""Training loaders that resume mid-epoch exactly: Lightning saves their position in the checkpoint.

Lightning (2.3+) stores ``state_dict()`` of every training DataLoader that has one in the checkpoint and
calls ``load_state_dict`` on resume before iterating. The position saved is (epoch, batches this rank
has trained on in it), read from the fit loop's progress counters at save time -- not from the loader,
which has already prefetched batches the model never saw. On resume the next iteration of that epoch
skips exactly those batches; everything else (order, crops, flips) is a pure function of
``data.params.seed``, rank, epoch and sample position, so the batches after the resume are the uninterrupted run's.

Resolution phases and buckets need one more number: the batch's position in the whole run (batches this
rank has trained on since iteration 0), whose phase decides the batch's resolution and size. It comes
from Lightning's run-wide batch counter, which the checkpoint restores, minus the batches of the epoch
already trained on: :class:`EpochStart`.

``ResumableSampler`` serves the map-style folder dataset: a ``DistributedSampler`` (so Lightning never
replaces it under DDP) whose permutation depends on (seed, epoch) only, yielding ``(epoch, index)`` so
the dataset can seed each sample's crop from (seed, epoch, index) even in persistent workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from klvae.data.workers import ignore_stop_signals

__all__ = ["EpochStart", "ResumableLoader", "ResumableSampler", "map_style_loader", "trained_batches"]


def trained_batches(trainer: Any) -> tuple[int, int]:
    """(epoch, batches of it trained on) of a Lightning trainer; (0, 0) without one."""
    if trainer is None:
        return 0, 0
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(trainer.current_epoch), int(progress.processed)


def _run_batches(trainer: Any) -> int:
    """Training batches this rank has run since the run began (restored from the checkpoint on resume)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)


def _batches_per_iteration(trainer: Any) -> int:
    """The model's ``accumulate_grad_batches`` (batches per training iteration); 1 for other models."""
    value = getattr(trainer.lightning_module, "accumulate_grad_batches", 1)
    return value if isinstance(value, int) and value >= 1 else 1


@dataclass(frozen=True)
class EpochStart:
    """What a training loader needs to know when an epoch's iterator is created.

    Attributes:
        epoch: the epoch (seeds the order of the plain, unphased loaders).
        skip: batches of this epoch already trained on (a resume mid-epoch): regenerate or skip them.
        position: batches this rank trained on before this epoch began, over the whole run; batch ``k``
            of the epoch is batch ``position + k`` of the run (the clock of resolution phases).
        batches_per_iteration: the model's ``accumulate_grad_batches`` (phases count iterations).
    """

    epoch: int
    skip: int
    position: int
    batches_per_iteration: int = 1


class ResumableSampler(DistributedSampler):
    """Per-rank sample order that is a function of (seed, epoch); can start ``skip`` samples in.

    Args:
        dataset: the map-style dataset (only its length is used).
        rank, world_size: this rank and the number of ranks.
        shuffle: a fresh permutation per epoch (``torch.randperm`` seeded with ``seed + epoch``).
        seed: the data seed.
        drop_last: drop the tail so every rank gets the same count (else pad by repeating).
    """

    def __init__(
        self, dataset: Dataset, rank: int, world_size: int, shuffle: bool, seed: int, drop_last: bool
    ) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        epoch = self.epoch
        return iter([(epoch, i) for i in indices])


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints; ``on_iter(EpochStart)`` prepares each epoch.

    Args:
        trainer_fn: returns the attached trainer (or None: epochs count iterators, each ``len()`` long).
        on_iter: called with the :class:`EpochStart` right before each new iterator is created.
        **kwargs: DataLoader arguments.
    """

    def __init__(
        self,
        dataset: Dataset,
        trainer_fn: Callable[[], Any],
        on_iter: Callable[[EpochStart], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self._trainer_fn = trainer_fn
        self._on_iter = on_iter
        self._iterations = 0
        self._resume: dict[str, int] | None = None

    def _sized(self) -> bool:
        try:
            len(self)
        except TypeError:  # an IterableDataset without __len__ (validation streams)
            return False
        return True

    def state_dict(self) -> dict[str, int]:
        epoch, batches = trained_batches(self._trainer_fn())
        return {"epoch": epoch, "batches": batches, "format": 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator:
        trainer = self._trainer_fn()
        epoch = trainer.current_epoch if trainer is not None else self._iterations
        self._iterations += 1
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["batches"]
            if skip >= len(self):
                # Saved after the epoch's last batch: Lightning counts this iterator as the next epoch.
                epoch, skip = epoch + 1, 0
        self._resume = None
        if trainer is None:  # iterated by hand: epochs are consecutive and complete
            start = EpochStart(epoch, skip, epoch * len(self) if self._sized() else 0)
        else:  # the run-wide counter already includes the skipped batches
            start = EpochStart(epoch, skip, _run_batches(trainer) - skip, _batches_per_iteration(trainer))
        self._on_iter(start)
        return super().__iter__()


def map_style_loader(
    dataset: Dataset,
    trainer_fn: Callable[[], Any],
    *,
    rank: int,
    world_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list], Any] | None = None,
) -> ResumableLoader:
    """A resumable loader over a map-style dataset (image folders, latent shards): ``ResumableSampler``'s
    per-rank order, which a resumed epoch starts ``skip`` batches in; workers ignore stop signals (the main
    process handles them)."""
    sampler = ResumableSampler(dataset, rank, world_size, shuffle, seed, drop_last)

    def on_iter(start: EpochStart) -> None:
        sampler.set_epoch(start.epoch)
        sampler.skip = start.skip * batch_size

    return ResumableLoader(
        dataset,
        trainer_fn,
        on_iter,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
