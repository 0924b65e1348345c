"""``klvae-latent-stats``: the latent scale factor (1/std) and shift (mean) a diffusion model needs.

A diffusion model trained on this VAE's latents expects them near zero mean and unit variance: SD uses
``z · 0.18215`` for its VAE (SDXL 0.13025); SD3 and FLUX.1 also shift, ``(z - shift_factor) · scaling_factor``
(SD3 1.5305 / 0.0609, FLUX.1 0.3611 / 0.1159, in diffusers' configs). Here ``shift_factor`` is the mean and
``scaling_factor`` 1/std of the shifted latents; a new VAE needs its own. As LDM's ``scale_by_std`` does,
the default statistic is over posterior *samples* (what ``encode_first_stage`` returns during diffusion
training), all channels and positions pooled.

A FLUX.2-shaped VAE (``ddconfig.latent_batch_norm``) normalises latents with a BatchNorm over 2×2 patches
instead of two factors. For it the JSON also has ``batch_norm``: the per-channel mean and (unbiased, as
BatchNorm's) variance of the patchified posterior *means*, ``(4·C,)`` in FLUX.2's channel order, which
``klvae-export --batch-norm-stats`` writes into ``bn.running_mean``/``bn.running_var`` of a new VAE. Means,
because that is what FLUX.2 normalises (black-forest-labs/flux2 ``AutoEncoder.encode``; diffusers'
``Flux2Pipeline`` encodes with ``sample_mode="argmax"``), so its latents come out with mean 0 and
variance 1 per channel on these images.

Usage::

    klvae-latent-stats logs/run/checkpoints/last.ckpt --data /data/val --resolution 256 --out stats.json
    klvae-export logs/run/checkpoints/last.ckpt --format diffusers --out my-vae --latent-stats stats.json
    klvae-export logs/run/checkpoints/last.ckpt --out my-flux2-vae --batch-norm-stats stats.json  # FLUX.2-shaped
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["LatentStats", "compute_latent_stats", "main"]

log = logging.getLogger(__name__)


class LatentStats:
    """Streaming mean/std of latents (B, C, h, w), overall and per channel, in float64 (Chan's merge)."""

    def __init__(self) -> None:
        self.n = 0  # values per channel
        self.mean: torch.Tensor | None = None  # (C,)
        self.m2: torch.Tensor | None = None  # (C,) sum of squared deviations

    def update(self, z: torch.Tensor) -> None:
        """Add a batch of latents (B, C, h, w)."""
        values = z.detach().double().transpose(0, 1).reshape(z.shape[1], -1).cpu()  # (C, B·h·w)
        n_b = values.shape[1]
        mean_b = values.mean(1)
        m2_b = ((values - mean_b[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / total
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / total
        self.n = total

    def result(self) -> dict[str, Any]:
        """``scaling_factor`` (1/std over all values), ``shift_factor`` (mean), and per-channel stats."""
        if self.mean is None or self.n < 2:
            from klvae.errors import DataError

            raise DataError("latent statistics need at least two latent values; no images were encoded")
        channels = self.mean.shape[0]
        mean = float(self.mean.mean())  # channels hold equal counts, so this is the overall mean
        # Overall variance = within-channel + between-channel parts.
        var = float((self.m2.sum() + self.n * ((self.mean - mean) ** 2).sum()) / (channels * self.n - 1))
        std = math.sqrt(var)
        return {
            "scaling_factor": 1.0 / std,
            "shift_factor": mean,
            "std": std,
            "mean": mean,
            "per_channel_mean": self.mean.tolist(),
            "per_channel_std": (self.m2 / (self.n - 1)).sqrt().tolist(),
            "num_values": channels * self.n,
        }


@torch.inference_mode()
def compute_latent_stats(
    vae,  # klvae.inference.InferenceVAE
    batches: Iterable[torch.Tensor],
    sample: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Encode every batch (B, 3, H, W) in [-1, 1] and return :meth:`LatentStats.result` plus ``num_images``,
    and ``batch_norm`` (statistics of patchified posterior means) when the VAE has a latent BatchNorm.

    Args:
        vae: an :class:`klvae.inference.InferenceVAE` (already on ``device``).
        batches: image batches.
        sample: statistics of posterior samples (LDM's convention) rather than of the posterior means.
        device: where images are encoded.
        seed: RNG seed for the samples.
    """
    from klvae.modules.latent_norm import patchify

    stats = LatentStats()
    norm = vae.model.network.latent_batch_norm
    patches = LatentStats() if norm is not None else None  # (4·C,) channels of FLUX.2's patches
    generator = torch.Generator(device=device).manual_seed(seed)
    images = 0
    for x in batches:
        posterior = vae.posterior(x.to(device))  # over (B, C, H/f, W/f)
        stats.update(posterior.sample(generator) if sample else posterior.mode())
        if patches is not None:
            patches.update(patchify(posterior.mode(), norm.patch_size))
        images += x.shape[0]
    result = {
        **stats.result(),
        "num_images": images,
        "statistic": "posterior samples" if sample else "posterior means",
    }
    if patches is not None:
        patches.result()  # the same checks (enough values)
        result["batch_norm"] = {
            "patch_size": list(norm.patch_size),
            "running_mean": patches.mean.tolist(),
            "running_var": (patches.m2 / (patches.n - 1)).tolist(),  # unbiased, as BatchNorm keeps it
            "statistic": "posterior means",
            "num_values_per_channel": patches.n,
        }
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klvae-latent-stats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint", help="any format klvae loads (run checkpoint, LDM/SD .ckpt, diffusers folder ...)"
    )
    p.add_argument("--data", required=True, help="image folder or webdataset shards")
    p.add_argument("--resolution", type=int, default=256, help="center-crop side (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    p.add_argument("--mode", action="store_true", help="use posterior means instead of samples")
    p.add_argument("--no-ema", action="store_true", help="use live weights of a run checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here (default: print only)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_cli

    return run_cli("klvae-latent-stats", _parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    from klvae.errors import ConfigError, load_user_file
    from klvae.evaluation.data import check_resolution, image_batches
    from klvae.inference import InferenceVAE, resolve_device

    for name in ("resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device)
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out!r} is a folder; give the path of the JSON file to write")
    vae = load_user_file(
        f"checkpoint {args.checkpoint}",
        lambda: InferenceVAE.from_pretrained(
            args.checkpoint, use_ema=False if args.no_ema else None, device=device
        ),
    )
    check_resolution(args.resolution, vae.downsampling)
    norm = vae.model.network.latent_batch_norm
    if norm is not None:
        multiple = vae.downsampling * math.lcm(*norm.patch_size)
        if args.resolution % multiple:
            raise ConfigError(
                f"--resolution {args.resolution}: this VAE's latent BatchNorm works on {norm.patch_size[0]}x"
                f"{norm.patch_size[1]} latent patches, so the side must be a multiple of {multiple}"
            )
    batches = image_batches(args.data, args.resolution, args.batch_size, args.num_workers)

    def limited() -> Iterable[torch.Tensor]:
        seen = 0
        for x, _keys in batches:
            if args.limit is not None and seen >= args.limit:
                return
            x = x[: args.limit - seen] if args.limit is not None else x
            seen += x.shape[0]
            yield x

    result = compute_latent_stats(vae, limited(), sample=not args.mode, device=device)
    result.update(
        checkpoint=str(args.checkpoint),
        data=args.data,
        resolution=args.resolution,
        num_skipped=len(batches.skipped),
        skipped=batches.skipped,  # never replaced by other images: num_images is exact
    )
    if batches.skipped:
        log.warning("%d file(s) skipped (unreadable or not an image); first: %s", len(batches.skipped),
                    batches.skipped[0])  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if "batch_norm" in result:
        log.info("latent BatchNorm statistics of %d patch channels measured (klvae-export --batch-norm-stats)",
                 len(result["batch_norm"]["running_mean"]))  # fmt: skip
    log.info(
        "latents of %d images: mean %.5f, std %.5f -> scaling_factor %.5f, shift_factor %.5f%s",
        result["num_images"], result["mean"], result["std"], result["scaling_factor"], result["shift_factor"],
        f" (written to {args.out})" if args.out else "",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
