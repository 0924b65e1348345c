"""The latent-shard format that ``klvae-encode`` writes and any diffusion trainer can read (docs/latents.md).

A latent directory holds webdataset tars ``latents-000000.tar, ...`` and an index ``latents.json``. Each
sample of a tar is a group of members sharing a key (webdataset's convention: ``{key}.{ext}``):

============== ======================================================================================
member         content
============== ======================================================================================
``mean.npy``   posterior mean, ``(C, h, w)`` (numpy ``.npy``, float32 by default)
``std.npy``    posterior standard deviation ``exp(logvar / 2)``, same shape and dtype
``mean_flip.npy``, ``std_flip.npy``  the same for the horizontally flipped image (``--flip``), as
               LightningDiT's ``extract_features.py`` stores a flipped copy of every image
``cls``        class index as ASCII text (only when the data has labels; webdataset's ``cls`` convention)
``json``       ``{"source", "original_size": [width, height]}``
============== ======================================================================================

Latents are unscaled (the VAE's own space); the index records ``scaling_factor``/``shift_factor`` measured on
these latents, so a trainer uses ``(z - shift_factor) * scaling_factor`` with ``z = mean + std * eps``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klvae.errors import DataError

__all__ = [
    "FLIP_MEMBERS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LABEL_MEMBER",
    "META_MEMBER",
    "MOMENT_MEMBERS",
    "LatentIndex",
    "MomentSums",
    "check_compatible",
    "pack_sample",
    "sample_key",
    "shard_name",
    "unpack_array",
]

FORMAT_NAME = "klvae-latents"
FORMAT_VERSION = 1
INDEX_NAME = "latents.json"
MOMENT_MEMBERS = ("mean.npy", "std.npy")
FLIP_MEMBERS = ("mean_flip.npy", "std_flip.npy")
LABEL_MEMBER = "cls"
META_MEMBER = "json"


def shard_name(index: int) -> str:
    """File name of output shard ``index`` (independent of how many processes wrote the directory)."""
    return f"latents-{index:06d}.tar"


def sample_key(name: str) -> str:
    """A webdataset-safe key: webdataset splits a member name at the first dot of its base name, so dots
    become underscores (``photos/a.v2.png`` → ``photos/a_v2_png``; the suffix stays, so ``a.png`` and
    ``a.jpg`` remain distinct)."""
    return name.replace(".", "_").lstrip("/")


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def unpack_array(data: bytes) -> np.ndarray:
    """A ``.npy`` member back to an array (never unpickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def pack_sample(
    key: str,
    mean: np.ndarray,
    std: np.ndarray,
    meta: Mapping[str, Any],
    flip: tuple[np.ndarray, np.ndarray] | None = None,
    label: int | None = None,
) -> dict[str, Any]:
    """One sample's tar members, ready for ``webdataset.TarWriter.write``.

    Args:
        key: from :func:`sample_key`.
        mean, std: posterior moments (C, h, w).
        meta: ``{"source", "original_size"}`` (written as the ``json`` member).
        flip: moments of the horizontally flipped image, or None.
        label: class index, or None.
    """
    sample: dict[str, Any] = {
        "__key__": key,
        MOMENT_MEMBERS[0]: _npy(mean),
        MOMENT_MEMBERS[1]: _npy(std),
        META_MEMBER: json.dumps(dict(meta)).encode(),
    }
    if flip is not None:
        sample[FLIP_MEMBERS[0]], sample[FLIP_MEMBERS[1]] = _npy(flip[0]), _npy(flip[1])
    if label is not None:
        sample[LABEL_MEMBER] = str(int(label)).encode()
    return sample


@dataclass
class MomentSums:
    """Per-channel sums of E[z] and E[z²] over posterior samples z ~ N(mean, std²), in float64.

    Exact in expectation (E[z²] = mean² + std²), so no sampling noise; mergeable across shards and ranks.
    Counts are latent positions per channel.
    """

    count: int = 0
    total: list[float] = field(default_factory=list)  # (C,) Σ mean
    total_sq: list[float] = field(default_factory=list)  # (C,) Σ (mean² + std²)

    def add(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Add a batch of moments (B, C, h, w)."""
        m, s = mean.astype(np.float64), std.astype(np.float64)
        sums, sums_sq = m.sum(axis=(0, 2, 3)), (m * m + s * s).sum(axis=(0, 2, 3))
        if not self.total:
            self.total, self.total_sq = [0.0] * len(sums), [0.0] * len(sums)
        self.total = [a + float(b) for a, b in zip(self.total, sums, strict=True)]
        self.total_sq = [a + float(b) for a, b in zip(self.total_sq, sums_sq, strict=True)]
        self.count += m.shape[0] * m.shape[2] * m.shape[3]

    def merge(self, other: MomentSums) -> MomentSums:
        if not other.count:
            return MomentSums(self.count, list(self.total), list(self.total_sq))
        if not self.count:
            return MomentSums(other.count, list(other.total), list(other.total_sq))
        return MomentSums(
            self.count + other.count,
            [a + b for a, b in zip(self.total, other.total, strict=True)],
            [a + b for a, b in zip(self.total_sq, other.total_sq, strict=True)],
        )

    def stats(self) -> dict[str, Any]:
        """``scaling_factor`` (1/std) and ``shift_factor`` (mean) over all channels, plus per-channel values.

        Raises:
            DataError: no latents were counted.
        """
        if not self.count:
            raise DataError("no latents to compute statistics from: every image was skipped")
        mean_c = np.asarray(self.total) / self.count
        second_c = np.asarray(self.total_sq) / self.count
        mean = float(mean_c.mean())
        var = max(float(second_c.mean()) - mean * mean, 1e-24)  # channels hold equal counts
        return {
            "scaling_factor": 1.0 / math.sqrt(var),
            "shift_factor": mean,
            "mean": mean,
            "std": math.sqrt(var),
            "per_channel_mean": mean_c.tolist(),
            "per_channel_std": np.sqrt(np.maximum(second_c - mean_c**2, 1e-24)).tolist(),
            "statistic": "posterior samples (exact expectation: E[z] = mean, E[z^2] = mean^2 + std^2)",
        }


@dataclass
class LatentIndex:
    """``latents.json``: what a latent directory holds and how it was made.

    Attributes:
        root: the directory.
        shards: ``[{"name", "count"}]`` in order.
        latent_shape: (C, h, w).
        flip: whether samples carry flipped copies.
        classes: class names when samples carry ``cls`` labels, else None.
        stats: :meth:`MomentSums.stats` of all latents.
        vae: the VAE that made them (``{"path", "format", "ema", "network"}``), used to decode.
        record: the whole JSON.
    """

    root: Path
    shards: list[dict[str, Any]]
    latent_shape: tuple[int, int, int]
    flip: bool
    classes: list[str] | None
    stats: dict[str, Any]
    vae: dict[str, Any]
    record: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return sum(int(s["count"]) for s in self.shards)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s["name"] for s in self.shards]

    @classmethod
    def read(cls, root: str | Path) -> LatentIndex:
        """Read and check ``root/latents.json``.

        Raises:
            DataError: no index (not a latent directory, or ``klvae-encode`` has not finished), another
                format or version, or a shard it lists is missing.
        """
        root = Path(root).expanduser()
        path = root / INDEX_NAME
        if not path.is_file():
            partial = sorted(root.glob("latents-*.tar")) if root.is_dir() else []
            hint = (
                f"it has {len(partial)} shard(s) but no index: klvae-encode has not finished; run the same "
                "klvae-encode command again to complete it"
                if partial
                else "write one with klvae-encode VAE --data IMAGES --out DIR"
            )
            raise DataError(f"{str(root)!r} is not a latent directory ({INDEX_NAME} missing); {hint}")
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}); re-run klvae-encode") from None
        if record.get("format") != FORMAT_NAME or record.get("version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: format {record.get('format')!r} version {record.get('version')!r}, expected "
                f"{FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        index = cls(
            root,
            list(record["shards"]),
            tuple(record["latent_shape"]),
            bool(record["flip"]),
            record.get("classes"),
            dict(record["stats"]),
            dict(record["vae"]),
            record,
        )
        missing = [p.name for p in index.shard_paths if not p.is_file()]
        if missing:
            raise DataError(f"{root}: {len(missing)} shard(s) listed in {INDEX_NAME} are missing (first: "
                            f"{missing[0]}); re-run klvae-encode into this directory")  # fmt: skip
        return index


def check_compatible(indexes: Sequence[LatentIndex]) -> None:
    """Latent directories compared in one benchmark must hold the same images (keys) at the same size.

    Raises:
        DataError: different resolution, sample count or label set, naming both directories.
    """
    first = indexes[0]
    for other in indexes[1:]:
        for name in ("resolution", "num_samples", "classes", "data"):
            a, b = first.record.get(name), other.record.get(name)
            if a != b:
                raise DataError(
                    f"latent directories {str(first.root)!r} and {str(other.root)!r} differ in {name} "
                    f"({a!r} vs {b!r}): encode the same images at the same resolution with each VAE"
                )
