"""``klvae-encode``: images → latent shards (docs/latents.md) with any VAE klvae reads.

Usage::

    klvae-encode my-vae/ --data /data/imagenet/train --out latents/my-vae --resolution 256 --flip
    torchrun --nproc_per_node 8 -m klvae.diffusability.encode my-vae/ --data '/data/in1k-{000000..001023}.tar' \
        --out latents/my-vae --precision bf16 --flip

One process per GPU (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun, Lightning or a SLURM wrapper set
them; no process group is needed): output shard i is written by rank ``i % WORLD_SIZE``. Each shard is
written atomically with a small ``.json`` beside it (count, latent moment sums, skipped images); an
interrupted run re-run with the same command encodes only the shards that are missing. The last process
to finish writes ``latents.json`` (statistics, ``scaling_factor``/``shift_factor``, the VAE record).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klvae.data.latent_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    MomentSums,
    pack_sample,
    sample_key,
    shard_name,
)
from klvae.errors import ConfigError, DataError
from klvae.io.files import write_atomically

__all__ = ["CONFIG_NAME", "EncodeResult", "encode_to_shards", "main"]

log = logging.getLogger(__name__)

CONFIG_NAME = "encode_config.json"  # the settings a directory was written with: a resume must match them
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class EncodeResult:
    """What one process did: shards written and skipped as finished, images, and where the time went."""

    rank: int
    world_size: int
    shards_written: list[int] = field(default_factory=list)
    shards_already_done: list[int] = field(default_factory=list)
    images: int = 0
    skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # read, to_device, encode, to_host, write, total
    index_written: bool = False


def _sidecar(out: Path, index: int) -> Path:
    return out / shard_name(index).replace(".tar", ".json")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings on the first run; a resume with other settings would mix two encodings."""
    path = out / CONFIG_NAME
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
        if changed:
            name, (old, new) = next(iter(changed.items()))
            raise ConfigError(
                f"--out {out} was written with {name}={old!r}, this run has {name}={new!r}: re-run with the "
                "directory's settings (encode_config.json) to resume, or choose a new --out"
            )
        return
    _write_json(path, settings)


class _ShardBuffer:
    """The encoded samples of one output shard until its last image is in."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.moments = MomentSums()
        self.max_label = -1
        self.ended: dict[str, Any] | None = None  # the reader's end-of-unit record
        self.pending = 0  # samples of this unit still waiting in the batch


def _write_shard(out: Path, index: int, buffer: _ShardBuffer, rank: int) -> None:
    import webdataset as wds

    skipped = buffer.ended["skipped"]
    record = {
        "shard": shard_name(index), "count": len(buffer.samples), "rank": rank,
        "moments": asdict(buffer.moments), "max_label": buffer.max_label,
        "skipped": {k: v for k, v in skipped.items() if v}, "skipped_examples": buffer.ended["examples"],
    }  # fmt: skip
    # Sidecar first, shard second (both atomic): a shard on disk always has its record.
    _write_json(_sidecar(out, index), record)

    def write(tmp: Path) -> None:
        with wds.TarWriter(str(tmp)) as sink:
            for sample in buffer.samples:
                sink.write(sample)

    write_atomically(out / shard_name(index), write)


def _finished(out: Path, index: int) -> bool:
    return (out / shard_name(index)).is_file() and _sidecar(out, index).is_file()


def _vae_record(path: str, weights: Any) -> dict[str, Any]:
    network = weights.network
    local = Path(path).expanduser()
    return {
        "path": str(local.resolve()) if local.exists() else path,
        "format": weights.source_format,
        "ema": weights.used_ema,
        "downsampling": network.downsampling,
        "network": {
            "ddconfig": network.ddconfig(),
            "embed_dim": network.embed_dim,
            "use_quant_conv": network.use_quant_conv,
            "use_post_quant_conv": network.use_post_quant_conv,
        },  # fmt: skip
        "recorded_scaling_factor": weights.scaling_factor,
        "recorded_shift_factor": weights.shift_factor,
    }


def write_index(out: Path, settings: dict[str, Any], plan: Any, vae: dict[str, Any]) -> dict[str, Any] | None:
    """Merge the shard records into ``latents.json`` once every shard exists; None while some are missing."""
    if not all(_finished(out, u.index) for u in plan.units):
        return None
    records = [json.loads(_sidecar(out, u.index).read_text()) for u in plan.units]
    moments, skipped, examples = MomentSums(), {}, []
    for r in records:
        moments = moments.merge(MomentSums(**r["moments"]))
        for kind, n in r["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
        examples += r["skipped_examples"][: max(0, 100 - len(examples))]
    stats = moments.stats()
    classes = plan.classes
    if plan.label_source == "cls":
        top = max(r["max_label"] for r in records)
        classes = [str(i) for i in range(top + 1)] if top >= 0 else None
    shards = [{"name": r["shard"], "count": r["count"]} for r in records]
    index = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        **settings,
        "crop": "shorter side resized to resolution (bicubic), center crop",
        "vae": vae, "classes": classes, "num_samples": sum(s["count"] for s in shards),
        "num_skipped": sum(skipped.values()), "skipped": skipped, "skipped_examples": examples,
        "shards": shards, "stats": stats,
        "scaling_factor": stats["scaling_factor"], "shift_factor": stats["shift_factor"],
    }  # fmt: skip
    down = vae["downsampling"]
    index["latent_shape"] = [
        vae["network"]["embed_dim"],
        settings["resolution"] // down,
        settings["resolution"] // down,
    ]
    _write_json(out / INDEX_NAME, index)
    return index


def encode_to_shards(
    vae_path: str,
    data: str,
    out: str | Path,
    resolution: int = 256,
    batch_size: int = 32,
    samples_per_shard: int = 1000,
    flip: bool = False,
    labels: str = "auto",
    precision: str = "fp32",
    storage_dtype: str = "float32",
    device: str | torch.device | None = None,
    num_workers: int = 4,
    min_size: int = 0,
    use_ema: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    on_shard_written: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Encode this process's share of ``data`` into latent shards under ``out`` (see module docstring).

    Args:
        vae_path: any VAE :func:`klvae.interop.formats.read_vae_weights` reads.
        data: image folder or webdataset shard spec.
        out: the latent directory.
        resolution: center-crop side R (a multiple of the VAE's downsampling factor).
        batch_size: images per forward pass.
        samples_per_shard: images per output shard (folder input).
        flip: also encode the horizontally flipped crop of every image.
        labels: see :func:`klvae.diffusability.sources.plan_units`.
        precision: ``fp32`` or ``bf16`` (autocast; weights stay fp32).
        storage_dtype: ``float32`` (exact) or ``float16`` (half the disk).
        device: default ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU.
        num_workers: image-decoding DataLoader workers (each reads whole shards).
        min_size: skip (and count) images whose shorter side is smaller.
        use_ema: for run checkpoints: None prefers EMA weights, False takes the live ones.
        rank, world_size: default from ``RANK``/``WORLD_SIZE`` (else 0, 1).
        progress: show a tqdm bar (images, img/s).
        on_shard_written: called with each shard index after it is written.

    Raises:
        ConfigError: bad settings, or ``out`` holds an encoding made with other settings.
        DataError: no usable images.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from klvae.data.sharding import distributed_info
    from klvae.data.workers import ignore_stop_signals
    from klvae.diffusability.sources import UnitReader, plan_units
    from klvae.errors import load_user_file
    from klvae.interop.formats import build_vae, read_vae_weights

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--storage-dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    for name, value in (("resolution", resolution), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    env_rank, env_world = distributed_info(None)
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()

    weights = load_user_file(f"VAE {vae_path}", lambda: read_vae_weights(vae_path, use_ema=use_ema))
    f = weights.network.downsampling
    if resolution % f:
        raise ConfigError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {f}")
    plan = plan_units(data, samples_per_shard, labels)
    data_record = str(Path(data).expanduser().resolve()) if Path(data).expanduser().exists() else data
    vae = _vae_record(vae_path, weights)
    settings = {"data": data_record, "resolution": resolution, "flip": flip, "labels": plan.label_source,
                "samples_per_shard": samples_per_shard, "dtype": storage_dtype, "precision": precision,
                "min_size": min_size, "vae_path": vae["path"], "vae_ema": vae["ema"]}  # fmt: skip
    _check_settings(out, settings)

    result = EncodeResult(rank, world_size)
    mine = [u for u in plan.units if u.index % world_size == rank]
    todo = [u for u in mine if not _finished(out, u.index)]
    result.shards_already_done = [u.index for u in mine if _finished(out, u.index)]
    if result.shards_already_done:
        log.info("rank %d: %d of its %d shard(s) already written, skipping them", rank,
                 len(result.shards_already_done), len(mine))  # fmt: skip
    timing = dict.fromkeys(("read", "to_device", "encode", "to_host", "write"), 0.0)
    if todo:
        model = build_vae(weights).to(device)
        to_store = STORAGE_DTYPES[storage_dtype]
        reader = UnitReader(plan, todo, resolution, min_size)
        workers = min(num_workers, len(todo))
        loader = DataLoader(reader, batch_size=None, num_workers=workers, collate_fn=_as_is,
                            worker_init_fn=ignore_stop_signals if workers else None)  # fmt: skip
        buffers: dict[int, _ShardBuffer] = {}
        batch: list[dict[str, Any]] = []
        total = sum(len(u.files) for u in todo) if plan.num_images is not None else None
        bar = tqdm(total=total, unit="img", desc=f"klvae-encode rank {rank}", disable=not progress,
                   position=rank if world_size > 1 else None)  # fmt: skip
        autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")

        @torch.inference_mode()
        def moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            t0 = time.perf_counter()
            x = torch.from_numpy(images).to(device, non_blocking=True)  # (B, 3, R, R) uint8
            x = x.float().mul_(1.0 / 127.5).sub_(1.0)  # [-1, 1], as klvae.data.transforms.to_model_batch
            _sync(device)
            t1 = time.perf_counter()
            with autocast:
                posterior = model.encode(x)  # moments (B, 2C, R/f, R/f)
            mean, std = posterior.mean.float(), posterior.std.float()
            _sync(device)
            t2 = time.perf_counter()
            mean, std = mean.cpu().numpy(), std.cpu().numpy()
            timing["to_device"] += t1 - t0
            timing["encode"] += t2 - t1
            timing["to_host"] += time.perf_counter() - t2
            return mean, std

        def flush() -> None:
            if not batch:
                return
            images = np.stack([item["image"] for item in batch]).transpose(0, 3, 1, 2)  # (B, 3, R, R) uint8
            mean, std = moments(images)
            if flip:
                mean_f, std_f = moments(np.ascontiguousarray(images[..., ::-1]))
            for i, item in enumerate(batch):
                buf = buffers[item["unit"]]
                buf.moments.add(mean[i : i + 1], std[i : i + 1])
                label = item["label"]
                buf.max_label = max(buf.max_label, -1 if label is None else label)
                meta = {"source": item["source"], "original_size": item["original_size"]}
                buf.samples.append(pack_sample(
                    sample_key(item["key"]), mean[i].astype(to_store), std[i].astype(to_store), meta,
                    (mean_f[i].astype(to_store), std_f[i].astype(to_store)) if flip else None, label,
                ))  # fmt: skip
                buf.pending -= 1
            bar.update(len(batch))
            batch.clear()
            for index in [i for i, b in buffers.items() if b.ended is not None and b.pending == 0]:
                finish(index)

        def finish(index: int) -> None:
            buf = buffers.pop(index)
            t0 = time.perf_counter()
            _write_shard(out, index, buf, rank)
            timing["write"] += time.perf_counter() - t0
            result.shards_written.append(index)
            result.images += len(buf.samples)
            result.skipped += sum(buf.ended["skipped"].values())
            if on_shard_written is not None:
                on_shard_written(index)

        wait = time.perf_counter()
        for item in loader:
            timing["read"] += time.perf_counter() - wait
            buf = buffers.setdefault(item["unit"], _ShardBuffer())
            if item.get("end"):
                buf.ended = item
                if buf.pending == 0:
                    finish(item["unit"])
            else:
                buf.pending += 1
                batch.append(item)
                if len(batch) == batch_size:
                    flush()
            wait = time.perf_counter()
        flush()
        bar.close()
        assert not buffers, f"unfinished shards {sorted(buffers)}"
    timing["total"] = time.perf_counter() - start
    timing["cpu_total"] = time.process_time() - cpu_start
    result.seconds = timing
    index = write_index(out, settings, plan, vae)
    result.index_written = index is not None
    if index is not None and index["num_samples"] == 0:
        raise DataError(
            f"no image of {data} could be encoded; first problems: {index['skipped_examples'][:3]}"
        )
    rate = result.images / timing["total"] if timing["total"] > 0 else 0.0
    log.info("rank %d: %d images in %d shard(s), %d skipped, %.1f img/s; seconds: %s", rank, result.images,
             len(result.shards_written), result.skipped, rate,
             ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))  # fmt: skip
    if index is not None:
        log.info("wrote %s: %d latents %s, scaling_factor %.5f, shift_factor %.5f", out / INDEX_NAME,
                 index["num_samples"], index["latent_shape"], index["scaling_factor"], index["shift_factor"])  # fmt: skip
    else:
        log.info("rank %d finished its shards; the index is written by the last process to finish", rank)
    return result


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    """The loader's collate: items stay as the reader made them (uint8 numpy crops, not tensors)."""
    return item


def _sync(device: torch.device) -> None:
    # Timing only: without it the asynchronous GPU work would be billed to whatever waits next.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klvae-encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "vae", help="any VAE klvae reads (run checkpoint, diffusers folder, LDM/SD/SDXL/SD3/FLUX file)"
    )
    p.add_argument("--data", required=True, help="image folder (recursive) or webdataset shards")
    p.add_argument("--out", required=True, help="the latent directory (created; re-run to resume)")
    p.add_argument("--resolution", type=int, default=256, help="resize shorter side + center crop (256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per output shard (folders)")
    p.add_argument("--flip", action="store_true", help="also store the latents of the h-flipped image")
    p.add_argument("--labels", default="auto", help="auto, none, folder (class subfolders) or cls (shards)")
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                   help="fp32 or bf16 (autocast; default bf16 on GPU)")  # fmt: skip
    p.add_argument("--storage-dtype", default="float32", help="float32 or float16 latents on disk")
    p.add_argument("--device", default=None, help="default cuda:$LOCAL_RANK, else cpu")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding processes")
    p.add_argument("--min-size", type=int, default=0, help="skip images with a smaller shorter side")
    p.add_argument("--no-ema", action="store_true", help="use live weights of a run checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_cli

    return run_cli("klvae-encode", _parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    encode_to_shards(
        args.vae, args.data, args.out, args.resolution, args.batch_size, args.samples_per_shard, args.flip,
        args.labels, args.precision, args.storage_dtype, args.device, args.num_workers, args.min_size,
        use_ema=False if args.no_ema else None, progress=not args.no_progress,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
