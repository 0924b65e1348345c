"""Shard specs -> URL lists, and which (rank, worker) reads which shards.

Splitting is done here, explicitly, from the rank and world size captured in the main process (Lightning's
trainer, else torch.distributed, else the RANK/WORLD_SIZE environment variables), instead of by
``wds.split_by_node`` inside the worker: DataLoader workers may be spawned processes in which
torch.distributed is not initialised, and then every rank would silently read the same shards.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from webdataset.shardlists import expand_urls

from klvae.errors import ConfigError

__all__ = ["ShardAssignment", "assign_shards", "distributed_info", "expand_shards", "worker_info"]


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _expand_one(pattern: str, where: str) -> list[str]:
    """Brace/env expansion as webdataset does it ("::" joins patterns), plus globbing of local paths."""
    urls: list[str] = []
    for url in expand_urls(pattern):
        if not _is_remote(url):
            url = os.path.expanduser(url.removeprefix("file://").removeprefix("file:"))
            if any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ConfigError(
                        f"{where}: glob {url!r} from shard pattern {pattern!r} matches no files"
                    )
                urls.extend(matches)
                continue
        urls.append(url)
    return urls


def expand_shards(spec: str | Sequence[str], where: str = "shards") -> list[str]:
    """Expand a shard spec into the list of shard URLs, checking that local shards exist.

    Args:
        spec: A pattern (``/data/train-{000000..004095}.tar``, ``a.tar::b.tar``, ``pipe:aws s3 cp ... -``,
            ``https://...``, a glob ``/data/*.tar``) or a list of such patterns.
        where: Config location for error messages, e.g. ``"train.sources[0].shards"``.

    Returns:
        Shard URLs/paths in spec order.

    Raises:
        ValueError: The spec is empty, expands to nothing, or names local files that do not exist
            (the message repeats the pattern so a typo is visible).
    """
    patterns = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Sequence) else None
    if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise ConfigError(
            f"{where}: expected a shard pattern string or a non-empty list of them, got {spec!r}"
        )
    urls: list[str] = []
    for pattern in patterns:
        expanded = _expand_one(pattern, where)
        local = [u for u in expanded if not _is_remote(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise ConfigError(
                f"{where}: {len(missing)} of {len(expanded)} shard(s) from shard pattern {pattern!r} do not exist "
                f"(first: {missing[0]!r}); check the path and the brace range"
            )
        urls.extend(expanded)
    if not urls:
        raise ConfigError(f"{where}: shard pattern {spec!r} expands to no shards")
    return urls


@dataclass(frozen=True)
class ShardAssignment:
    """What one (rank, worker) reads: these shards, keeping sample i of each shard iff i % stride == offset.

    With at least as many shards as readers the split is by shard (stride 1). With fewer, every reader
    opens the shards and keeps every stride-th sample: still disjoint and complete, at the price of
    reading the shards several times (fine for small validation sets; the module warns for training).
    """

    urls: tuple[str, ...]
    stride: int = 1
    offset: int = 0


def assign_shards(
    urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> ShardAssignment:
    """Disjoint, complete split of ``urls`` over ``world_size`` ranks x ``num_workers`` workers."""
    assert 0 <= rank < world_size and 0 <= worker < num_workers, (rank, world_size, worker, num_workers)
    readers = world_size * num_workers
    reader = rank * num_workers + worker
    if len(urls) >= readers:
        return ShardAssignment(tuple(urls[reader::readers]))
    if len(urls) >= world_size:
        return ShardAssignment(tuple(urls[rank::world_size]), stride=num_workers, offset=worker)
    return ShardAssignment(tuple(urls), stride=readers, offset=reader)


def distributed_info(trainer: Any = None) -> tuple[int, int]:
    """(rank, world_size): from the Lightning trainer if attached, else torch.distributed, else the
    RANK/WORLD_SIZE environment variables (torchrun, SLURM wrappers, tests), else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
