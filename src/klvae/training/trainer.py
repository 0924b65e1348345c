"""From the merged config's ``lightning:`` section and the CLI flags to a ``pl.Trainer``.

The ``lightning:`` section (every key optional)::

    lightning:
      trainer: {...}              # pl.Trainer keyword arguments (precision, log_every_n_steps, limit_val_batches,
                                  # accelerator/devices/num_nodes/strategy/sync_batchnorm, benchmark, ...)
      max_iterations: 250000      # stop after this many training iterations (model.iteration)
      val_every_n_iterations: 5000
      checkpoint: {every_n_iterations: 5000, last_every_n_iterations: 1000, save_top_k: 3,
                   monitor: val/rec_loss, mode: min}
      image_logger: {every_n_iterations: 1000, max_images: 8, dense_start: true, log_validation: true}
      callbacks: {name: {target: ..., params: {...}}}   # extra callbacks, LDM style

Every cadence counts training iterations, never ``trainer.global_step`` (which counts optimizer steps:
up to two per batch with the two optimizers).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment

from klvae.callbacks import (
    AtomicCheckpointIO,
    ImageLogger,
    IterationCheckpoint,
    IterationSeeder,
    MaxIterations,
    PreemptionHandler,
    ThroughputMonitor,
    TopKCheckpoint,
)
from klvae.data.stats import DataStatsCallback
from klvae.errors import ConfigError
from klvae.training.ddp import PerOptimizerDDPStrategy
from klvae.training.run_dir import RunDir
from klvae.util import instantiate_from_config, to_container

__all__ = ["LIGHTNING_KEYS", "TrainerPlan", "build_trainer", "parse_gpus", "plan_trainer"]

log = logging.getLogger(__name__)

LIGHTNING_KEYS = (
    "trainer",
    "max_iterations",
    "val_every_n_iterations",
    "checkpoint",
    "image_logger",
    "callbacks",
)
CHECKPOINT_DEFAULTS = {
    "every_n_iterations": 5000,
    "last_every_n_iterations": 1000,
    "save_top_k": 3,
    "monitor": "val/rec_loss",
    "mode": "min",
}
# Trainer arguments the CLI owns (or that manual optimization forbids; the model handles those itself).
_OWNED = ("callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing")
_MOVED_TO_MODEL = ("accumulate_grad_batches", "gradient_clip_val")


def parse_gpus(text: str) -> list[int] | int:
    """``"0,"`` -> ``[0]``, ``"0,1,2,3"`` -> ``[0, 1, 2, 3]``, ``"2"`` -> 2 (a count, as in Lightning)."""
    try:
        if "," in text:
            ids = [int(t) for t in text.split(",") if t.strip()]
            if ids and all(i >= 0 for i in ids) and len(set(ids)) == len(ids):
                return ids
        elif int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise ConfigError(f"--gpus {text!r}: give GPU indices with commas ('0,' or '0,1,2,3') or a count ('2')")


def _count(devices: Any) -> int:
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, int):
        return devices if devices > 0 else max(torch.cuda.device_count(), 1)
    if isinstance(devices, str) and devices != "auto":
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else max(int(devices), 1)
    return 1


@dataclass
class TrainerPlan:
    """Everything decided before any object is built (so the lr scaling can use the device count)."""

    trainer_kwargs: dict[str, Any]
    n_devices: int
    num_nodes: int
    max_iterations: int | None
    checkpoint: dict[str, Any]
    image_logger: dict[str, Any]
    callbacks: dict[str, Any] = field(default_factory=dict)


def plan_trainer(
    lightning: dict[str, Any], gpus: str | None, num_nodes: int | None, precision: str | None, accumulate: int
) -> TrainerPlan:
    """Validate the ``lightning:`` section and merge the CLI flags into Trainer keyword arguments.

    Raises:
        ConfigError: an unknown key in ``lightning:`` or ``lightning.trainer``, or an impossible combination.
    """
    lightning = to_container(lightning) or {}
    unknown = sorted(set(lightning) - set(LIGHTNING_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in lightning:; accepted keys are {list(LIGHTNING_KEYS)}")
    kw = dict(lightning.get("trainer") or {})
    accepted = set(inspect.signature(pl.Trainer).parameters) - set(_OWNED)
    bad = sorted(set(kw) - accepted - set(_MOVED_TO_MODEL))
    if bad:
        raise ConfigError(
            f"unknown or CLI-owned key(s) {bad} in lightning.trainer (see pl.Trainer's arguments)"
        )
    for key in _MOVED_TO_MODEL:
        if key in kw:  # LDM configs put these here; in manual optimization Lightning would raise
            raise ConfigError(
                f"lightning.trainer.{key} is not supported with manual optimization; "
                f"set model.params.{key} instead"
            )
    if gpus is not None:
        kw["accelerator"], kw["devices"] = "gpu", parse_gpus(gpus)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    if num_nodes is not None:
        kw["num_nodes"] = num_nodes
    n_devices, n_nodes = _count(kw["devices"]), int(kw.get("num_nodes", 1))
    on_gpu = kw["accelerator"] in ("gpu", "cuda") or (
        kw["accelerator"] == "auto" and torch.cuda.is_available()
    )
    if kw.get("sync_batchnorm") and not on_gpu:
        raise ConfigError(
            "lightning.trainer.sync_batchnorm needs GPUs (SyncBatchNorm does not run on CPU/gloo)"
        )
    if precision is not None:
        kw["precision"] = precision
    if "precision" not in kw:
        # bf16 autocast with fp32 master weights: fp16 overflows in this VAE.
        bf16 = on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        kw["precision"] = "bf16-mixed" if bf16 else "32-true"
    strategy = kw.get("strategy", "auto")
    if strategy in ("ddp", "ddp_find_unused_parameters_true") or (
        strategy == "auto" and n_devices * n_nodes > 1
    ):
        # The two updates step disjoint parameter sets: each averages only its own gradients, once per
        # update (klvae.training.ddp); no DDP wrapper, so no all-reduce of the idle module's zeros.
        kw["strategy"] = PerOptimizerDDPStrategy()

    max_iterations = lightning.get("max_iterations")
    if max_iterations is not None:
        kw.setdefault(
            "max_epochs", -1
        )  # the iteration limit decides; Lightning's default would be 1000 epochs
    elif "max_epochs" not in kw and "max_steps" not in kw:
        kw["max_epochs"] = -1
        log.info("no lightning.max_iterations: training runs until interrupted")
    val_every = lightning.get("val_every_n_iterations")
    if val_every is not None:
        if not isinstance(val_every, int) or val_every < 1:
            raise ConfigError(
                f"lightning.val_every_n_iterations must be a positive integer, got {val_every!r}"
            )
        kw["val_check_interval"] = val_every * accumulate  # Lightning counts batches here
        kw["check_val_every_n_epoch"] = None
    checkpoint = {**CHECKPOINT_DEFAULTS, **(lightning.get("checkpoint") or {})}
    bad = sorted(set(checkpoint) - set(CHECKPOINT_DEFAULTS))
    if bad:
        raise ConfigError(
            f"unknown key(s) {bad} in lightning.checkpoint; accepted: {sorted(CHECKPOINT_DEFAULTS)}"
        )
    images = dict(lightning.get("image_logger") or {})
    accepted = set(inspect.signature(ImageLogger).parameters) - {"image_dir"}
    bad = sorted(set(images) - accepted)
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in lightning.image_logger; accepted: {sorted(accepted)}")
    return TrainerPlan(
        trainer_kwargs=kw,
        n_devices=n_devices,
        num_nodes=n_nodes,
        max_iterations=max_iterations,
        checkpoint=checkpoint,
        image_logger=images,
        callbacks=dict(lightning.get("callbacks") or {}),
    )


def build_trainer(
    plan: TrainerPlan, run: RunDir, logger: Any, seed: int
) -> tuple[pl.Trainer, IterationCheckpoint]:
    """The Trainer with klvae's callbacks (all counting iterations), atomic checkpoint IO and the logger."""
    ck = plan.checkpoint
    iteration_ckpt = IterationCheckpoint(
        run.checkpoints,
        every_n_iterations=ck["every_n_iterations"],
        last_every_n_iterations=ck["last_every_n_iterations"],
    )
    callbacks: list[pl.Callback] = [
        IterationSeeder(seed),
        iteration_ckpt,
        PreemptionHandler(iteration_ckpt),
        ImageLogger(run.images, **plan.image_logger),
        ThroughputMonitor(),
        DataStatsCallback(),  # pops batch["_skipped"] before the model sees it; logs data/skipped_*
    ]
    keep_top_k = bool(ck["save_top_k"] and ck["monitor"])
    if keep_top_k:
        callbacks.append(
            TopKCheckpoint(
                dirpath=run.checkpoints,
                filename="best-it{iteration:08d}-"
                + ck["monitor"].replace("/", "_")
                + "{"
                + ck["monitor"]
                + ":.4f}",
                auto_insert_metric_name=False,
                monitor=ck["monitor"],
                mode=ck["mode"],
                save_top_k=ck["save_top_k"],
                save_last=False,  # IterationCheckpoint owns last.ckpt
            )
        )
    if plan.max_iterations is not None:
        callbacks.append(MaxIterations(plan.max_iterations))
    for name, block in plan.callbacks.items():
        try:
            callbacks.append(instantiate_from_config(block))
        except ConfigError as e:
            raise ConfigError(f"lightning.callbacks.{name}: {e}") from e
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # PreemptionHandler checkpoints and requeues
    return (
        pl.Trainer(
            **plan.trainer_kwargs,
            default_root_dir=str(run.root),
            # Without a top-k callback Lightning would add its own ModelCheckpoint, writing a second set of
            # checkpoints under the logger's folder; IterationCheckpoint owns last.ckpt and iter_*.ckpt.
            enable_checkpointing=keep_top_k,
            logger=logger,
            callbacks=callbacks,
            plugins=plugins,
        ),
        iteration_ckpt,
    )
