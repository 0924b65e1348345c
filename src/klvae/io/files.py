"""The one reader (and writer) of weight files: ``.ckpt``/``.pth``/``.pt``/``.bin`` and ``.safetensors``.

Warm start, inference, export, evaluation, resume and the LPIPS/FID weight files all open files here, so
every unreadable file gives the same error naming it, and nothing is ever unpickled beyond tensors and plain
containers (``torch.load(weights_only=True)``; safetensors cannot hold code at all). Writes go to a temporary
file that replaces the target only once complete, so an interrupted export never leaves half a file.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SAFETENSORS_SUFFIX",
    "TensorFile",
    "load_torch_file",
    "read_tensor_file",
    "save_safetensors",
    "save_torch_file",
    "torch_save_to",
    "write_atomically",
]

SAFETENSORS_SUFFIX = ".safetensors"


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``).

    Args:
        path: a file written by ``torch.save``.
        map_location: as ``torch.load``'s.
        mmap: memory-map the tensors instead of reading them (cheap for a look at a multi-GB checkpoint);
            ignored for files in torch's legacy (pre-1.6, non-zip) format, which cannot be mapped.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: truncated, not a torch file, or holding pickled Python objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        return torch.load(
            path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except Exception as e:  # UnpicklingError under weights_only, truncated zip, not a torch file at all
        raise ValueError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}). It is truncated, not a torch file, or holds pickled Python "
            "objects: re-save it as a plain state dict or .safetensors from a trusted environment."
        ) from e


@dataclass
class TensorFile:
    """What a weight file holds.

    Attributes:
        path: the file.
        tensors: its state dict (a Lightning checkpoint's ``state_dict``), names → tensors.
        metadata: everything else: a checkpoint's other top-level entries (``hyper_parameters``,
            ``klvae_export`` ...), or a ``.safetensors`` header's metadata (values that are JSON objects
            decoded).
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == SAFETENSORS_SUFFIX


def _decode(value: str) -> Any:
    if value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def read_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Read a state dict and its metadata from ``.safetensors`` or a torch file (bare or a checkpoint).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unreadable (see :func:`load_torch_file`), or no mapping of names to tensors inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = {k: _decode(v) for k, v in (f.metadata() or {}).items()}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as e:  # SafetensorError: truncated header, bad JSON, cut-off data
            raise ValueError(f"{path} is not a readable .safetensors file ({type(e).__name__}: {e})") from e
        return TensorFile(path, tensors, metadata)
    obj = load_torch_file(path, mmap=True)
    metadata: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping):
        metadata = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return TensorFile(path, dict(obj), metadata)


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


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then move it over ``path`` in one step.

    A reader (or a crash) sees the old file or the complete new one, never a partial write; a failed write
    removes its temporary file and leaves the old one untouched. Temporary files are named ``.<name>.*.tmp``
    (what :func:`klvae.io.checkpoints.remove_stale_temp_files` cleans up after a SIGKILL) and get
    the mode the umask gives a new file (not mkstemp's 0600: exports are shared on clusters).

    Args:
        path: the target.
        write: writes the content to the path it is given.
        before_replace: called with the finished temporary file just before the rename (e.g. to record
            its checksum first, so the file on disk always matches a recorded sum).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; a clone also detaches from any live model.
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``.safetensors`` atomically; metadata values that are not strings are stored as JSON."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = save(_plain(tensors), metadata=meta)
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))  # Python I/O: a full disk is OSError


def save_torch_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{"state_dict": tensors, **metadata}`` with ``torch.save``, atomically.

    Metadata must be plain containers so that :func:`load_torch_file` (``weights_only``) reads it back.
    """
    obj = {"state_dict": _plain(tensors), **(metadata or {})}
    return write_atomically(path, lambda tmp: torch_save_to(obj, tmp))


def torch_save_to(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a full disk then raises ``OSError(ENOSPC)`` naming the
    file, where torch's own file writer raises an opaque ``RuntimeError``."""
    with open(path, "wb") as f:
        torch.save(obj, f)
