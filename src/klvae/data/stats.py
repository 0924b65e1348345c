"""Counting skipped samples, and getting the counts from loader workers to the logger.

Bad samples are counted where they happen: inside DataLoader worker processes, whose memory the main
process never sees. The mechanism chosen here: every batch a worker emits carries the counts accumulated
since that worker's previous batch, as ``batch["_skipped"] = {kind: int}``. The counts thus travel the
same queue as the data (no shared memory, no extra processes, correct with any number of workers and
with persistent workers), and ``DataStatsCallback`` pops the key in ``on_*_batch_start`` -- before the
model's step sees the batch -- and logs ``data/skipped_<kind>`` (summed over the epoch and over ranks).
The phase a training batch was made in (``batch["_phase"]``, with resolution phases) travels the same way
and is logged as ``data/phase``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.data.phases import PHASE_KEY, PhaseSchedule

__all__ = ["SKIPPED_KEY", "SKIP_KINDS", "DataStatsCallback", "SkipCounter", "pop_skipped"]

logger = logging.getLogger(__name__)

SKIPPED_KEY = "_skipped"
# corrupt_image: the image bytes do not decode (corrupt, truncated, unsupported);
# missing_image: a sample with no jpg/jpeg/png/webp member;
# too_small: shorter side below min_size (a filter, counted so a bad min_size is visible);
# read_error: a shard that cannot be opened or a tar stream that breaks off (truncated tar).
SKIP_KINDS: tuple[str, ...] = ("corrupt_image", "missing_image", "too_small", "read_error")

_WARN_FIRST = 5  # per kind and worker: enough to diagnose, not enough to flood a 16-GPU run's logs


class SkipCounter:
    """Per-worker counts of skipped samples by kind, with the delta since the last ``take``."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(SKIP_KINDS, 0)
        self._pending = dict.fromkeys(SKIP_KINDS, 0)
        self.first_error = ""  # what went wrong first, for an error message when nothing decodes

    def add(self, kind: str, detail: str = "") -> None:
        """Count one skipped sample of ``kind`` (one of ``SKIP_KINDS``); warn for the first few."""
        assert kind in self.total, kind
        self.total[kind] += 1
        self._pending[kind] += 1
        self.first_error = self.first_error or f"{kind}: {detail[:300]}"
        if self.total[kind] <= _WARN_FIRST:
            logger.warning("skipping sample (%s): %s", kind, detail[:300])
            if self.total[kind] == _WARN_FIRST:
                logger.warning("further '%s' skips are counted (data/skipped_%s) but not logged", kind, kind)

    def handler(self, kind: str) -> Callable[[Exception], bool]:
        """A webdataset exception handler that counts the exception as ``kind`` and continues."""

        def handle(exn: Exception) -> bool:
            self.add(kind, repr(exn))
            return True

        return handle

    def take(self) -> dict[str, int]:
        """Return the counts since the previous call and reset them."""
        pending, self._pending = self._pending, dict.fromkeys(SKIP_KINDS, 0)
        return pending


def pop_skipped(batch: Any) -> dict[str, int]:
    """Remove and return ``batch["_skipped"]`` (ints or 0-d tensors) as plain ints; {} if absent."""
    if not isinstance(batch, dict) or SKIPPED_KEY not in batch:
        return {}
    counts = batch.pop(SKIPPED_KEY)
    return {k: int(v) for k, v in counts.items()}


class DataStatsCallback(pl.Callback):
    """Log the loaders' skipped-sample counts as ``data/skipped_<kind>`` (train) and
    ``data/val_skipped_<kind>`` (validation): sums per epoch over all ranks, and the running total of this
    rank as ``data/skipped_total`` per step. Also strips ``_skipped`` from the batch before the model's step.

    With resolution phases it strips ``_phase`` too, logs it as ``data/phase`` (0-based) and says in the
    log when a new phase begins.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = dict.fromkeys(SKIP_KINDS, 0)
        self._phase: int | None = None

    def _on_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: int) -> None:
        pl_module.log("data/phase", float(phase), on_step=True, on_epoch=False, batch_size=1)
        if phase != self._phase:
            self._phase = phase
            schedule = getattr(trainer.datamodule, "phases", None) if trainer.datamodule is not None else None
            what = schedule.describe(phase) if isinstance(schedule, PhaseSchedule) else f"phase {phase + 1}"
            rank_zero_only(logger.info)(
                "data: %s, from iteration %s", what, getattr(pl_module, "iteration", "?")
            )

    # The running total goes into the checkpoint (Lightning saves callback states): a resumed run keeps
    # counting the run's skipped samples, not one launch's.
    def state_dict(self) -> dict[str, Any]:
        return {"total": dict(self.total)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for kind, value in state_dict.get("total", {}).items():
            self.total[kind] = int(value)

    def _log(
        self, pl_module: pl.LightningModule, prefix: str, counts: dict[str, int], batch_size: int
    ) -> None:
        for kind in SKIP_KINDS:
            value = counts.get(kind, 0)
            # reduce_fx="sum" + sync_dist: the epoch value is the total over steps and ranks; the sync
            # happens once at epoch end, not per step.
            pl_module.log(
                f"data/{prefix}skipped_{kind}",
                float(value),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
                batch_size=batch_size,
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        counts = pop_skipped(batch)
        for kind, value in counts.items():
            self.total[kind] = self.total.get(kind, 0) + value
        self._log(pl_module, "", counts, _batch_size(batch))
        pl_module.log("data/skipped_total", float(sum(self.total.values())), on_step=True, on_epoch=False)
        if isinstance(batch, dict) and PHASE_KEY in batch:
            self._on_phase(trainer, pl_module, int(batch.pop(PHASE_KEY)))

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._log(pl_module, "val_", pop_skipped(batch), _batch_size(batch))


def _batch_size(batch: Any) -> int:
    """Lightning cannot infer a batch size from our dict (lists of keys inside); give it explicitly."""
    if isinstance(batch, dict):
        for value in batch.values():
            if hasattr(value, "shape") and len(value.shape) == 4:
                return int(value.shape[0])
    return 1
