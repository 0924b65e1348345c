"""Run-level bookkeeping in training iterations: throughput and lr logging, the iteration limit, seeding."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.callbacks.checkpointing import iteration_of

__all__ = ["ThroughputMonitor", "MaxIterations", "IterationSeeder"]

log = logging.getLogger(__name__)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[0])
    return 0


class ThroughputMonitor(Callback):
    """Logs ``perf/images_per_s`` (all ranks together), ``perf/iter_time_s`` and ``lr/ae``, ``lr/disc``.

    The iteration time is measured from batch start to batch end on rank 0, so it excludes data loading
    stalls; ``images_per_s`` uses the wall time between consecutive batch ends, which includes them.

    Args:
        log_every_n_batches: logging cadence (Lightning's ``log_every_n_steps`` still throttles the logger).
    """

    def __init__(self, log_every_n_batches: int = 1) -> None:
        self.log_every_n_batches = max(1, log_every_n_batches)
        self._start: float | None = None
        self._prev_end: float | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if batch_idx % self.log_every_n_batches == 0:
            metrics: dict[str, float] = {}
            if self._start is not None:
                metrics["perf/iter_time_s"] = now - self._start
            if self._prev_end is not None and now > self._prev_end:
                metrics["perf/images_per_s"] = (
                    _batch_size(batch) * trainer.world_size / (now - self._prev_end)
                )
            for i, optimizer in enumerate(trainer.optimizers):
                metrics[f"lr/{'ae' if i == 0 else 'disc' if i == 1 else i}"] = optimizer.param_groups[0]["lr"]
            # Only scalars that are identical or rank-0-meaningful: no cross-rank sync needed.
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
            if "perf/images_per_s" in metrics:
                pl_module.log(
                    "img/s", metrics["perf/images_per_s"], prog_bar=True, logger=False, rank_zero_only=True
                )
        self._prev_end = now

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prev_end = None  # do not count validation time as training throughput


class MaxIterations(Callback):
    """Stops training once ``pl_module.iteration`` reaches ``max_iterations`` (``trainer.should_stop``).

    ``Trainer(max_steps=...)`` counts optimizer steps, which are 1 or 2 per batch depending on the GAN
    phase and update schedule, so it cannot express "N training iterations".
    """

    def __init__(self, max_iterations: int) -> None:
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
        self.max_iterations = max_iterations

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if iteration_of(pl_module) >= self.max_iterations and not trainer.should_stop:
            rank_zero_only(log.info)(f"reached max_iterations={self.max_iterations}; stopping")
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)  # resuming a finished run trains nothing more

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer, pl_module)


class IterationSeeder(Callback):
    """Reseeds torch/numpy/random at every training batch from (seed, rank, epoch, batch index).

    The randomness a training step consumes (posterior samples, in-process augmentation) then depends only
    on where the run is, not on what ran before (validation, image logging, a resume that skipped them), so
    a resumed run reproduces the uninterrupted one. Ranks get different streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def state_dict(self) -> dict[str, Any]:
        # The reseeding makes training independent of these; they are saved so that what runs before the
        # first batch of a resumed launch (sanity validation, image logging) also continues exactly.
        state: dict[str, Any] = {"seed": self.seed, "torch": torch.get_rng_state()}
        state["numpy"] = torch.from_numpy(np.random.get_state()[1].astype(np.int64))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda"]))
        if "numpy" in state:
            np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))

    def _reseed(self, *position: int) -> None:
        key = hash((self.seed, *position)) & 0xFFFF_FFFF  # int tuples hash identically in every process
        torch.manual_seed(key)
        np.random.seed(key)
        random.seed(key)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(-1, trainer.global_rank, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # batch_idx counts on from the checkpointed loop progress after a mid-epoch resume.
        self._reseed(trainer.global_rank, trainer.current_epoch, batch_idx)
