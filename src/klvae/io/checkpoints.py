"""Training-checkpoint files: atomic writes with a SHA-256 sidecar, ``weights_only`` loads, NaN-free weights.

Lightning's own ``TorchCheckpointIO`` streams into the destination path, so a crash (OOM kill, SLURM time
limit) during the write leaves a truncated ``last.ckpt``. Here every checkpoint goes to a temporary file in the
same directory, is fsynced and then renamed over the target (:func:`klvae.io.files.write_atomically`): readers
see the old file or the new one, never half of one. Beside each file, ``<name>.sha256`` records its SHA-256 (and
the previous file's, so a crash between the two renames still verifies), which detects a file damaged later
(flipped bits, a copy cut short): :func:`checkpoint_problem` checks it before a resume.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from klvae.io.files import load_torch_file, torch_save_to, write_atomically

__all__ = [
    "atomic_torch_save",
    "checksum_path",
    "checkpoint_problem",
    "load_checkpoint",
    "nonfinite_tensors",
    "remove_stale_temp_files",
    "sha256_of",
]

log = logging.getLogger(__name__)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_checksums(path: Path) -> list[str]:
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return []
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (:func:`klvae.io.files.write_atomically`), with its SHA-256.

    The SHA-256 goes to ``<path>.sha256`` first (listing the new and the current file's sums), then the
    checkpoint is renamed into place: at every instant the file on disk matches a recorded sum.
    """
    path = Path(path)

    def record_checksum(tmp: Path) -> None:
        digest = sha256_of(tmp)  # read back from the page cache: what is on disk, not what we meant
        previous = _recorded_checksums(path)[:1] if path.is_file() else []
        lines = [f"{digest}  {path.name}"] + [f"{p}  {path.name} (previous)" for p in previous if p != digest]
        text = "\n".join(lines) + "\n"
        write_atomically(checksum_path(path), lambda side: side.write_text(text))

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
        return f"its SHA-256 does not match {checksum_path(path).name} (the file was damaged after writing)"
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
