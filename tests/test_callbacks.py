"""Callbacks and helpers of the training CLI: atomic checkpoints, image schedule and grids, W&B offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from klvae.callbacks import image_schedule_hit, make_grid
from klvae.io.checkpoints import atomic_torch_save, load_checkpoint
from klvae.training.cli import main
from klvae.training.loggers import wandb_mode
from klvae.training.run_dir import config_diff
from tests.cli_helpers import only_run_dir, tiny_args, write_photos


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"iteration": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # some bytes reach the temp file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no temp file


def test_load_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"obj": Path("x")}, path)  # an arbitrary Python object: not weights_only-loadable
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_image_schedule_is_dense_then_periodic():
    hits = [i for i in range(1, 2100) if image_schedule_hit(i, every_n=500)]
    assert hits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 500, 1000, 1500, 2000]
    assert [i for i in range(1, 12) if image_schedule_hit(i, 5, dense_start=False)] == [5, 10]
    assert not image_schedule_hit(0, 5)


def test_make_grid_tiles_images_with_gaps():
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0, 2.0)])
    grid = make_grid(images, nrow=2)
    assert grid.shape == (2 * 6, 2 * 7, 3) and grid.dtype.name == "uint8"
    assert grid[1, 1, 0] == 0 and grid[1, 8, 0] == 128 and grid[7, 1, 0] == 255 and grid[7, 8, 0] == 255


def test_config_diff_names_changed_added_removed_keys():
    old = {"model": {"lr": 1, "drop": 2}, "data": {"bs": 4}}
    new = {"model": {"lr": 3}, "data": {"bs": 4, "workers": 0}}
    assert config_diff(old, new) == [
        "data.workers: (absent) -> 0",
        "model.drop: 2 -> (removed)",
        "model.lr: 1 -> 3",
    ]


def test_wandb_mode_is_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    mode, reason = wandb_mode()
    assert mode == "offline" and "no W&B API key" in reason
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode()[0] == "disabled"


def test_wandb_offline_run_holds_logged_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("KLVAE_RUN_DIR", raising=False)
    photos = write_photos(tmp_path / "photos")
    args = tiny_args(
        photos, tmp_path / "logs", "lightning.max_iterations=2", "lightning.image_logger.every_n_iterations=1"
    )
    args[args.index("csv")] = "wandb"
    try:
        assert main(args) == 0
    finally:
        os.environ.pop("WANDB_DIR", None)
    run = only_run_dir(tmp_path / "logs")
    run_id = (run / "wandb_run_id").read_text().strip()
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    media = list(offline.glob("files/media/images/**/*.png"))
    assert media, sorted(str(p.relative_to(offline)) for p in offline.rglob("*"))
    assert list((run / "images" / "train").glob("grid_it*.png"))
