"""What ``main.py`` does once the flags are parsed: merge configs, set up the run, build, fit, evaluate."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.run_dir import (
    RunDir,
    config_diff,
    create_run_dir,
    load_run_config,
    resolve_resume,
    save_config,
    slurm_job_tag,
    timestamp,
)
from klvae.trainer_setup import TrainerPlan, build_trainer, plan_trainer
from klvae.util import ConfigError, instantiate_from_config, load_config

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


def scale_learning_rate(config: DictConfig, plan: TrainerPlan, scale: bool) -> float:
    """Set ``model.params.learning_rate`` from ``model.base_learning_rate`` (LDM's rule) and return it."""
    model = config.model
    base_lr = model.get("base_learning_rate")
    if base_lr is None:
        lr = model.get("params", {}).get("learning_rate", 4.5e-6)
        rank_zero_only(log.info)(f"no model.base_learning_rate: using model.params.learning_rate = {lr:.2e}")
        return float(lr)
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


def prepare(args: argparse.Namespace) -> Job:
    """Merge configs, create or reopen the run directory, build model, data, logger and Trainer.

    Raises:
        ConfigError: any problem with the flags or the config, with a one-line message.
    """
    config, run, ckpt = _merge_configs(args)
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {unknown}; expected {list(TOP_LEVEL_KEYS)}")
    for key in ("model", "data"):
        if key not in config:
            raise ConfigError(f"the config has no '{key}:' section (merged from {args.base})")
    if not args.train and ckpt is None:
        raise ConfigError("without -t/--train there is nothing to do unless -r/--resume names a checkpoint")
    if torch.cuda.is_available():  # TF32 matmuls/convs: ~free speed on Ampere+, well within bf16 noise
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    accumulate = int(config.model.get("params", {}).get("accumulate_grad_batches", 1))
    plan = plan_trainer(config.get("lightning", {}), args.gpus, args.num_nodes, args.precision, accumulate)
    now = timestamp()
    if run is None or args.name:  # a new run directory (possibly warm-started from --resume's checkpoint)
        name = args.name or (Path(args.base[0]).stem if args.base else "run")
        run = create_run_dir(args.logdir, name, now)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    scale_learning_rate(config, plan, args.scale_lr)
    if rank_zero_only.rank == 0:
        run.make()
        saved = save_config(run, config, now)
        rank_zero_only(log.info)(f"run directory {run.root} (config: {saved.name})")

    model = instantiate_from_config(config.model)
    data = instantiate_from_config(config.data)
    from klvae.loggers import build_logger

    logger = build_logger(args.logger, run, run.root.name, args.project, launch=now)
    trainer, checkpointer = build_trainer(plan, run, logger, args.seed)
    return Job(args, config, run, ckpt, model, data, trainer, checkpointer)


def _evaluate(job: Job, ckpt_path: str | None) -> None:
    model, data, trainer = job.model, job.data, job.trainer
    if is_overridden("test_step", model) and is_overridden("test_dataloader", data):
        trainer.test(model, datamodule=data, ckpt_path=ckpt_path)
    else:
        rank_zero_only(log.info)("no test_step/test split: evaluating on the validation split")
        trainer.validate(model, datamodule=data, ckpt_path=ckpt_path)


def run(job: Job) -> int:
    """Fit (``-t``) and evaluate (unless ``--no-test``); returns the exit status."""
    trainer, args = job.trainer, job.args
    stopped_by_signal = False
    try:
        if args.train:
            trainer.fit(
                job.model, datamodule=job.data, ckpt_path=str(job.ckpt_path) if job.ckpt_path else None
            )
        if not args.no_test and not trainer.interrupted:
            _evaluate(job, None if args.train else str(job.ckpt_path))
    except SIGTERMException:
        # PreemptionHandler wrote last.ckpt at the end of the batch; a clean exit lets SLURM requeue.
        stopped_by_signal = True
    finally:
        _finish_wandb(trainer)
    if stopped_by_signal:
        rank_zero_only(log.info)(f"stopped by signal; resume with: python main.py -t -r {job.run.root}")
    elif args.train:
        rank_zero_only(log.info)(
            f"done: {getattr(job.model, 'iteration', '?')} iterations; checkpoints in {job.run.checkpoints}"
        )
    return 0


def _finish_wandb(trainer: pl.Trainer) -> None:
    from pytorch_lightning.loggers import WandbLogger

    if trainer.is_global_zero and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
