"""What ``klvae-encode`` reads: the work plan (which images make output shard i) and the image reader.

The plan is a pure function of the input, so every process of a multi-process run and every resumed run
agree on it: an image folder is cut into chunks of ``samples_per_shard`` files (sorted paths), webdataset
input maps input shard i to output shard i. Output shard i belongs to rank ``i % world_size``.

Images get the evaluation transform (resize the shorter side to R, center crop R², bicubic:
``klvae.data.transforms.ImageTransform(train=False)``), the pixels ``klvae-eval`` scores. As in
evaluation, nothing is substituted: a bad image is skipped and counted by kind (``klvae.data.stats``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset

from klvae.data.folder import list_images
from klvae.data.sharding import ShardAssignment, expand_shards, worker_info
from klvae.data.stats import SkipCounter
from klvae.data.streams import read_shard
from klvae.data.transforms import ImageTooSmallError, ImageTransform, find_image_key
from klvae.errors import ConfigError

__all__ = ["LABEL_MODES", "EncodePlan", "UnitReader", "WorkUnit", "plan_units"]

LABEL_MODES = ("auto", "none", "folder", "cls")
_EXAMPLES = 20  # skipped images named per shard (all are counted)


@dataclass(frozen=True)
class WorkUnit:
    """Output shard ``index``: the image files (folder input) or the input shard URL that make it."""

    index: int
    files: tuple[str, ...] = ()
    url: str | None = None


@dataclass(frozen=True)
class EncodePlan:
    """All work units of an input, plus its labels: ``classes`` names class ``i`` (folder labels) or is
    None (no labels, or labels read per sample from ``cls`` members: ``label_source``)."""

    units: list[WorkUnit]
    root: Path | None  # the image folder, None for shards
    label_source: str  # "none", "folder" or "cls"
    classes: list[str] | None
    num_images: int | None  # known in advance for folders
    suffix_in_keys: bool = False  # folder keys keep the file suffix only when two files share a stem

    def folder_key(self, path: Path) -> str:
        """A folder image's key: its path under the root without suffix (``klvae.data.folder``'s keys)."""
        relative = path.relative_to(self.root)
        return (relative if self.suffix_in_keys else relative.with_suffix("")).as_posix()


def _folder_classes(root: Path, files: Sequence[Path]) -> list[str] | None:
    """ImageNet/torchvision ``ImageFolder`` layout: every image one level below a class folder."""
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None
    return sorted({p[0] for p in parts})


def plan_units(data: str, samples_per_shard: int, labels: str = "auto") -> EncodePlan:
    """The deterministic work plan for ``data`` (an image folder or a webdataset shard spec).

    Args:
        data: image folder (recursive) or shards (``/data/train-{000000..000099}.tar``, a glob, ``a::b``).
        samples_per_shard: images per output shard for folder input (shard input keeps its shards).
        labels: ``auto`` (folder: class subfolders when every image is in one and there are at least two;
            shards: ``cls`` members when present), ``none``, ``folder`` or ``cls``.

    Raises:
        ConfigError: bad ``labels`` or ``samples_per_shard``; DataError: an empty or missing source.
    """
    if labels not in LABEL_MODES:
        raise ConfigError(f"--labels must be one of {LABEL_MODES}, got {labels!r}")
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    root = Path(data).expanduser()
    if root.is_dir():
        if labels == "cls":
            raise ConfigError(
                "--labels cls reads webdataset 'cls' members; an image folder has folder labels"
            )
        files = list_images(root)
        classes = _folder_classes(root, files) if labels in ("auto", "folder") else None
        if labels == "folder" and classes is None:
            raise ConfigError(f"--labels folder: every image under {root} must be inside a class subfolder")
        if labels == "auto" and classes is not None and len(classes) < 2:
            classes = None
        chunks = [files[i : i + samples_per_shard] for i in range(0, len(files), samples_per_shard)]
        units = [WorkUnit(i, tuple(str(f) for f in chunk)) for i, chunk in enumerate(chunks)]
        stems = {f.relative_to(root).with_suffix("").as_posix() for f in files}
        return EncodePlan(units, root, "folder" if classes else "none", classes, len(files),
                          suffix_in_keys=len(stems) < len(files))  # fmt: skip
    if labels == "folder":
        raise ConfigError("--labels folder needs an image folder; shards carry labels as 'cls' members")
    urls = expand_shards(data, where="--data")
    units = [WorkUnit(i, url=url) for i, url in enumerate(urls)]
    return EncodePlan(units, None, "none" if labels == "none" else "cls", None, None)


class UnitReader(IterableDataset):
    """Images of some work units, each unit read by one DataLoader worker, in order.

    Yields ``{"unit", "key", "source", "image": uint8 (R, R, 3), "original_size": (w, h), "label"}`` per
    usable image and, after each unit, ``{"unit", "end": True, "skipped": {kind: n}, "examples": [...]}``.
    """

    def __init__(
        self, plan: EncodePlan, units: Sequence[WorkUnit], resolution: int, min_size: int = 0
    ) -> None:
        super().__init__()
        self.plan, self.units = plan, list(units)
        self.transform = ImageTransform(resolution, min_size=min_size, train=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        for unit in self.units[worker::num_workers]:
            counter, examples = SkipCounter(), []
            samples = self._folder(unit) if unit.url is None else self._shard(unit, counter)
            for key, source, data, label in samples:
                item = self._decode(key, source, data, label, counter, examples)
                if item is not None:
                    yield {"unit": unit.index, **item}
            yield {"unit": unit.index, "end": True, "skipped": counter.total, "examples": examples}

    def _folder(self, unit: WorkUnit) -> Iterator[tuple[str, str, bytes | Exception, int | None]]:
        root, classes = self.plan.root, self.plan.classes
        for name in unit.files:
            path = Path(name)
            label = classes.index(path.relative_to(root).parts[0]) if classes else None
            try:
                data: bytes | Exception = path.read_bytes()
            except OSError as e:
                data = e
            yield self.plan.folder_key(path), str(path), data, label

    def _shard(self, unit: WorkUnit, counter: SkipCounter) -> Iterator[tuple[str, str, Any, int | None]]:
        name = Path(unit.url).name
        for sample in read_shard(unit.url, ShardAssignment((unit.url,)), counter):
            key = str(sample.get("__key__"))
            image_key = find_image_key(sample)
            data = sample[image_key] if image_key else None
            label = None
            if self.plan.label_source == "cls" and "cls" in sample:
                label = int(bytes(sample["cls"]).decode().strip())
            yield key, f"{name}:{key}", data, label

    def _decode(self, key: str, source: str, data: Any, label: int | None, counter: SkipCounter,
                examples: list[dict[str, str]]) -> dict[str, Any] | None:  # fmt: skip
        kind = None
        try:
            if data is None:
                kind, detail = "missing_image", f"{source}: no jpg/jpeg/png/webp member"
            elif isinstance(data, Exception):
                kind, detail = "corrupt_image", f"{source}: {data!r}"
            else:
                size = Image.open(io.BytesIO(data)).size  # header only
                return {"key": key, "source": source, "image": self.transform(data, None),
                        "original_size": list(size), "label": label}  # fmt: skip
        except ImageTooSmallError as e:
            kind, detail = "too_small", f"{source}: {e}"
        except Exception as e:  # corrupt or truncated file, unsupported format: skipped and counted
            kind, detail = "corrupt_image", f"{source}: {type(e).__name__}: {e}"
        counter.add(kind, detail)
        if len(examples) < _EXAMPLES:
            examples.append({"source": source, "kind": kind, "error": detail[:300]})
        return None
