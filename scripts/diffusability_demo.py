"""One command, on a CPU: is the demo VAE's EQ-VAE fine-tune easier for a diffusion model? (docs/diffusability.md)

1. the demo VAE (``scripts/demo.py``) and two fine-tunes of it for the same iterations, plain and with EQ-VAE
   (``scripts/eqvae_demo.sh``), unless the work directory already has them; plus an untrained VAE of the same
   shape as the bottom anchor;
2. 64² crops of scikit-image's photographs (the demo's data, cut into overlapping tiles: a few hundred images);
3. ``klvae-encode`` with every VAE (with flipped copies), then ``klvae-diffusability --preset smoke``.

    OMP_NUM_THREADS=1 python scripts/diffusability_demo.py --workdir demo
    python scripts/diffusability_demo.py --workdir demo --vae vf=logs/<vf-run>/checkpoints/last.ckpt   # add VAEs

Add any other VAE of the same latent shape with ``--vae NAME=PATH`` (e.g. a VF-loss fine-tune).
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
log = logging.getLogger("klvae.diffusability_demo")


def latest(pattern: str, root: Path) -> Path | None:
    runs = (
        sorted(p for p in root.glob(pattern) if (p / "checkpoints" / "last.ckpt").is_file())
        if root.is_dir()
        else []
    )
    return runs[-1] / "checkpoints" / "last.ckpt" if runs else None


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        WANDB_MODE="offline",
        PYTHON=sys.executable,
    )  # eqvae_demo.sh runs $PYTHON
    env.pop("KLVAE_RUN_DIR", None)
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def make_tiles(out: Path, size: int = 64, shorter: int = 128, stride: int = 16) -> Path:
    """Every ``size``² tile (stride ``stride``) of each photograph resized to shorter side ``shorter``."""
    from PIL import Image

    from klvae.data.sample_images import skimage_photo_paths
    from klvae.data.transforms import to_rgb

    if out.is_dir() and any(out.iterdir()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for path in skimage_photo_paths():
        img = to_rgb(Image.open(path))
        scale = shorter / min(img.size)
        img = img.resize((max(shorter, round(img.width * scale)), max(shorter, round(img.height * scale))),
                         Image.Resampling.BICUBIC)  # fmt: skip
        for top in range(0, img.height - size + 1, stride):
            for left in range(0, img.width - size + 1, stride):
                img.crop((left, top, left + size, top + size)).save(
                    out / f"{path.stem}_{top:03d}_{left:03d}.png"
                )
    return out


def untrained_vae(run_ckpt: Path, out: Path) -> Path:
    """A randomly initialised VAE with the demo run's network (the benchmark's bottom anchor)."""
    from klvae.interop.formats import VAEWeights, read_vae_weights, write_vae
    from klvae.modules.vae import KLAutoencoder

    if out.is_file():
        return out
    trained = read_vae_weights(run_ckpt)
    torch.manual_seed(0)
    model = KLAutoencoder(trained.network)
    return write_vae(VAEWeights(model.state_dict(), trained.network, "klvae-run"), out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo")
    parser.add_argument(
        "--base-iterations", type=int, default=300, help="demo VAE iterations (if trained here)"
    )
    parser.add_argument(
        "--finetune-iterations", type=int, default=200, help="plain / EQ-VAE fine-tune iterations"
    )
    parser.add_argument(
        "--vae", action="append", default=[], metavar="NAME=PATH", help="another VAE to compare"
    )
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--no-untrained", action="store_true", help="leave out the untrained anchor")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.time()
    work = Path(args.workdir).resolve()
    py = sys.executable
    if latest("*_demo", work / "logs") is None:
        run(
            [
                py,
                str(REPO / "scripts" / "demo.py"),
                "--workdir",
                str(work),
                "--max-iterations",
                str(args.base_iterations),
            ]
        )
    if latest("*_eqvae", work / "eqvae_logs") is None:
        run(["bash", str(REPO / "scripts" / "eqvae_demo.sh"), str(work), str(args.finetune_iterations)])
    base = latest("*_demo", work / "logs")
    vaes = {
        "demo": base,
        "plain-ft": latest("*_plain", work / "eqvae_logs"),
        "eqvae-ft": latest("*_eqvae", work / "eqvae_logs"),
    }
    root = work / "diffusability"
    if not args.no_untrained:
        vaes["untrained"] = untrained_vae(base, root / "untrained.safetensors")
    for item in args.vae:
        name, _, path = item.partition("=")
        vaes[name] = Path(path).resolve()
    images = make_tiles(root / "tiles")
    from klvae.diffusability.benchmark import run_benchmark
    from klvae.diffusability.encode import encode_to_shards
    from klvae.diffusability.protocol import protocol_for

    dirs = []
    for name, path in vaes.items():
        dirs.append(root / "latents" / name)
        encode_to_shards(str(path), str(images), dirs[-1], resolution=64, batch_size=32, samples_per_shard=128,
                         flip=True, num_workers=1, progress=False)  # fmt: skip
    report = run_benchmark([str(d) for d in dirs], root / "report", protocol_for(args.preset), list(vaes),
                           progress=False)  # fmt: skip
    log.info(
        "\n%s\ncurves: %s\ndemo took %.0f s",
        "\n".join(report["table"]),
        report["curves_png"],
        time.time() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
