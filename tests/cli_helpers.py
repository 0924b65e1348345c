"""Shared fixtures for the CLI tests: real skimage photos as small files, and the tiny config's overrides."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from PIL import Image

from klvae.data.folder import ImageFolderDataModule
from klvae.data.sample_images import skimage_photo_paths

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.yaml")
MAIN = str(REPO / "main.py")


def write_photos(folder: Path, n: int = 4, size: int = 32) -> Path:
    """``n`` real photographs from scikit-image, resized to ``size``² (square: crops are deterministic)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in skimage_photo_paths()[:n]:
        Image.open(path).convert("RGB").resize((size, size)).save(folder / f"{path.stem}.png")
    return folder


def write_nonsquare_photos(folder: Path, n: int = 6) -> Path:
    """``n`` real photographs, landscape and portrait (48x36, 36x52, ...): random crops really move."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(48, 36), (36, 52), (56, 40), (40, 44)]
    for i, path in enumerate(skimage_photo_paths()[:n]):
        Image.open(path).convert("RGB").resize(shapes[i % len(shapes)]).save(folder / f"{path.stem}.png")
    return folder


def tiny_args(data_dir: Path, logdir: Path, *extra: str) -> list[str]:
    return [
        "-b", TINY, "-t", "-l", str(logdir), "--logger", "csv", "--no-test",
        f"data.params.train_dir={data_dir}",
        "lightning.trainer.enable_progress_bar=false",
        *extra,
    ]  # fmt: skip


def only_run_dir(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def train_losses(run: Path) -> dict[int, tuple[str, float]]:
    """iteration -> (name, value) of the loss logged by the update made at that iteration (all launches)."""
    out: dict[int, tuple[str, float]] = {}
    for path in sorted(run.glob("csv/*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            for name in ("train/total_loss", "train/disc_loss"):
                if row.get(name):
                    out.setdefault(int(float(row["train/iteration"])), (name, float(row[name])))
                    break
    return out


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop("KLVAE_RUN_DIR", None)
    return env


class OrderedFolderDataModule(ImageFolderDataModule):
    """The folder datamodule without shuffling: a data order that does not depend on any RNG state."""

    def train_dataloader(self):
        self.setup("fit")
        return self._loader(self.train_set, shuffle=False, drop_last=self.drop_last)
