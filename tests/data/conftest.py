"""Tiny shards and images for the data tests (a few KB each, so the whole folder runs in seconds)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **kwargs)
    return out.getvalue()


def random_image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write samples (dicts with __key__ and byte values) to one tar."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def img2dataset_sample(key: str, seed: int, ext: str = "jpg") -> dict:
    """img2dataset's layout: {key}.jpg + {key}.json + {key}.txt."""
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    return {
        "__key__": key,
        ext: encode(random_image(seed), fmt),
        "json": json.dumps({"key": key, "caption": f"photo {key}"}).encode(),
        "txt": f"photo {key}".encode(),
    }


def make_shards(root: Path, prefix: str, n_shards: int, per_shard: int) -> str:
    """n_shards shards of per_shard samples with globally unique keys "{prefix}{shard}x{index}";
    returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = [
            img2dataset_sample(f"{prefix}{s:02d}x{i:03d}", seed=s * 1000 + i) for i in range(per_shard)
        ]
        write_shard(root / f"{prefix}-{s:06d}.tar", samples)
    return str(root / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def eight_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """8 shards x 6 samples (48 unique keys): the brace pattern."""
    return make_shards(tmp_path_factory.mktemp("eight"), "a", n_shards=8, per_shard=6)


@pytest.fixture
def single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure an outer launcher's RANK/WORLD_SIZE does not leak into the tests."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
