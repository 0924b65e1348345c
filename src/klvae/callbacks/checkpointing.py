"""Checkpoint files: atomic, verified writes, ``weights_only`` loads, cadences counted in training iterations.

Lightning's own ``TorchCheckpointIO`` streams into the destination path, so a crash (OOM kill, SLURM
time limit) during the write leaves a truncated ``last.ckpt``. Here every checkpoint goes to a temporary
file in the same directory, is fsynced and then renamed over the target: readers see the old file or
the new one, never half of one. Beside each file, ``<name>.sha256`` records its SHA-256 (and the
previous file's, so a crash between the two renames still verifies), which detects a file damaged later
(flipped bits, a copy cut short): :func:`checkpoint_problem` checks it before a resume. A checkpoint whose
weights are not finite (NaN/inf) is never written: the last good one stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from klvae.interop.files import load_torch_file, torch_save_to, write_atomically

__all__ = [
    "AtomicCheckpointIO",
    "IterationCheckpoint",
    "at_round_boundary",
    "TopKCheckpoint",
    "checkpoint_problem",
    "iteration_of",
    "load_checkpoint",
    "nonfinite_tensors",
    "remove_stale_temp_files",
]

log = logging.getLogger(__name__)


def iteration_of(pl_module: pl.LightningModule) -> int:
    """The training-iteration counter of the model (``model.iteration``; batches, not optimizer steps)."""
    return int(getattr(pl_module, "iteration", 0))


def at_round_boundary(pl_module: pl.LightningModule) -> bool:
    """No accumulation round is under way (``model.at_round_boundary``; True for modules without rounds)."""
    return bool(getattr(pl_module, "at_round_boundary", True))


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_checksums(path: Path) -> list[str]:
    sidecar = _checksum_path(path)
    if not sidecar.is_file():
        return []
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`klvae.interop.files.write_atomically`), with its SHA-256.

    The SHA-256 goes to ``<path>.sha256`` first (listing the new and the current file's sums), then the
    checkpoint is renamed into place: at every instant the file on disk matches a recorded sum.
    """
    path = Path(path)

    def record_checksum(tmp: Path) -> None:
        digest = sha256_of(tmp)  # read back from the page cache: what is on disk, not what we meant
        previous = _recorded_checksums(path)[:1] if path.is_file() else []
        lines = [f"{digest}  {path.name}"] + [f"{p}  {path.name} (previous)" for p in previous if p != digest]
        text = "\n".join(lines) + "\n"
        write_atomically(_checksum_path(path), lambda side: side.write_text(text))

    write_atomically(path, lambda tmp: torch_save_to(obj, tmp), before_replace=record_checksum)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.*.tmp`` files a killed writer left in ``directory``; returns what was removed."""
    directory = Path(directory)
    removed = []
    for tmp in sorted(directory.glob(".*.tmp")) if directory.is_dir() else []:
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError as e:
            log.warning("could not remove stale temp file %s: %s", tmp, e)
    if removed:
        log.info("removed %d unfinished checkpoint temp file(s) from %s", len(removed), directory)
    return removed


def nonfinite_tensors(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of floating-point tensors that hold NaN or inf (one reduction per tensor, on its device)."""
    bad = []
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not safe to resume from (damaged, unloadable, non-finite weights), or None.

    Checks the recorded SHA-256 when ``<path>.sha256`` exists, then loads with ``weights_only=True``
    (memory-mapped: cheap) and checks that every weight in ``state_dict`` is finite.
    """
    path = Path(path)
    if not path.is_file():
        return "does not exist"
    recorded = _recorded_checksums(path)
    if recorded and sha256_of(path) not in recorded:
        return f"its SHA-256 does not match {_checksum_path(path).name} (the file was damaged after writing)"
    try:
        ckpt = load_torch_file(path, mmap=True)
    except ValueError as e:
        return f"cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        return "holds no state_dict (not a training checkpoint)"
    bad = nonfinite_tensors(state.items())
    if bad:
        return f"{len(bad)} weight tensor(s) are NaN/inf (first: {bad[0]})"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``: plain tensors and containers only.

    Raises:
        ValueError: the file does not exist, or is not a checkpoint that loads with ``weights_only``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return load_torch_file(path, map_location=map_location)


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
        for p in (Path(path), _checksum_path(Path(path))):
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
