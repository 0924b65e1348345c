"""What ``main.py -t`` reports when training ends, and the optional ``--export`` of the result.

The summary names everything a user looks for next: how far the run got, the best checkpoint and its
metric, where the image grids and the W&B files are, the ``wandb sync`` command for an offline run, and
the export command (or the exported files with ``--export``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from klvae.errors import ConfigError

__all__ = ["EXPORT_FORMATS", "export_at_end", "training_summary"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("diffusers", "ldm")
LATENT_STATS_IMAGES = 512  # validation images for the diffusers scaling_factor (a std: a few hundred suffice)


def _best(job: Any) -> tuple[Path | None, str | None, float | None]:
    from klvae.callbacks.checkpointing import TopKCheckpoint

    for cb in job.trainer.callbacks:
        if isinstance(cb, TopKCheckpoint) and cb.best_model_path and Path(cb.best_model_path).is_file():
            score = cb.best_model_score
            return Path(cb.best_model_path), cb.monitor, None if score is None else float(score)
    return None, None, None


def _source_checkpoint(job: Any) -> Path:
    best, _, _ = _best(job)
    return best or job.run.last_ckpt


def export_at_end(job: Any, fmt: str) -> Path | None:
    """Export the best checkpoint (else ``last.ckpt``) to ``<run>/export/`` in ``fmt``; rank 0 only.

    ``diffusers`` needs the latent ``scaling_factor`` (and gets ``shift_factor`` too): both are measured on up to
    ``LATENT_STATS_IMAGES`` validation images (posterior samples, as ``klvae-latent-stats``).
    """
    if not job.trainer.is_global_zero:
        return None
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--export {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    from klvae.interop.formats import read_vae_weights, write_vae

    source = _source_checkpoint(job)
    if not source.is_file():
        log.warning("--export: no checkpoint to export (training wrote none)")
        return None
    weights = read_vae_weights(source)
    out_dir = job.run.root / "export"
    if fmt == "ldm":
        return write_vae(weights, out_dir / "vae.safetensors")
    if weights.network.latent_batch_norm is not None:  # FLUX.2-shaped: its BatchNorm normalises, no factors
        log.warning(
            "--export diffusers: the latent BatchNorm keeps the statistics the run has (a FLUX.2 fine-tune: the "
            "published ones). A new VAE needs its own: klvae-latent-stats, then klvae-export --batch-norm-stats"
        )
        return write_vae(weights, out_dir / "diffusers", "diffusers")
    factors = _latent_factors(job, source)
    if factors is None:
        log.warning(
            "--export diffusers: no validation data to measure the latent scaling_factor; export later with "
            "klvae-latent-stats + klvae-export --latent-stats"
        )
        return None
    return write_vae(weights, out_dir / "diffusers", "diffusers", *factors)


def _latent_factors(job: Any, source: Path) -> tuple[float, float] | None:
    """(scaling_factor, shift_factor) of the validation latents, as ``klvae-latent-stats`` measures them."""
    from klvae.evaluation.latent_stats import compute_latent_stats
    from klvae.inference import InferenceVAE

    loader = job.data.val_dataloader()
    if not loader:
        return None
    key = getattr(job.model, "image_key", "image")
    vae = InferenceVAE.from_pretrained(source)

    def images():
        seen = 0
        for batch in loader:
            x = batch[key][: LATENT_STATS_IMAGES - seen]
            seen += x.shape[0]
            yield x
            if seen >= LATENT_STATS_IMAGES:
                return

    stats = compute_latent_stats(vae, images())
    log.info(
        "latent scaling_factor %.5f, shift_factor %.5f from %d validation images",
        stats["scaling_factor"], stats["shift_factor"], stats["num_images"],
    )  # fmt: skip
    return float(stats["scaling_factor"]), float(stats["shift_factor"])


def training_summary(job: Any, exported: Path | None) -> list[str]:
    """The lines printed when training ends."""
    from pytorch_lightning.loggers import WandbLogger

    run = job.run
    lines = [f"training done: {getattr(job.model, 'iteration', '?')} iterations; run directory {run.root}"]
    best, monitor, score = _best(job)
    if best is not None:
        lines.append(
            f"  best checkpoint: {best} ({monitor} = {score:.4f})" if score is not None else f"  best: {best}"
        )
    lines.append(f"  last checkpoint: {run.last_ckpt}")
    lines.append(f"  image grids:     {run.images}")
    if any(isinstance(lg, WandbLogger) for lg in job.trainer.loggers):
        wandb_dir = run.root / "wandb"
        offline = sorted(wandb_dir.glob("offline-run-*")) if wandb_dir.is_dir() else []
        lines.append(f"  W&B files:       {wandb_dir}")
        if offline:
            lines.append(f"  upload to W&B:   wandb sync {offline[-1]}")
    source = best or run.last_ckpt
    if exported is not None:
        lines.append(f"  exported:        {exported}")
    else:
        lines.append(
            f"  export:          klvae-latent-stats {source} --data VAL_IMAGES --out {run.root}/latent_stats.json && "
            f"klvae-export {source} --format diffusers --out {run.root}/export/diffusers "
            f"--latent-stats {run.root}/latent_stats.json"
        )
    return lines
