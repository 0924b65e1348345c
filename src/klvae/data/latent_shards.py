"""Latent shards (``klvae-encode``'s output) back to batches for a diffusion model: ``LatentShardDataModule``.

Map-style: the tars are indexed once (member offsets, read from the tar headers) and each sample is read
with one seek, so the order is a true permutation per epoch and a resumed run skips exactly the batches it
had trained on (``klvae.data.resume``, as the image-folder module). Everything random about a sample — the
flipped copy or not, the posterior draw ``z = mean + std * eps`` — is a function of (seed, epoch, index).

Batches: ``{"latent": float32 (B, C, h, w), "label": int64 (B,) (-1 without labels), "__key__": [str]}``,
latents normalised with the directory's measured statistics (``latent_norm``).
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from klvae.data.latent_format import (
    FLIP_MEMBERS,
    LABEL_MEMBER,
    MOMENT_MEMBERS,
    LatentIndex,
    unpack_array,
)
from klvae.data.resume import map_style_loader
from klvae.data.sharding import distributed_info
from klvae.errors import ConfigError, DataError

__all__ = [
    "LATENT_NORMS",
    "LatentShardDataModule",
    "LatentShardDataset",
    "hash_fraction",
    "in_validation_split",
]

# global: (z - shift_factor) * scaling_factor, one scalar pair (SD3/FLUX.1's convention, klvae-latent-stats');
# channel: per-channel mean/std (LightningDiT's latent_norm); none: the VAE's raw latents.
LATENT_NORMS = ("global", "channel", "none")
SPLITS = ("all", "train", "val")


def hash_fraction(key: str, seed: int = 0) -> float:
    """A deterministic pseudo-random number in [0, 1) for a key: the basis of subsets that do not depend on
    file order (a hold-out split, a reference subset)."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_validation_split(key: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic hold-out by key: :func:`hash_fraction` below ``val_fraction``.

    Keys, not positions: two latent directories of the same images (two VAEs) split identically.
    """
    return hash_fraction(key, seed) < val_fraction


def _index_tar(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key → {member extension: (data offset, size)} from the tar headers (no member data is read)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"latent shard {path} cannot be read ({type(e).__name__}: {e}); re-run klvae-encode "
                        "into its directory (finished shards are kept)") from e  # fmt: skip
    return samples


class LatentShardDataset(Dataset):
    """The samples of a latent directory, read by random access.

    Indices are ints or ``(epoch, index)`` pairs (from :class:`~klvae.data.resume.ResumableSampler`).

    Args:
        latent_dir: a directory written by ``klvae-encode``.
        split: ``all``, or ``train``/``val`` of the key-hash hold-out (:func:`in_validation_split`).
        val_fraction: share of keys held out for ``val``.
        sample_posterior: draw ``mean + std * eps`` (as LDM/DiT training does); False returns the mean.
        flip: pick the flipped copy with probability 1/2 when the samples have one (LightningDiT).
        latent_norm: one of :data:`LATENT_NORMS`.
        seed: seeds the per-sample draws and the split.
    """

    def __init__(
        self,
        latent_dir: str | Path,
        split: str = "all",
        val_fraction: float = 0.0,
        sample_posterior: bool = True,
        flip: bool = True,
        latent_norm: str = "global",
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if latent_norm not in LATENT_NORMS:
            raise ConfigError(f"latent_norm must be one of {LATENT_NORMS}, got {latent_norm!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.index = LatentIndex.read(latent_dir)
        self.sample_posterior, self.seed = sample_posterior, seed
        self.flip = flip and self.index.flip
        self.items: list[tuple[Path, str, dict[str, tuple[int, int]]]] = []
        for path in self.index.shard_paths:
            for key, members in _index_tar(path).items():
                if split != "all" and in_validation_split(key, val_fraction, seed) != (split == "val"):
                    continue
                missing = [m for m in MOMENT_MEMBERS if m not in members]
                if missing:
                    raise DataError(f"{path}: sample {key!r} has no {missing[0]} member; not a klvae latent "
                                    "shard, or a damaged one: re-encode it")  # fmt: skip
                self.items.append((path, key, members))
        if not self.items:
            raise DataError(f"{self.index.root}: no samples in split {split!r} (val_fraction {val_fraction}); "
                            "lower or raise val_fraction, or encode more images")  # fmt: skip
        stats, channels = self.index.stats, self.index.latent_shape[0]
        if latent_norm == "global":
            shift, scale = [stats["shift_factor"]] * channels, [stats["scaling_factor"]] * channels
        elif latent_norm == "channel":
            shift, scale = stats["per_channel_mean"], [1.0 / s for s in stats["per_channel_std"]]
        else:
            shift, scale = [0.0] * channels, [1.0] * channels
        self.shift = np.asarray(shift, dtype=np.float32)[:, None, None]  # (C, 1, 1)
        self.scale = np.asarray(scale, dtype=np.float32)[:, None, None]
        self._files: dict[Path, Any] = {}  # open shard files, per process (workers get their own)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, path: Path, where: tuple[int, int]) -> bytes:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 (kept open for the dataset's life)
        f.seek(where[0])
        return f.read(where[1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # file objects do not cross into worker processes
        return state

    def has_labels(self) -> bool:
        return self.index.classes is not None

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        path, key, members = self.items[index]
        rng = random.Random(f"klvae-latents/{self.seed}/{epoch}/{index}")
        names = (
            FLIP_MEMBERS
            if self.flip and FLIP_MEMBERS[0] in members and rng.random() < 0.5
            else MOMENT_MEMBERS
        )
        mean = unpack_array(self._read(path, members[names[0]])).astype(np.float32)  # (C, h, w)
        if self.sample_posterior:
            std = unpack_array(self._read(path, members[names[1]])).astype(np.float32)
            eps = np.random.default_rng(rng.getrandbits(64)).standard_normal(mean.shape, dtype=np.float32)
            mean = mean + std * eps
        latent = (mean - self.shift) * self.scale
        label = int(self._read(path, members[LABEL_MEMBER])) if LABEL_MEMBER in members else -1
        return {"latent": torch.from_numpy(latent), "label": label, "__key__": key}


class LatentShardDataModule(pl.LightningDataModule):
    """A latent directory → training (and held-out validation) batches for a latent diffusion model.

    Args:
        latent_dir: a directory written by ``klvae-encode``.
        batch_size: per-process batch size.
        num_workers: loader worker processes.
        val_fraction: share of keys held out for validation (0: no validation split, train on all).
        sample_posterior: training latents are posterior draws (validation always uses the mean).
        flip: training uses the flipped copies half of the time when present.
        latent_norm: one of :data:`LATENT_NORMS`.
        seed: order, draws and split.
        drop_last: drop the last partial training batch.
    """

    def __init__(
        self,
        latent_dir: str,
        batch_size: int = 256,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        sample_posterior: bool = True,
        flip: bool = True,
        latent_norm: str = "global",
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"LatentShardDataModule: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"LatentShardDataModule: num_workers must be an int >= 0, got {num_workers!r}")
        self.latent_dir, self.batch_size, self.num_workers = latent_dir, batch_size, num_workers
        self.val_fraction, self.sample_posterior, self.flip = val_fraction, sample_posterior, flip
        self.latent_norm, self.seed, self.drop_last = latent_norm, seed, drop_last
        self.train_set: LatentShardDataset | None = None
        self.val_set: LatentShardDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the index and the tar headers (fails naming the directory if it is not complete)."""
        if self.train_set is None:
            split = "train" if self.val_fraction > 0 else "all"
            self.train_set = LatentShardDataset(self.latent_dir, split, self.val_fraction, self.sample_posterior,
                                                self.flip, self.latent_norm, self.seed)  # fmt: skip
            if self.drop_last and len(self.train_set) < self.batch_size:
                raise DataError(f"{self.latent_dir}: {len(self.train_set)} training latents, fewer than "
                                f"batch_size {self.batch_size}; lower batch_size")  # fmt: skip
        if self.val_fraction > 0 and self.val_set is None:
            self.val_set = LatentShardDataset(self.latent_dir, "val", self.val_fraction, False, False,
                                              self.latent_norm, self.seed)  # fmt: skip

    def loader(
        self, dataset: Dataset, shuffle: bool, drop_last: bool, rank: int, world_size: int
    ) -> DataLoader:
        """A resumable loader over ``dataset`` (``ResumableSampler``; the trainer, if any, saves its place)."""
        return map_style_loader(
            dataset,
            lambda: getattr(self, "trainer", None),
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=self.seed,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch, split over ranks, resumable mid-epoch."""
        self.setup("fit")
        rank, world_size = distributed_info(getattr(self, "trainer", None))
        return self.loader(self.train_set, True, self.drop_last, rank, world_size)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out latents in a fixed order (posterior means, no flips), or [] without ``val_fraction``."""
        self.setup("validate")
        if self.val_set is None:
            return []
        rank, world_size = distributed_info(getattr(self, "trainer", None))
        return self.loader(self.val_set, False, False, rank, world_size)
