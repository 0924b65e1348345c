"""Checkpoint callbacks and Lightning's checkpoint IO, with cadences counted in training iterations.

The file format itself (atomic writes, the SHA-256 sidecar, NaN checks, ``weights_only`` loads) is
:mod:`klvae.io.checkpoints`; a checkpoint whose weights are not finite (NaN/inf) is never written: the last
good one stays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from klvae.io.checkpoints import atomic_torch_save, checksum_path, load_checkpoint, nonfinite_tensors

__all__ = [
    "AtomicCheckpointIO",
    "IterationCheckpoint",
    "at_round_boundary",
    "TopKCheckpoint",
    "iteration_of",
]

log = logging.getLogger(__name__)


def iteration_of(pl_module: pl.LightningModule) -> int:
    """The training-iteration counter of the model (``model.iteration``; batches, not optimizer steps)."""
    return int(getattr(pl_module, "iteration", 0))


def at_round_boundary(pl_module: pl.LightningModule) -> bool:
    """No accumulation round is under way (``model.at_round_boundary``; True for modules without rounds)."""
    return bool(getattr(pl_module, "at_round_boundary", True))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes atomically and loads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        bad = nonfinite_tensors((checkpoint.get("state_dict") or {}).items())
        if bad:
            # The last line of defence (the callbacks check first): never replace good weights with NaN.
            log.warning(
                "NOT writing %s: %d weight tensor(s) are NaN/inf (first: %s); the previous file stays",
                path, len(bad), bad[0],
            )  # fmt: skip
            return
        atomic_torch_save(checkpoint, path)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        for p in (Path(path), checksum_path(Path(path))):
            if p.is_file():
                p.unlink()

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # weights_only is forced: a checkpoint that needs full unpickling is a bug (OmegaConf leaked in).
        return load_checkpoint(path, map_location=map_location)


class IterationCheckpoint(Callback):
    """Writes ``last.ckpt`` and a kept ``iter_XXXXXXXX.ckpt`` every N training iterations.

    ``trainer.global_step`` counts optimizer steps (two per batch with two optimizers), so the cadence
    follows ``pl_module.iteration`` instead. ``last.ckpt`` is also refreshed every ``last_every_n_iterations``
    and when training ends, so a resume loses at most that much work.

    Args:
        dirpath: the run's ``checkpoints/`` directory.
        every_n_iterations: keep a numbered checkpoint at these iterations; ``0`` or ``None`` disables them.
        last_every_n_iterations: refresh ``last.ckpt`` this often (defaults to ``every_n_iterations``).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_iterations: int | None = 5000,
        last_every_n_iterations: int | None = None,
    ) -> None:
        for name, value in [
            ("every_n_iterations", every_n_iterations),
            ("last_every_n_iterations", last_every_n_iterations),
        ]:
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.dirpath = Path(dirpath)
        self.every_n_iterations = every_n_iterations or 0
        self.last_every_n_iterations = last_every_n_iterations or self.every_n_iterations
        self._last_saved_iteration: int | None = None
        self._last_good_iteration: int | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def weights_finite(self, pl_module: pl.LightningModule, what: str) -> bool:
        """False (with a warning) when a weight is NaN/inf; every rank agrees (DDP replicas are equal)."""
        bad = nonfinite_tensors(pl_module.state_dict().items())
        if not bad:
            return True
        good = self._last_good_iteration
        log.warning(
            "NOT writing %s at iteration %d: %d weight tensor(s) are NaN/inf (first: %s); %s",
            what, iteration_of(pl_module), len(bad), bad[0],
            f"last.ckpt stays the last good checkpoint (iteration {good})" if good is not None
            else "the previous checkpoints stay",
        )  # fmt: skip
        return False

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> bool:
        if not self.weights_finite(pl_module, path.name):
            return False
        trainer.save_checkpoint(path, weights_only=False)  # False: the full training state
        return True

    def save_last(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Write ``last.ckpt`` now (every rank must call this: ``save_checkpoint`` has a barrier).

        Returns the path, or None when the weights are not finite and nothing was written.
        """
        self._last_saved_iteration = iteration_of(pl_module)
        if not self._save(trainer, pl_module, self.last_path):
            return None
        self._last_good_iteration = iteration_of(pl_module)
        return self.last_path

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        it = iteration_of(pl_module)
        if it == 0 or it == self._last_saved_iteration:  # with accumulation, iteration repeats across batches
            return
        keep = self.every_n_iterations and it % self.every_n_iterations == 0
        last = self.last_every_n_iterations and it % self.last_every_n_iterations == 0
        if keep:
            self._save(trainer, pl_module, self.dirpath / f"iter_{it:08d}.ckpt")
        if keep or last:
            self.save_last(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if iteration_of(pl_module) != self._last_saved_iteration:
            self.save_last(trainer, pl_module)


class TopKCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping the top-k by a validation metric, able to name files by ``{iteration}``."""

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        # Decided before Lightning ranks the file, so its top-k bookkeeping never names a file not written.
        value = monitor_candidates.get(self.monitor) if self.monitor else None
        if value is not None and not torch.isfinite(value).all():
            log.warning(
                "not ranking iteration %d among the best checkpoints: %s is %s",
                iteration_of(trainer.lightning_module), self.monitor, value.item(),
            )  # fmt: skip
            return
        if nonfinite_tensors(trainer.lightning_module.state_dict().items()):
            log.warning("NOT writing a best checkpoint: the weights are NaN/inf")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(iteration_of(trainer.lightning_module))
        return candidates
