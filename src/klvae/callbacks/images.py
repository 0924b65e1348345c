"""Reconstruction grids: ``pl_module.log_images(batch)`` on an iteration schedule, to PNG and to W&B."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger

from klvae.callbacks.checkpointing import iteration_of
from klvae.data.folder import list_images

__all__ = ["ImageLogger", "make_grid", "image_schedule_hit"]

log = logging.getLogger(__name__)


def image_schedule_hit(iteration: int, every_n: int, dense_start: bool = True) -> bool:
    """True at iterations ``1, 2, 4, 8, ...`` below ``every_n`` (if ``dense_start``) and every ``every_n``."""
    if iteration <= 0 or every_n <= 0:
        return False
    if iteration % every_n == 0:
        return True
    return dense_start and iteration < every_n and (iteration & (iteration - 1)) == 0


def make_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """Tile images into one uint8 picture.

    Args:
        images: (N, 3, H, W) float, roughly in [-1, 1] (clamped).
        nrow: images per row.

    Returns:
        (rows·(H+2), nrow·(W+2), 3) uint8 array, 2-pixel gaps.
    """
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2), nrow * (w + 2), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


class ImageLogger(Callback):
    """Logs inputs | reconstructions | samples from ``pl_module.log_images(batch)``.

    Writes ``<image_dir>/<split>/<key>_it<iteration>.png`` (one row per key, the keys side by side as
    columns of one grid ``<split>/grid_it<iteration>.png``) and, with a ``WandbLogger``, ``wandb.Image``s
    under ``<split>/<key>``. Training images follow the schedule of :func:`image_schedule_hit`;
    validation images are logged for the first validation batch of every validation run.

    Args:
        image_dir: the run's ``images/`` directory.
        every_n_iterations: training-image cadence in training iterations; ``0`` disables training images.
        max_images: images per key (the ``N`` passed to ``log_images``).
        dense_start: also log at iterations 1, 2, 4, 8, ... (early progress is the interesting part).
        log_validation: log the first validation batch of each validation run.
        val_image_dir: a folder of your own images (searched recursively), reconstructed at their native
            resolution (cropped to multiples of 8) at the end of every validation run, one image at a time,
            and written as ``<image_dir>/val_folder/<name>_it<iteration>.png`` (input | reconstruction)
            and to W&B under ``val_folder/<name>``. None: off.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        every_n_iterations: int = 1000,
        max_images: int = 8,
        dense_start: bool = True,
        log_validation: bool = True,
        val_image_dir: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(every_n_iterations, int) or every_n_iterations < 0:
            raise ValueError(
                f"image every_n_iterations must be a non-negative integer, got {every_n_iterations!r}"
            )
        if not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"image max_images must be a positive integer, got {max_images!r}")
        self.image_dir = Path(image_dir)
        self.every_n_iterations = every_n_iterations
        self.max_images = max_images
        self.dense_start = dense_start
        self.log_validation = log_validation
        self.val_images = None if val_image_dir is None else list_images(val_image_dir)  # fails if empty
        self._last_logged: int | None = None
        self.written: list[Path] = []

    @torch.no_grad()
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str) -> None:
        if not trainer.is_global_zero:  # only rank 0 writes; the others need not spend the forward passes
            return
        was_training = pl_module.training
        pl_module.eval()  # deterministic reconstructions, no dropout; the model decides what eval means
        try:
            images = pl_module.log_images(batch, N=self.max_images)
        finally:
            pl_module.train(was_training)
        self._write(trainer, pl_module, images, split)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: dict, split: str) -> None:
        it = iteration_of(pl_module)
        tensors = {k: v for k, v in images.items() if isinstance(v, torch.Tensor) and v.dim() == 4}
        if not tensors:
            return
        out = self.image_dir / split
        out.mkdir(parents=True, exist_ok=True)
        n = min(v.shape[0] for v in tensors.values())
        # One column per key (inputs | reconstructions | samples), one row per image.
        stacked = torch.stack([tensors[k][:n] for k in tensors], dim=1).flatten(0, 1)
        grid = make_grid(stacked, nrow=len(tensors))
        path = out / f"grid_it{it:08d}.png"
        Image.fromarray(grid).save(path)
        self.written.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                keys = list(tensors)
                logger.log_image(
                    key=f"{split}/images",
                    images=[make_grid(tensors[k][:n], nrow=n) for k in keys],
                    caption=[f"{k} (iteration {it})" for k in keys],
                    step=trainer.global_step,
                )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        it = iteration_of(pl_module)
        if it == self._last_logged or not image_schedule_hit(it, self.every_n_iterations, self.dense_start):
            return
        self._last_logged = it
        self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.log_validation and batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, pl_module, batch, "val")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.val_images is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        it = iteration_of(pl_module)
        out = self.image_dir / "val_folder"
        out.mkdir(parents=True, exist_ok=True)
        was_training = pl_module.training
        pl_module.eval()
        try:
            for path in self.val_images:
                x = _native_image(path).to(pl_module.device)  # (1, 3, H, W), H and W multiples of 8
                with torch.no_grad():
                    images = pl_module.log_images({getattr(pl_module, "image_key", "image"): x}, N=1)
                pair = make_grid(torch.cat([images["inputs"], images["reconstructions"]]), nrow=2)
                Image.fromarray(pair).save(out / f"{path.stem}_it{it:08d}.png")
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_image(
                            key=f"val_folder/{path.stem}", images=[pair], step=trainer.global_step,
                            caption=[f"input | reconstruction (iteration {it})"],
                        )  # fmt: skip
        finally:
            pl_module.train(was_training)


def _native_image(path: Path) -> torch.Tensor:
    """An image file as (1, 3, H, W) in [-1, 1], centre-cropped to multiples of 8 (f = 8), not resized."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    h, w = rgb.shape[0] // 8 * 8, rgb.shape[1] // 8 * 8
    if h == 0 or w == 0:
        raise ValueError(f"validation image {path} is smaller than 8 px")
    top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
    crop = torch.from_numpy(rgb[top : top + h, left : left + w].copy()).permute(2, 0, 1)
    return crop[None].float() / 127.5 - 1.0
