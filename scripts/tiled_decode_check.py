"""How much PSNR tiled decoding costs on your model and images: decode whole and tiled, score both.

    python scripts/tiled_decode_check.py RUN_OR_VAE --images DIR [--size 256] [--tile 128] [--overlap 32]
    python scripts/tiled_decode_check.py demo/logs/<run> --skimage-photos --size 256 --tile 128

Latents are the posterior mean of the whole image (encoding is not tiled), so the difference is the
decoder's alone. Prints one line per image and the mean: PSNR whole, PSNR tiled, and their difference.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image


def load(path: str, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic), centre crop to multiples of 8: (1, 3, H, W) in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    rgb = np.asarray(img)
    h, w = rgb.shape[0] // 8 * 8, rgb.shape[1] // 8 * 8
    top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
    x = torch.from_numpy(rgb[top : top + h, left : left + w].copy()).permute(2, 0, 1)
    return x[None].float() / 127.5 - 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a klvae run (dir or .ckpt), export, diffusers folder or SD .ckpt")
    parser.add_argument("--images", default=None, help="folder of images (searched recursively)")
    parser.add_argument("--skimage-photos", action="store_true", help="use scikit-image's bundled photos")
    parser.add_argument("--size", type=int, default=256, help="shorter side the images are resized to")
    parser.add_argument("--tile", type=int, default=128, help="tile side in pixels (multiple of 8)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (multiple of 8)")
    args = parser.parse_args()

    from klvae.data.folder import list_images
    from klvae.data.sample_images import skimage_photo_paths
    from klvae.evaluation.metrics import psnr, quantize, to_unit
    from klvae.inference import InferenceVAE

    paths = [str(p) for p in list_images(args.images)] if args.images else []
    paths += [str(p) for p in skimage_photo_paths()] if args.skimage_photos else []
    if not paths:
        parser.error("give --images DIR or --skimage-photos")
    vae = InferenceVAE.from_pretrained(args.model)
    rows = []
    with torch.no_grad():
        for path in paths:
            x = load(path, args.size)
            z = vae.encode(x)
            whole = vae.decode(z)
            tiled = vae.decode(z, tile_size=args.tile, tile_overlap=args.overlap)
            scores = [psnr(to_unit(x), quantize(to_unit(y))).item() for y in (whole, tiled)]
            rows.append(scores)
            print(f"{path}: {tuple(x.shape[-2:])} whole {scores[0]:.2f} dB, tiled {scores[1]:.2f} dB, "
                  f"difference {scores[1] - scores[0]:+.2f} dB")  # fmt: skip
    mean = np.mean(rows, axis=0)
    diffs = [t - w for w, t in rows]
    print(f"mean over {len(rows)} images at shorter side {args.size}, tile {args.tile}, overlap {args.overlap}: "
          f"whole {mean[0]:.2f} dB, tiled {mean[1]:.2f} dB, difference {mean[1] - mean[0]:+.2f} dB "
          f"(range {min(diffs):+.2f} to {max(diffs):+.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
