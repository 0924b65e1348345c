"""Checkpoint files: atomic writes, ``weights_only`` loads, and cadences counted in training iterations.

Lightning's own ``TorchCheckpointIO`` streams into the destination path, so a crash (OOM kill, SLURM
time limit) during the write leaves a truncated ``last.ckpt``. Here every checkpoint goes to a temporary
file in the same directory, is fsynced and then renamed over the target: readers see the old file or
the new one, never half of one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

__all__ = ["AtomicCheckpointIO", "IterationCheckpoint", "TopKCheckpoint", "load_checkpoint", "iteration_of"]

log = logging.getLogger(__name__)


def iteration_of(pl_module: pl.LightningModule) -> int:
    """The training-iteration counter of the model (``model.iteration``; batches, not optimizer steps)."""
    return int(getattr(pl_module, "iteration", 0))


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temp file in the same directory, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no half-written temp file behind (and never touch the previous good checkpoint).
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: plain tensors and containers only.

    Raises:
        ValueError: the file does not exist, or is not a checkpoint that loads with ``weights_only``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be loaded with torch.load(weights_only=True): {e}. "
            "It is truncated or holds pickled Python objects; re-save it with plain containers."
        ) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes atomically and loads with ``weights_only=True``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        atomic_torch_save(checkpoint, path)

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

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def save_last(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Write ``last.ckpt`` now (every rank must call this: ``save_checkpoint`` has a barrier)."""
        trainer.save_checkpoint(self.last_path, weights_only=False)  # False: the full training state
        self._last_saved_iteration = iteration_of(pl_module)
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
            trainer.save_checkpoint(self.dirpath / f"iter_{it:08d}.ckpt", weights_only=False)
        if keep or last:
            self.save_last(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if iteration_of(pl_module) != self._last_saved_iteration:
            self.save_last(trainer, pl_module)


class TopKCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` keeping the top-k by a validation metric, able to name files by ``{iteration}``."""

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(iteration_of(trainer.lightning_module))
        return candidates
