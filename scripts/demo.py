"""``make demo``: shards from scikit-image's photographs -> a few minutes of training -> reconstructions + PSNR.

Runs the same code as a real run (``main.py``, ``WebDataModule``, ``AutoencoderKL``, ``LPIPSWithDiscriminator``),
only smaller (configs/demo.yaml). Needs no data and no download: the photographs ship inside scikit-image,
and the L2-first recipe uses no LPIPS (no VGG weights). Uses the GPU when there is one. Prints the held-out
photos' PSNR/SSIM next to an 8x box-downsample + bilinear-upsample baseline and writes
``RUN_DIR/reconstructions.png`` (input | reconstruction | baseline).

    python scripts/demo.py [--workdir demo] [--max-iterations 3000] [--eval-size 128] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("klvae.demo")


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


def box_bilinear_baseline(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """What an f=8 "VAE" that kept only an RGB thumbnail would give: 8×8 box average, bilinear upsample."""
    thumbnail = torch.nn.functional.avg_pool2d(x, factor)  # (B, 3, H/8, W/8)
    return torch.nn.functional.interpolate(
        thumbnail, scale_factor=factor, mode="bilinear", align_corners=False
    )


@torch.no_grad()
def evaluate(run: Path, size: int) -> dict[str, dict[str, float]]:
    """Score the EMA VAE and the baseline on the held-out photos (whole, ``size``²); write the grid.

    Scores are klvae-eval's (:func:`klvae.evaluation.metrics.reconstruction_scores`: 8-bit outputs, PSNR/SSIM in [0, 1]).
    """
    from omegaconf import OmegaConf
    from PIL import Image

    from klvae.callbacks import make_grid
    from klvae.evaluation.metrics import reconstruction_scores
    from klvae.io.checkpoints import load_checkpoint
    from klvae.util import instantiate_from_config

    config = OmegaConf.load(sorted((run / "configs").glob("*-project.yaml"))[-1])
    model = instantiate_from_config(config.model)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])
    model.eval()
    # The same validation shards, but each photo whole (shorter side ``size``, centre crop) rather than
    # the training-size centre crop: objects are recognisable, and the score covers whole photos.
    config.data.params.size = config.data.params.resize_to = size
    data = instantiate_from_config(config.data)
    data.setup("validate")
    scores: dict[str, list[torch.Tensor]] = {"vae": [], "baseline": []}
    rows, names = [], []
    for batch in data.val_dataloader():
        x = batch["image"]  # (B, 3, size, size) in [-1, 1]
        with model.ema_scope():
            recon = model.decode(model.encode(x).mode())
        baseline = box_bilinear_baseline(x)
        for name, y in (("vae", recon), ("baseline", baseline)):
            scores[name].append(reconstruction_scores(x, y))
        rows.append(torch.stack([x, recon.clamp(-1, 1), baseline], dim=1).flatten(0, 1))
        names += [f"grid row {len(names) + i + 1}" for i in range(len(x))]
    result = {
        name: {k: torch.cat([b[k] for b in batches]).mean().item() for k in batches[0]}
        for name, batches in scores.items()
    }
    result["vae"]["wins"] = int(
        (
            torch.cat([b["psnr"] for b in scores["vae"]]) > torch.cat([b["psnr"] for b in scores["baseline"]])
        ).sum()
    )
    result["vae"]["photos"] = sum(len(b["psnr"]) for b in scores["vae"])
    vae_psnr, base_psnr = (torch.cat([b["psnr"] for b in scores[n]]).tolist() for n in ("vae", "baseline"))
    result["per_photo"] = dict(zip(names, zip(vae_psnr, base_psnr, strict=True), strict=True))
    grid = make_grid(torch.cat(rows), nrow=3)  # one photo per row: input | reconstruction | baseline
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
        run / "reconstructions.png"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo", help="where shards and logs go (default: ./demo)")
    parser.add_argument("--max-iterations", type=int, default=None, help="override lightning.max_iterations")
    parser.add_argument("--eval-size", type=int, default=128, help="side of the held-out photos scored (128)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/demo.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    work = Path(args.workdir).resolve()
    train, val = make_shards(work / "shards")
    overrides = [
        f"data.params.train.shards={train}",
        f"data.params.validation.shards={val}",
    ]
    if args.max_iterations is not None:
        # The warm-up keeps its share of the schedule (100 of the default 3,000 iterations), so a short run
        # such as --max-iterations 20 is still a valid warm-up + cosine schedule.
        warmup = min(100, args.max_iterations // 30)
        overrides += [
            f"lightning.max_iterations={args.max_iterations}",
            f"model.params.lr_schedule.warmup_iterations={warmup}",
        ]
    overrides += args.overrides
    gpus = ["--gpus", "0,"] if torch.cuda.is_available() else []
    cmd = [sys.executable, str(REPO / "main.py"), "-b", str(REPO / "configs" / "demo.yaml"), "-t", "--no-test",
           "-l", str(work / "logs"), "-n", "demo", *gpus, *overrides]  # fmt: skip
    log.info("$ %s", " ".join(cmd))
    env = dict(os.environ)
    env.pop("KLVAE_RUN_DIR", None)
    if not gpus:
        # A tiny network gains nothing from intra-op threads, and OpenMP spin-waiting against the loader
        # worker (or any other job) on a small CPU made it ~30x slower (0.18 vs 5.3 it/s, 2 cores, loaded).
        env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        return result.returncode
    run = latest_run(work / "logs")
    result = evaluate(run, args.eval_size)
    vae, base = result["vae"], result["baseline"]
    log.info("")
    log.info("held-out photos (%d, whole, %d px)     PSNR dB   SSIM", vae["photos"], args.eval_size)
    log.info("  demo VAE (EMA weights, posterior mode)  %6.2f   %.3f", vae["psnr"], vae["ssim"])
    log.info("  8x box downsample + bilinear upsample   %6.2f   %.3f", base["psnr"], base["ssim"])
    for name, (v, b) in result["per_photo"].items():
        log.info("    %-12s VAE %6.2f dB, baseline %6.2f dB", name, v, b)
    log.info(
        "validation PSNR %.2f dB vs %.2f dB for the baseline (%+.2f dB; the VAE wins on %d of %d photos); "
        "demo took %.0f s",
        vae["psnr"], base["psnr"], vae["psnr"] - base["psnr"], vae["wins"], vae["photos"], time.time() - start,
    )  # fmt: skip
    log.info("grid (input | reconstruction | baseline, one photo per row): %s", run / "reconstructions.png")
    log.info("training image grids: %s", run / "images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
