"""``make demo``: shards from scikit-image's photographs -> minutes of training -> reconstructions + PSNR.

Runs the same code as a real run (``main.py``, ``WebDataModule``, ``AutoencoderKL``, ``LPIPSWithDiscriminator``),
only smaller (configs/demo.yaml). Needs no data and no download: the photographs ship inside scikit-image,
and the L2-first recipe uses no LPIPS (no VGG weights). Uses the GPU when there is one. Prints the held-out
photos' PSNR/SSIM next to an 8x box-downsample + bilinear-upsample baseline and writes
``RUN_DIR/reconstructions.png`` (input | reconstruction | baseline).

    python scripts/demo.py [--workdir demo] [--max-iterations N] [--seed 23] [key.path=value ...]
    python scripts/demo.py --eval-only --eval-images ~/my-photos     # score the last demo VAE on your photos
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from klvae.errors import ConfigError, DataError, run_tool

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("klvae.demo")

VAL_FRACTION = 0.25  # a quarter of the photos is held out (a hash of the file name: 6 of 16 by default)
BASELINE = "8x box downsample + bilinear upsample"


def make_shards(out: Path, holdout_seed: int) -> dict:
    """Write train/val shards of the bundled photos; returns (and records in ``out/held_out.json``) both
    shard patterns and the held-out photos' names, in shard order."""
    from klvae.data.make_shards import is_validation, write_shards
    from klvae.data.sample_images import skimage_photo_paths

    photos = skimage_photo_paths()
    held_out = [p.stem for p in photos if is_validation(p.name, VAL_FRACTION, holdout_seed)]
    if not held_out or len(held_out) == len(photos):
        raise ConfigError(f"--holdout-seed {holdout_seed} holds out {len(held_out)} of {len(photos)} photos; "
                          "choose another")  # fmt: skip
    summary = write_shards(
        [str(p) for p in photos], out, samples_per_shard=4, resize=160, val_fraction=VAL_FRACTION,
        seed=holdout_seed, progress=False,
    )  # fmt: skip
    log.info("shards: %d train + %d held-out photos (%s) in %s", summary.count["train"], summary.count["val"],
             ", ".join(held_out), out)  # fmt: skip
    split = {"holdout_seed": holdout_seed, "held_out": held_out, **summary.patterns}
    (out / "held_out.json").write_text(json.dumps(split, indent=2) + "\n")
    return split


def read_split(out: Path) -> dict:
    """The split a previous demo trained with (``make_shards``' record)."""
    if not (out / "held_out.json").is_file():
        raise ConfigError(f"no trained demo under {out.parent}; run `python scripts/demo.py` first")
    return json.loads((out / "held_out.json").read_text())


def latest_run(logdir: Path) -> Path:
    runs = (
        sorted(p for p in logdir.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())
        if logdir.is_dir()
        else []
    )
    if not runs:
        raise ConfigError(f"no trained demo under {logdir}; run `python scripts/demo.py` first")
    return runs[-1]


def box_bilinear_baseline(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """What an f=8 "VAE" that kept only an RGB thumbnail would give: 8×8 box average, bilinear upsample."""
    thumbnail = torch.nn.functional.avg_pool2d(x, factor)  # (B, 3, H/8, W/8)
    return torch.nn.functional.interpolate(
        thumbnail, scale_factor=factor, mode="bilinear", align_corners=False
    )


def load_demo_vae(run: Path) -> torch.nn.Module:
    """The run's ``AutoencoderKL`` (built from its saved config) with ``last.ckpt``'s weights, in eval mode."""
    from omegaconf import OmegaConf

    from klvae.io.checkpoints import load_checkpoint
    from klvae.util import instantiate_from_config

    config = OmegaConf.load(sorted((run / "configs").glob("*-project.yaml"))[-1])
    model = instantiate_from_config(config.model)
    model.load_state_dict(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])
    return model.eval()


def named_batches(
    source: str, size: int, names: list[str] | None = None
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(images (B, 3, size, size) in [-1, 1], names) of a folder or shards, read and cropped as ``klvae-eval``
    reads them (shorter side ``size``, centre crop). ``names``: the shard samples' names, in order."""
    from klvae.evaluation.data import image_batches

    batches = image_batches(source, size, batch_size=8)
    for x, keys in batches:
        if names is not None:  # shard keys are "val-000000.tar:000000003": the 4th held-out photo
            keys = [names[int(k.rsplit(":", 1)[1])] for k in keys]
        yield x, [Path(k).stem for k in keys]
    if batches.skipped:
        log.warning("%d file(s) in %s could not be read and were skipped (first: %s)",
                    len(batches.skipped), source, batches.skipped[0])  # fmt: skip


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, list[str]]], grid: Path) -> dict:
    """Reconstruct each photo with the EMA weights (posterior mode) and score it and the baseline; write the
    grid (one photo per row: input | reconstruction | baseline).

    Scores are ``klvae-eval``'s (:func:`klvae.evaluation.metrics.reconstruction_scores`: 8-bit outputs,
    PSNR/SSIM on [0, 1]).
    """
    from PIL import Image

    from klvae.callbacks import make_grid
    from klvae.evaluation.metrics import reconstruction_scores

    per_photo: dict[str, dict[str, tuple[float, float]]] = {}
    rows = []
    for x, names in batches:  # x: (B, 3, H, W) in [-1, 1]
        with model.ema_scope():
            recon = model.decode(model.encode(x).mode())
        baseline = box_bilinear_baseline(x)
        vae, base = reconstruction_scores(x, recon), reconstruction_scores(x, baseline)
        for i, name in enumerate(names):
            per_photo[name] = {
                "vae": (vae["psnr"][i].item(), vae["ssim"][i].item()),
                "baseline": (base["psnr"][i].item(), base["ssim"][i].item()),
            }
        rows.append(torch.stack([x, recon.clamp(-1, 1), baseline], dim=1).flatten(0, 1))
    if not per_photo:
        raise DataError("no photo could be read and scored")
    picture = make_grid(torch.cat(rows), nrow=3)
    Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(grid)
    mean = {
        who: tuple(sum(p[who][k] for p in per_photo.values()) / len(per_photo) for k in (0, 1))
        for who in ("vae", "baseline")
    }
    wins = sum(p["vae"][0] > p["baseline"][0] for p in per_photo.values())
    return {"per_photo": per_photo, "mean": mean, "wins": wins, "grid": grid}


def report(title: str, result: dict, size: int) -> None:
    (vae_psnr, vae_ssim), (base_psnr, base_ssim) = result["mean"]["vae"], result["mean"]["baseline"]
    n = len(result["per_photo"])
    log.info("")
    log.info("%s (%d photos, whole, %d px)     PSNR dB   SSIM", title, n, size)
    log.info("  demo VAE (EMA weights, posterior mode)  %6.2f   %.3f", vae_psnr, vae_ssim)
    log.info("  %-39s %6.2f   %.3f", BASELINE, base_psnr, base_ssim)
    for name, p in result["per_photo"].items():
        log.info("    %-20s VAE %6.2f dB %.3f, baseline %6.2f dB %.3f", name, *p["vae"], *p["baseline"])
    log.info(
        "%s PSNR %.2f dB vs %.2f dB for the baseline (%+.2f dB; SSIM %.3f vs %.3f; the VAE wins on %d of %d)",
        title, vae_psnr, base_psnr, vae_psnr - base_psnr, vae_ssim, base_ssim, result["wins"], n,
    )  # fmt: skip
    log.info("grid (input | reconstruction | baseline, one photo per row): %s", result["grid"])


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (training, loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(args: argparse.Namespace, work: Path, train_shards: str, val_shards: str) -> int:
    overrides = [
        f"data.params.train.shards={train_shards}",
        f"data.params.validation.shards={val_shards}",
        f"data.params.seed={args.seed}",
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
           "-l", str(work / "logs"), "-n", "demo", "-s", str(args.seed), *gpus, *overrides]  # fmt: skip
    log.info("$ %s", " ".join(cmd))
    env = dict(os.environ)
    env.pop("KLVAE_RUN_DIR", None)
    if not gpus:
        # A tiny network gains little from intra-op threads, and OpenMP threads spin-waiting against the
        # loader worker (or any other job) on a small CPU cost ~25x the CPU time: on this project's loaded
        # 2-core machine a training step took 0.15 CPU-s with 1 thread, 3.6 with 2 threads, 0.22 with 2
        # threads that sleep while they wait (OMP_WAIT_POLICY=PASSIVE, which also makes
        # `OMP_NUM_THREADS=2 make demo` usable).
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return subprocess.run(cmd, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo", help="where shards and logs go (default: ./demo)")
    parser.add_argument("--max-iterations", type=int, default=None, help="override lightning.max_iterations")
    parser.add_argument("--eval-size", type=int, default=128, help="side of the photos scored (default 128)")
    parser.add_argument("--seed", type=int, default=23, help="seed of the weights and the data order (23)")
    parser.add_argument("--holdout-seed", type=int, default=1,
                        help="salt of the hash that holds out a quarter of the photos (default 1: 6 of 16)")  # fmt: skip
    parser.add_argument("--eval-images", action="append", default=[], metavar="DIR",
                        help="also score the VAE and the baseline on every image in DIR (recursive; repeatable)")  # fmt: skip
    parser.add_argument("--eval-only", action="store_true",
                        help="do not train: score the last demo run under --workdir (on the photos it held out)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of configs/demo.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.eval_size < 8 or args.eval_size % 8:
        parser.error(
            f"--eval-size {args.eval_size}: must be a positive multiple of 8 (the VAE's downsampling)"
        )
    for folder in args.eval_images:
        if not Path(folder).expanduser().is_dir():
            parser.error(f"--eval-images {folder!r}: no such folder")
    code = 0

    def body() -> None:
        nonlocal code
        code = demo(args)

    return run_tool("demo.py", body, traceback=False) or code


def demo(args: argparse.Namespace) -> int:
    """Shards, training (unless ``--eval-only``), then the scores; returns the training's exit status."""
    start = time.time()
    work = Path(args.workdir).resolve()
    if args.eval_only:
        split = read_split(work / "shards")
    else:
        split = make_shards(work / "shards", args.holdout_seed)
        code = train(args, work, split["train"], split["val"])
        if code != 0:
            return code
    run = latest_run(work / "logs")
    model = load_demo_vae(run)
    held_out = named_batches(split["val"], args.eval_size, split["held_out"])
    results = [("held-out photos", score(model, held_out, run / "reconstructions.png"))]
    for i, folder in enumerate(args.eval_images):
        grid = run / f"reconstructions_{i}_{Path(folder).expanduser().resolve().name}.png"
        results.append((f"photos in {folder}", score(model, named_batches(folder, args.eval_size), grid)))
    for title, result in results:
        report(title, result, args.eval_size)
    log.info("")
    log.info("VAE: %s; training image grids: %s", run / "checkpoints" / "last.ckpt", run / "images")
    log.info("demo took %.0f s (%.0f CPU-seconds, all processes)", time.time() - start, cpu_seconds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
