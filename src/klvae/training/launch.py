"""What ``main.py`` does once the flags are parsed: merge configs, set up the run, build, fit, evaluate."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.data.buckets import BucketConfig
from klvae.data.phases import PhaseSchedule
from klvae.errors import ConfigError
from klvae.io.checkpoints import remove_stale_temp_files
from klvae.io.files import load_torch_file
from klvae.perf.options import Optimizations
from klvae.training.run_dir import (
    RunDir,
    config_diff,
    create_run_dir,
    load_run_config,
    resolve_resume,
    save_config,
    slurm_job_tag,
    timestamp,
)
from klvae.training.trainer import TrainerPlan, build_trainer, parse_gpus, plan_trainer
from klvae.util import instantiate_from_config, load_config, to_container

__all__ = ["Job", "prepare", "run", "scale_learning_rate"]

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("model", "data", "lightning")


@dataclass
class Job:
    """A fully built run, ready to fit."""

    args: argparse.Namespace
    config: DictConfig
    run: RunDir
    ckpt_path: Path | None
    model: pl.LightningModule
    data: pl.LightningDataModule
    trainer: pl.Trainer
    checkpointer: Any


def _positive_number(key: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0; else a ConfigError naming ``key``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{key} must be a number > 0 (e.g. 4.5e-6), got {value!r}")
    return float(value)


def scale_learning_rate(config: DictConfig, plan: TrainerPlan, scale: bool) -> float:
    """Set ``model.params.learning_rate`` from ``model.base_learning_rate`` (LDM's rule) and return it.

    Raises:
        ConfigError: a learning rate that is not a number > 0 (Adam would reject it at the start of fit).
    """
    model = config.model
    base_lr = model.get("base_learning_rate")
    if base_lr is None:
        lr = _positive_number(
            "model.params.learning_rate", model.get("params", {}).get("learning_rate", 4.5e-6)
        )
        rank_zero_only(log.info)(f"no model.base_learning_rate: using model.params.learning_rate = {lr:.2e}")
        return lr
    base_lr = _positive_number("model.base_learning_rate", base_lr)
    accumulate = int(model.get("params", {}).get("accumulate_grad_batches", 1))
    batch_size = config.get("data", {}).get("params", {}).get("batch_size")
    if scale:
        if not isinstance(batch_size, int):
            raise ConfigError(f"--scale_lr needs an integer data.params.batch_size, got {batch_size!r}")
        lr = accumulate * plan.n_devices * plan.num_nodes * batch_size * base_lr
        rank_zero_only(log.info)(
            f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {plan.n_devices} "
            f"(num_gpus) * {plan.num_nodes} (num_nodes) * {batch_size} (batchsize) * {base_lr:.2e} (base_lr)"
        )
    else:
        lr = float(base_lr)
        rank_zero_only(log.info)(f"Setting learning rate to {lr:.2e} (--no-scale_lr)")
    OmegaConf.update(config, "model.params.learning_rate", float(lr), force_add=True)
    return float(lr)


def _merge_configs(args: argparse.Namespace) -> tuple[DictConfig, RunDir | None, Path | None]:
    run, ckpt = None, None
    if args.resume:
        run, ckpt = resolve_resume(args.resume)
    elif slurm_job_tag() and not args.name:
        # A requeued SLURM job re-runs the same command: find the run it started before and continue it.
        stem = Path(args.base[0]).stem if args.base else ""
        candidate = RunDir(Path(args.logdir) / f"{slurm_job_tag()}_{stem}")
        if candidate.last_ckpt.is_file():
            run, ckpt = candidate, candidate.last_ckpt
            rank_zero_only(log.info)(f"SLURM requeue: resuming {run.root}")
    if not args.base and run is None:
        raise ConfigError("no config given: pass -b/--base CONFIG.yaml (or -r RUN_DIR to resume a run)")
    if run is None:
        return load_config(args.base, args.overrides), None, ckpt
    previous = load_run_config(run)
    # Overrides apply to the run's config (so they may index its lists); a -b file that switches a target
    # replaces that block.
    merged = load_config(args.base, args.overrides, base=previous)
    diff = config_diff(previous, merged)
    if diff:
        rank_zero_only(log.info)(
            f"resuming {run.root} with a config that differs from the run's:\n  " + "\n  ".join(diff)
        )
    return merged, run, ckpt


def _build(section: str, block: Any) -> Any:
    # Constructors reject bad argument values with ValueError (the Python convention): a config error here.
    try:
        return instantiate_from_config(block)
    except ValueError as e:
        raise ConfigError(f"{section}: {e}") from e


def _side_multiple(model: Any) -> tuple[int, str] | None:
    """What every image side must be a multiple of for ``model``, and why: the encoder's downsampling factor
    (8 for kl-f8), times the latent patch size of a VAE that patchifies its latents (FLUX.2: 2). The
    built network's: a fine-tune's ``ddconfig: null`` is read from its checkpoint."""
    from klvae.modules.vae import KLAutoencoder

    if not isinstance(model, KLAutoencoder):
        return None
    network = model.network
    factor, why = network.downsampling, f"downsampling factor {network.downsampling}"
    if network.latent_batch_norm is not None:
        patch = max(network.latent_batch_norm.patch_size)
        factor, why = factor * patch, f"downsampling factor {network.downsampling} × latent patch {patch}"
    return factor, why


def _check_data_fits_model(model: Any, data: Any) -> None:
    """Every image side the data can produce (the crop, each phase's, every bucket's) must be a multiple of
    the autoencoder's :func:`_side_multiple`, else the decoder's output does not match the input and the
    first step fails deep inside the loss."""
    required = _side_multiple(model)
    if required is None:
        return
    factor, why = required
    transform = getattr(data, "val_transform", None)
    size = getattr(transform, "size", None)
    if isinstance(size, int) and size % factor:
        raise ConfigError(
            f"data.params.size={size} is not a multiple of the autoencoder's {why}; "
            f"use e.g. {size - size % factor or factor}"
        )
    buckets, phases = getattr(data, "buckets", None), getattr(data, "phases", None)
    if isinstance(buckets, BucketConfig) and buckets.step % factor:
        raise ConfigError(
            f"data.params.buckets.step={buckets.step} is not a multiple of the autoencoder's {why}: bucket "
            f"sides would not be; use e.g. {max(factor, buckets.step // factor * factor)}"
        )
    for i, phase in enumerate(phases if isinstance(phases, PhaseSchedule) else ()):
        if buckets is None and phase.size % factor:
            raise ConfigError(
                f"data.params.phases[{i}].size={phase.size} is not a multiple of the autoencoder's {why}; "
                f"use e.g. {phase.size - phase.size % factor or factor}"
            )


def _warn_if_phases_do_not_fit_run(model: Any, data: Any, max_iterations: int | None) -> None:
    """Warn when a resolution phase starts after the run ends (a short trial run may mean it), and when
    compiled regions that will see many input shapes (buckets, phases) are not compiled dynamic (they
    would end up running eager)."""
    phases = getattr(data, "phases", None)
    if not isinstance(phases, PhaseSchedule):
        return
    late = [
        i for i in range(1, len(phases)) if max_iterations is not None and phases.starts[i] >= max_iterations
    ]
    if late:
        rank_zero_only(log.warning)(
            f"data.params.phases[{late[0]}] starts at iteration {phases.starts[late[0]]}, not before "
            f"lightning.max_iterations ({max_iterations}): this run ends before it"
        )
    opts = getattr(model, "optimizations", None)
    shapes = data.image_shapes() if hasattr(data, "image_shapes") else set()
    compiled = isinstance(opts, Optimizations) and opts.compile_on(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if compiled and opts.compile_dynamic is not True and len(shapes) > 1:
        rank_zero_only(log.warning)(
            f"the data yields {len(shapes)} image shapes (buckets/phases) and torch.compile is on without "
            "compile_dynamic: graphs per shape reach dynamo's recompile limit, after which the regions run "
            "eager; set model.params.optimizations.compile_dynamic: true"
        )


def _check_resume_fits_model(model: pl.LightningModule, ckpt: Path) -> None:
    """An incompatible resume (another ddconfig, another model) fails here in one line, not in Lightning."""
    state = load_torch_file(ckpt, mmap=True).get("state_dict", {})
    own = model.state_dict()
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state] if getattr(model, "strict_loading", True) else []
    unexpected = [k for k in state if k not in own] if getattr(model, "strict_loading", True) else []
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es) (first: {k} {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(own[k].shape)} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} weight(s) missing from the checkpoint (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weight(s) (first: {unexpected[0]})")
        raise ConfigError(
            f"--resume {ckpt}: the checkpoint does not fit the model the config builds: {'; '.join(parts)}. "
            "Resume with the run's own config (-r RUN_DIR) or start a new run that warm-starts from it "
            "(model.params.ckpt_path)"
        )


def prepare(args: argparse.Namespace) -> Job:
    """Merge configs, build model and data, then create or reopen the run directory, logger and Trainer.

    The run directory is created only once the model and the data built (and the data found its files):
    a failed start leaves nothing behind.

    Raises:
        ConfigError: any problem with the flags or the config, with a one-line message.
        DataError: the data cannot be used (missing folder, no images).
    """
    if args.gpus is not None:
        parse_gpus(args.gpus)  # a malformed value first, then whether there are GPUs at all
    if args.gpus is not None and not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus {args.gpus!r}: no CUDA GPU is visible on this machine (torch.cuda.is_available() is False); "
            "drop --gpus to train on the CPU, or check CUDA_VISIBLE_DEVICES and the driver"
        )
    logdir = Path(args.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ConfigError(
            f"--logdir {args.logdir!r} is an existing file; give a folder for the run directories"
        )
    config, run, ckpt = _merge_configs(args)
    to_container(config)  # a `???` left unset or a broken ${...} fails now, naming its full key
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}; expected {list(TOP_LEVEL_KEYS)}")
    for key in ("model", "data"):
        if key not in config:
            raise ConfigError(f"the config has no '{key}:' section (merged from {args.base})")
    if not args.train and ckpt is None:
        raise ConfigError("without -t/--train there is nothing to do unless -r/--resume names a checkpoint")
    if not args.train and args.no_test:
        raise ConfigError(
            "nothing to do: without -t, -r only evaluates the checkpoint and --no-test skips that; "
            "add -t to continue training"
        )
    if torch.cuda.is_available():  # TF32 matmuls/convs: ~free speed on Ampere+, well within bf16 noise
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    accumulate = config.model.get("params", {}).get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError(f"model.params.accumulate_grad_batches must be an int >= 1, got {accumulate!r}")
    plan = plan_trainer(config.get("lightning", {}), args.gpus, args.num_nodes, args.precision, accumulate)
    if plan.max_iterations is not None and (
        not isinstance(plan.max_iterations, int) or isinstance(plan.max_iterations, bool)
    ):
        raise ConfigError(f"lightning.max_iterations must be an integer, got {plan.max_iterations!r}")
    if plan.trainer_kwargs.get("enable_progress_bar", True) and "progress_bar" not in plan.callbacks:
        plan.callbacks["progress_bar"] = {
            "target": "klvae.callbacks.progress.IterationProgressBar",
            "params": {"max_iterations": plan.max_iterations},
        }
    pl.seed_everything(args.seed, workers=True, verbose=False)
    scale_learning_rate(config, plan, args.scale_lr)

    model = _build("model", config.model)
    data = _build("data", config.data)
    _check_data_fits_model(model, data)
    _warn_if_phases_do_not_fit_run(model, data, plan.max_iterations)
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit" if args.train else "validate")  # missing folders and shards fail now
    if (
        not args.train
        and isinstance(data, pl.LightningDataModule)
        and not is_overridden("test_dataloader", data)
    ) and not data.val_dataloader():
        raise ConfigError(
            "nothing to do: without -t, -r only evaluates the checkpoint, but the data config has no "
            "validation split; add -t to continue training, or configure validation data"
        )
    if ckpt is not None:
        _check_resume_fits_model(model, ckpt)

    now = timestamp()
    rank0 = rank_zero_only.rank == 0
    created = None
    if run is None or args.name:  # a new run directory (possibly warm-started from --resume's checkpoint)
        name = args.name or (Path(args.base[0]).stem if args.base else "run")
        run = create_run_dir(args.logdir, name, now, create=rank0)
        created = run.root if rank0 and not os.environ.get("LOCAL_RANK") else None
    try:
        if rank0:
            run.make()
            remove_stale_temp_files(run.checkpoints)  # left by a writer killed mid-save (SIGKILL, OOM)
            saved = save_config(run, config, now)
            rank_zero_only(log.info)(f"run directory {run.root} (config: {saved.name})")

        from klvae.training.loggers import build_logger

        logger = build_logger(args.logger, run, run.root.name, args.project, launch=now)
        try:
            trainer, checkpointer = build_trainer(plan, run, logger, args.seed)
        except (MisconfigurationException, ValueError) as e:  # Lightning's and the callbacks' argument checks
            raise ConfigError(f"lightning: {' '.join(str(e).split())}") from e
    except BaseException:
        if created is not None:  # nothing ran yet: a failed start leaves no directory behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    return Job(args, config, run, ckpt, model, data, trainer, checkpointer)


def _evaluate(job: Job, ckpt_path: str | None) -> None:
    model, data, trainer = job.model, job.data, job.trainer
    if is_overridden("test_step", model) and is_overridden("test_dataloader", data):
        trainer.test(model, datamodule=data, ckpt_path=ckpt_path)
    else:
        rank_zero_only(log.info)("no test_step/test split: evaluating on the validation split")
        trainer.validate(model, datamodule=data, ckpt_path=ckpt_path)


def _preemption(trainer: pl.Trainer) -> Any:
    from klvae.callbacks.preemption import PreemptionHandler

    return next((c for c in trainer.callbacks if isinstance(c, PreemptionHandler)), None)


def run(job: Job) -> int:
    """Fit (``-t``) and evaluate (unless ``--no-test``); returns the exit status.

    After a stop signal: ``128 + signal`` (0 after a SLURM requeue), see ``PreemptionHandler``.
    """
    trainer, args = job.trainer, job.args
    stopped_by_signal = False
    try:
        if args.train:
            trainer.fit(
                job.model, datamodule=job.data, ckpt_path=str(job.ckpt_path) if job.ckpt_path else None
            )
        handler = _preemption(trainer)
        stopped_by_signal = handler is not None and handler.received is not None
        if not args.no_test and not trainer.interrupted and not stopped_by_signal:
            if not args.train:
                rank_zero_only(log.info)(
                    f"evaluating {job.ckpt_path} (no -t: nothing is trained; add -t to continue training)"
                )
            _evaluate(job, None if args.train else str(job.ckpt_path))
    except SIGTERMException:
        # PreemptionHandler wrote last.ckpt at the end of the batch; a clean exit lets SLURM requeue.
        stopped_by_signal = True
    finally:
        _shutdown_loader_workers(trainer)
        _finish_wandb(trainer)
    handler = _preemption(trainer)
    if stopped_by_signal:
        rank_zero_only(log.info)(f"stopped by signal; resume with: python main.py -t -r {job.run.root}")
        code = handler.exit_code if handler is not None else None
        return 128 + 15 if code is None else code
    if args.train:
        from klvae.training.summary import export_at_end, training_summary

        exported = export_at_end(job, args.export) if getattr(args, "export", None) else None
        if trainer.is_global_zero:
            for line in training_summary(job, exported):
                log.info(line)
    return 0


def _shutdown_loader_workers(trainer: pl.Trainer) -> None:
    """Stop persistent DataLoader workers through the DataLoader's own protocol.

    Workers ignore SIGTERM (so a scheduler's signal to the process group reaches only the main process);
    left to Python's exit, multiprocessing would SIGTERM them and then wait forever.
    """
    loaders = []
    for attr in ("train_dataloader", "val_dataloaders", "test_dataloaders"):
        try:
            value = getattr(trainer, attr, None)
        except Exception:  # a loop without loaders
            continue
        loaders.extend(value if isinstance(value, list | tuple) else [value])
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def _finish_wandb(trainer: pl.Trainer) -> None:
    from pytorch_lightning.loggers import WandbLogger

    if trainer.is_global_zero and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
