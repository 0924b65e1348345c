"""``klvae-eval``: reconstruct held-out images and report PSNR, SSIM, LPIPS (VGG) and rFID.

Protocol (docs/evaluation.md): resize the shorter side to R and center crop R² (bicubic), encode, take
the posterior mode, decode, clamp to [-1, 1], round to 8 bits; PSNR/SSIM on [0, 1] per image, LPIPS-VGG
on [-1, 1], rFID between TF-Inception pool features of inputs and reconstructions.

Usage::

    klvae-eval logs/run/checkpoints/last.ckpt --data /data/coco2017-val --resolution 256 --out eval/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from klvae.evaluation.metrics import (
    FeatureStats,
    frechet_distance,
    inception_features,
    load_inception,
    quantize,
    reconstruction_scores,
    to_unit,
)

__all__ = ["MIN_RFID_IMAGES", "EvalResult", "evaluate", "main", "save_grid"]

log = logging.getLogger(__name__)

# FID fits a 2048-dimensional Gaussian (Inception pool features): below 2048 images the covariance is
# singular and the score is dominated by its bias (Heusel et al. 2017 use 50k; the LDM/SD VAE tables 5k-50k).
# Below this count rFID is still computed but marked unreliable in metrics.json and in the printout.
MIN_RFID_IMAGES = 2048


@dataclass
class EvalResult:
    """Aggregate metrics plus per-image scores and the k worst/best pairs (uint8 (k, 2, 3, H, W) by PSNR)."""

    metrics: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    worst: list[tuple[float, str, torch.Tensor]] = field(default_factory=list)
    best: list[tuple[float, str, torch.Tensor]] = field(default_factory=list)


def _keep(pool: list, items: list, k: int, worst: bool) -> list:
    pool = sorted(pool + items, key=lambda t: t[0], reverse=not worst)  # worst = lowest PSNR first
    return pool[:k]


@torch.inference_mode()
def evaluate(
    vae,  # klvae.inference.InferenceVAE
    batches,
    device: str | torch.device = "cpu",
    lpips_model: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    sample_posterior: bool = False,
    quantize_output: bool = True,
    keep: int = 8,
    total: int | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Reconstruct every batch and compute the metrics.

    Args:
        vae: an :class:`klvae.inference.InferenceVAE` on ``device``.
        batches: iterable of (images (B, 3, H, W) in [-1, 1], keys).
        lpips_model: VGG-LPIPS (:func:`klvae.modules.perceptual.load_lpips`) or None to skip LPIPS.
        inception: TF-Inception (:func:`klvae.evaluation.metrics.load_inception`) or None to skip rFID.
        sample_posterior: decode a posterior sample instead of the mode.
        quantize_output: round reconstructions to 8 bits before scoring (inputs already are).
        keep: how many worst and best reconstructions to keep for the grid.
        total: number of images, for the progress bar.
        limit: stop after this many images.

    Returns:
        :class:`EvalResult`; ``metrics`` has ``psnr``, ``ssim``, ``lpips`` and ``rfid`` (None when skipped).
    """
    scores: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
    real, fake = FeatureStats(), FeatureStats()
    result = EvalResult(metrics={})
    seen = 0
    bar = tqdm(total=limit or total, unit="img", desc="klvae-eval")
    for x, keys in batches:
        if limit is not None:
            x, keys = x[: limit - seen], keys[: limit - seen]
        if x.shape[0] == 0:
            break
        x = x.to(device)
        recon = vae.decode(vae.encode(x, sample=sample_posterior))  # (B, 3, H, W), float32
        per_image = reconstruction_scores(x, recon, lpips_model, quantize_output)  # each (B,)
        x01, r01 = to_unit(x), to_unit(recon)
        if quantize_output:
            r01 = quantize(r01)
        p, s = per_image["psnr"].cpu().numpy(), per_image["ssim"].cpu().numpy()
        scores["psnr"].append(p)
        scores["ssim"].append(s)
        lp = None
        if lpips_model is not None:
            lp = per_image["lpips"].cpu().numpy()
            scores["lpips"].append(lp)
        if inception is not None:
            real.update(inception_features(inception, x01))
            fake.update(inception_features(inception, r01))
        pairs = torch.stack([x01, r01], 1).mul(255).round().to(torch.uint8).cpu()  # (B, 2, 3, H, W)
        items = [(float(p[i]), keys[i], pairs[i]) for i in range(len(keys))]
        result.worst, result.best = (
            _keep(result.worst, items, keep, True),
            _keep(result.best, items, keep, False),
        )
        for i, key in enumerate(keys):
            row = {"key": key, "psnr": float(p[i]), "ssim": float(s[i])}
            if lp is not None:
                row["lpips"] = float(lp[i])
            result.per_image.append(row)
        seen += x.shape[0]
        bar.update(x.shape[0])
        if limit is not None and seen >= limit:
            break
    bar.close()
    if seen == 0:
        from klvae.errors import DataError

        raise DataError("no images were evaluated: the data source is empty or no file in it could be read")
    m: dict[str, Any] = {"num_images": seen}
    for name, values in scores.items():
        m[name] = float(np.concatenate(values).mean()) if values else None
        m[f"{name}_std"] = float(np.concatenate(values).std()) if values else None
    m["rfid"] = None
    m["rfid_unreliable"] = None
    if inception is not None:
        if seen < 2:
            log.warning("rFID needs at least 2 images; skipped")
        else:
            m["rfid"] = frechet_distance(*real.mean_cov(), *fake.mean_cov())
            m["rfid_unreliable"] = seen < MIN_RFID_IMAGES
            if m["rfid_unreliable"]:
                log.warning(
                    "rFID over %d images is UNRELIABLE: it needs at least %d (the Inception feature "
                    "dimension; published numbers use 5k-50k); evaluate on %d more images",
                    seen, MIN_RFID_IMAGES, MIN_RFID_IMAGES - seen,
                )  # fmt: skip
    m["rfid_min_images"] = MIN_RFID_IMAGES
    result.metrics = m
    return result


def save_grid(result: EvalResult, path: str | Path) -> Path:
    """PNG: left the worst, right the best reconstructions by PSNR; each row is input | reconstruction."""
    from PIL import Image

    def column(items: list) -> np.ndarray:
        rows = [torch.cat([pair[0], pair[1]], dim=2) for _, _, pair in items]  # (3, H, 2W)
        return torch.cat(rows, dim=1).permute(1, 2, 0).numpy()  # (k·H, 2W, 3)

    left, right = column(result.worst), column(result.best)
    gap = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    path = Path(path)
    Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(path)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klvae-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint", help="any format klvae loads (run checkpoint, LDM/SD .ckpt, diffusers folder ...)"
    )
    p.add_argument("--data", required=True, help="image folder or webdataset shards")
    p.add_argument(
        "--resolution", type=int, default=256, help="resize shorter side + center crop (default 256)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--out", required=True, help="folder for metrics.json, per_image.jsonl and grid.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--lpips", default="imagenet", help="imagenet (cached weights), a path, or none")
    p.add_argument(
        "--inception", default=None, help="TF-Inception TorchScript (default: klvae cache); none to skip"
    )
    p.add_argument("--sample", action="store_true", help="decode posterior samples instead of the mode")
    p.add_argument(
        "--no-quantize", action="store_true", help="score float reconstructions (no 8-bit rounding)"
    )
    p.add_argument("--no-ema", action="store_true", help="use live weights of a run checkpoint")
    p.add_argument("--grid-k", type=int, default=8, help="worst/best images in grid.png")
    p.add_argument("--latent-metrics", action="store_true", help="also equivariance/spectrum/latent stats")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_cli

    return run_cli("klvae-eval", _parser(), _run, argv)


def _metric_model(flag: str, value: str | None, keywords: tuple, load, errors: dict, metric: str):
    """LPIPS or the Inception for ``flag``: ``none`` skips the metric; when the default weights
    (``keywords[0]``) are missing the metric is skipped and the error recorded; a file the user names must
    exist and load (else a ConfigError: exit 2, not a silently missing metric)."""
    from klvae.errors import ConfigError

    if value == "none":
        return None
    name = {"lpips": "LPIPS", "rfid": "rFID"}[metric]
    if value not in keywords and not Path(value).expanduser().is_file():
        raise ConfigError(
            f"{flag} {value!r}: no such file; give the weights file, or {flag} none to skip {name}"
        )
    try:
        return load(value)
    except (FileNotFoundError, ValueError) as e:
        if value != keywords[0]:
            raise ConfigError(
                f"{flag} {value!r}: {e}; give a valid file, or {flag} none to skip {name}"
            ) from e
        errors[metric] = str(e)  # the standard cache is empty: report the other metrics anyway
        log.error("%s skipped: %s", name, e)
        return None
    except RuntimeError as e:  # torch.jit.load of something that is not TorchScript
        if value == keywords[0]:
            raise
        raise ConfigError(f"{flag} {value!r} could not be loaded ({e}); give a valid file, or {flag} none "
                          f"to skip {name}") from e  # fmt: skip


def _run(args: argparse.Namespace) -> None:
    from klvae.errors import ConfigError, load_user_file
    from klvae.evaluation.data import check_resolution, image_batches
    from klvae.inference import InferenceVAE, resolve_device
    from klvae.modules.perceptual import load_lpips

    for name in ("resolution", "batch_size", "grid_k"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is an existing file; give a folder (created if missing)")
    vae = load_user_file(
        f"checkpoint {args.checkpoint}",
        lambda: InferenceVAE.from_pretrained(
            args.checkpoint, use_ema=False if args.no_ema else None, device=device
        ),
    )
    check_resolution(args.resolution, vae.downsampling)
    errors: dict[str, str] = {}
    lpips_model = _metric_model(
        "--lpips", args.lpips, ("imagenet", "random"), lambda v: load_lpips(v).to(device), errors, "lpips"
    )
    inception = _metric_model(
        "--inception", args.inception, (None,), lambda v: load_inception(v, device=device), errors, "rfid"
    )
    out.mkdir(parents=True, exist_ok=True)
    batches = image_batches(args.data, args.resolution, args.batch_size, args.num_workers)
    total = batches.total
    result = evaluate(
        vae,
        batches,
        device,
        lpips_model,
        inception,
        args.sample,
        not args.no_quantize,
        args.grid_k,
        total,
        args.limit,
    )
    metrics = {
        **result.metrics,
        "checkpoint": str(args.checkpoint),
        "data": args.data,
        "resolution": args.resolution,
        "posterior": "sample" if args.sample else "mode",
        "quantized": not args.no_quantize,
        "num_skipped": len(batches.skipped),
        "skipped": batches.skipped,  # files/samples that could not be used: never replaced by others
        "errors": errors,
    }
    if batches.skipped:
        log.warning(
            "%d file(s) skipped (unreadable or not an image), listed in metrics.json; first: %s",
            len(batches.skipped), batches.skipped[0],
        )  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    (out / "per_image.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.per_image))
    save_grid(result, out / "grid.png")
    if (
        args.latent_metrics
    ):  # klvae.evaluation.latent_metrics: latent_metrics.json + latent_spectrum.png in out
        from klvae.evaluation.latent_metrics import write_latent_metrics

        write_latent_metrics(vae, args.data, args.resolution, args.batch_size, out, device, args.limit)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.4f}")

    rfid = fmt(result.metrics["rfid"])
    if result.metrics["rfid_unreliable"]:
        rfid += f" (UNRELIABLE: {result.metrics['num_images']} < {MIN_RFID_IMAGES} images)"
    log.info(
        "%d images at %d² (%d skipped): PSNR %s  SSIM %s  LPIPS %s  rFID %s  -> %s",
        result.metrics["num_images"], args.resolution, len(batches.skipped), fmt(result.metrics["psnr"]),
        fmt(result.metrics["ssim"]), fmt(result.metrics["lpips"]), rfid, out,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
