"""One progress bar over the whole run in training iterations, with total and ETA, that survives a resume.

Lightning's bar restarts every epoch, and a webdataset "epoch" is a nominal length: it says nothing about
how far a 250k-iteration run is. This bar counts ``pl_module.iteration`` up to ``max_iterations``,
starting where a resumed run stands, so the ETA is measured on this launch's speed only. With resolution
phases (``data.params.phases``) its label names the phase being trained.
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar
from tqdm import tqdm

from klvae.callbacks.checkpointing import iteration_of
from klvae.data.phases import PhaseSchedule

__all__ = ["IterationProgressBar"]


class IterationProgressBar(ProgressBar):
    """``it 1200/250000 [ETA] loss=...``; a second bar during validation runs.

    Args:
        max_iterations: the run's ``lightning.max_iterations`` (None: no total, no ETA).
        refresh_every: update the bar every this many iterations (terminal writes cost time on fast runs).
    """

    def __init__(self, max_iterations: int | None = None, refresh_every: int = 1) -> None:
        super().__init__()
        self.max_iterations = max_iterations
        self.refresh_every = max(1, refresh_every)
        self._enabled = True
        self._bar: tqdm | None = None
        self._val_bar: tqdm | None = None
        self._label = "train"

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        start = iteration_of(pl_module)
        self._bar = tqdm(
            total=self.max_iterations, initial=start, desc=self._phase_label(trainer, start), unit="it",
            dynamic_ncols=True, file=sys.stderr, smoothing=0.05,
        )  # fmt: skip

    def _phase_label(self, trainer: pl.Trainer, iteration: int) -> str:
        """``train`` or, with resolution phases, ``train phase 2/2: 512², batch 4``."""
        phases = getattr(trainer.datamodule, "phases", None) if trainer.datamodule is not None else None
        if isinstance(phases, PhaseSchedule) and phases.configured:
            self._label = f"train {phases.describe(phases.index_at(iteration))}"
        return self._label

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._bar is None:
            return
        it = iteration_of(pl_module)
        if it - self._bar.n >= self.refresh_every or it == self.max_iterations:
            label = self._label
            if self._phase_label(trainer, it) != label:
                self._bar.set_description(self._label, refresh=False)
            self._bar.update(it - self._bar.n)
            metrics = self.get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            self._bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in list(metrics.items())[:4]},
                refresh=False,
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        total = sum(int(n) for n in trainer.num_val_batches if n != float("inf")) or None
        self._val_bar = tqdm(total=total, desc="validation", unit="batch", leave=False, file=sys.stderr)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._val_bar is not None:
            self._val_bar.update(1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.on_train_end(trainer, pl_module)
