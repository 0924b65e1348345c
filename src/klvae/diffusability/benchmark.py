"""``klvae-diffusability``: how well does a diffusion model learn each VAE's latents? (docs/diffusability.md)

For every latent directory (``klvae-encode``'s output, one per VAE, same images): train the protocol's DiT
(``--preset``), sample with its EMA weights, decode with the VAE that made the latents, and score the
images against the real ones: gFID and KID (TF-Inception; gFID marked UNRELIABLE below 2,048 images), SWD
(no network), plus the SWD of the VAE's own reconstructions (the floor a perfect DiT would reach) and the
validation flow-matching loss curve. Writes ``REPORT_DIR/report.json``, ``curves.png`` (all VAEs) and per
VAE ``NAME/result.json``, ``NAME/samples.png``, ``NAME/dit.ckpt``. Re-running resumes.

Usage::

    klvae-diffusability latents/sd-vae latents/eq-vae --out reports/eq --preset small
    klvae-diffusability latents/a latents/b --out r --preset smoke --vae latents/b=/ckpt/b.ckpt
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klvae.data.latent_format import LatentIndex, check_compatible
from klvae.diffusability.protocol import PRESETS, DiTProtocol, protocol_for
from klvae.errors import ConfigError, DataError

__all__ = ["SWD_MAX_IMAGES", "main", "run_benchmark"]

log = logging.getLogger(__name__)

SWD_MAX_IMAGES = 2048  # images per set in the SWD (patches make a few hundred enough; memory stays small)
_DECODE_BATCH = 32


@dataclass
class Reference:
    """The real images: uint8 (N, 3, R, R) for SWD, and Inception features for gFID/KID (None without)."""

    images: torch.Tensor
    features: torch.Tensor | None
    num_images: int


def _load_decoder(index: LatentIndex, override: str | None, device: torch.device):  # noqa: ANN202
    """The VAE that encoded ``index`` (or ``override``), checked against the network it recorded."""
    from klvae.errors import load_user_file
    from klvae.inference import InferenceVAE
    from klvae.interop.formats import build_vae, read_vae_weights

    path = override or index.vae["path"]
    weights = load_user_file(
        f"VAE {path} (decoder of {index.root})", lambda: read_vae_weights(path, use_ema=index.vae["ema"])
    )
    recorded, actual = index.vae["network"], weights.network
    for name in ("embed_dim", "use_quant_conv", "use_post_quant_conv"):
        if recorded[name] != getattr(actual, name):
            raise ConfigError(f"the VAE at {path} is not the one that encoded {index.root} ({name} "
                              f"{getattr(actual, name)} vs {recorded[name]}); pass --vae {index.root}=THE_VAE")  # fmt: skip
    if recorded["ddconfig"] != actual.ddconfig():
        raise ConfigError(f"the VAE at {path} has another network than the one that encoded {index.root}; "
                          f"pass --vae {index.root}=THE_VAE")  # fmt: skip
    return InferenceVAE(build_vae(weights)).to(device)


def _denormalize(x: torch.Tensor, index: LatentIndex, latent_norm: str) -> torch.Tensor:
    """Normalised latents (N, C, h, w) back to the VAE's space (the inverse of LatentShardDataset's)."""
    stats = index.stats
    if latent_norm == "global":
        return x / stats["scaling_factor"] + stats["shift_factor"]
    if latent_norm == "channel":
        std = torch.tensor(stats["per_channel_std"])[:, None, None]
        return x * std + torch.tensor(stats["per_channel_mean"])[:, None, None]
    return x


@torch.no_grad()
def _decode(vae: Any, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latents → uint8 images (N, 3, H, W), 8-bit as saved PNGs would be."""
    out = []
    for i in range(0, latents.shape[0], _DECODE_BATCH):
        x = vae.decode(latents[i : i + _DECODE_BATCH].to(device))
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _features(inception: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    from klvae.evaluation.metrics import inception_features

    return torch.cat([inception_features(inception, images[i : i + _DECODE_BATCH].to(device).float() / 255.0)
                      for i in range(0, images.shape[0], _DECODE_BATCH)])  # fmt: skip


def _load_reference(
    source: str, resolution: int, limit: int, total: int, inception: Any, device: torch.device
) -> Reference:
    """About ``limit`` real images, a random subset chosen by key hash from all ``total`` (never the first
    files: sorted names would give a few source photos or classes only)."""
    from klvae.data.latent_shards import hash_fraction
    from klvae.evaluation.data import image_batches

    fraction = min(1.0, 1.1 * limit / max(total, 1))  # ~10 % spare: the hash draw is binomial
    batches = image_batches(
        source, resolution, _DECODE_BATCH, select=lambda key: hash_fraction(key, 1) < fraction
    )
    images, features, kept, seen = [], [], 0, 0
    for x, _keys in batches:
        x = x[: limit - seen]
        u8 = ((x + 1) * 127.5).round().to(torch.uint8)
        if inception is not None:
            features.append(_features(inception, u8, device))
        if kept < SWD_MAX_IMAGES:
            images.append(u8[: SWD_MAX_IMAGES - kept])
            kept += images[-1].shape[0]
        seen += x.shape[0]
        if seen >= limit:
            break
    if not seen:
        raise DataError(f"no real image could be read from {source} for the reference set; pass --reference")
    log.info("reference: %d real images from %s at %d²", seen, source, resolution)
    return Reference(torch.cat(images), torch.cat(features) if features else None, seen)


def _score(
    fake: torch.Tensor, reference: Reference, inception: Any, device: torch.device, seed: int
) -> dict[str, Any]:
    from klvae.diffusability.signals import kernel_inception_distance, sliced_wasserstein
    from klvae.evaluation.evaluate import MIN_RFID_IMAGES
    from klvae.evaluation.metrics import FeatureStats, frechet_distance

    n = min(SWD_MAX_IMAGES, fake.shape[0], reference.images.shape[0])
    swd = sliced_wasserstein(_to_float(reference.images[:n]), _to_float(fake[:n]), seed=seed)
    scores: dict[str, Any] = {"swd": swd["swd"], "swd_per_level": swd["per_level"], "swd_images": n}
    if inception is not None and reference.features is not None:
        feats = _features(inception, fake, device)
        real_stats, fake_stats = FeatureStats(), FeatureStats()
        real_stats.update(reference.features)
        fake_stats.update(feats)
        scores["gfid"] = frechet_distance(*real_stats.mean_cov(), *fake_stats.mean_cov())
        scores["gfid_num_samples"] = feats.shape[0]
        scores["gfid_reference_images"] = reference.num_images
        scores["gfid_unreliable"] = min(feats.shape[0], reference.num_images) < MIN_RFID_IMAGES
        scores["kid"] = kernel_inception_distance(reference.features, feats)
    return scores


def _run_one(name: str, latent_dir: Path, protocol: DiTProtocol, out: Path, device: torch.device, precision: str,
             compile: bool, decoder: str | None, reference: Reference, inception: Any, num_workers: int,
             progress: bool, errors: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    from klvae.diffusability.flow import null_labels, sample_latents
    from klvae.diffusability.report import save_sample_grid, write_json
    from klvae.diffusability.signals import sliced_wasserstein
    from klvae.diffusability.train import train_dit

    index = LatentIndex.read(latent_dir)
    work = out / name
    trained = train_dit(latent_dir, protocol, work, device, precision, compile, num_workers, progress)
    generator = torch.Generator().manual_seed(protocol.seed + 2)
    if trained.num_classes:  # class-conditional: uniform random classes, no guidance
        labels = torch.randint(0, trained.num_classes, (protocol.num_samples,), generator=generator)
    else:
        labels = null_labels(trained.model, protocol.num_samples, torch.device("cpu"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        latents = sample_latents(trained.model, protocol.num_samples, index.latent_shape, labels,
                                 protocol.sampler_steps, generator, protocol.batch_size, device)  # fmt: skip
    vae = _load_decoder(index, decoder, device)
    samples = _decode(vae, _denormalize(latents, index, protocol.latent_norm), device)
    signals = _score(samples, reference, inception, device, protocol.seed)
    # The floor: the VAE's own reconstructions of held-out images (posterior means), scored the same way.
    held = _held_out(latent_dir, protocol)
    recon_latents = torch.stack([held[i]["latent"] for i in range(min(len(held), SWD_MAX_IMAGES))])
    recon = _decode(vae, recon_latents, device)
    signals["recon_swd"] = sliced_wasserstein(_to_float(reference.images[: recon.shape[0]]), _to_float(
        recon[: reference.images.shape[0]]), seed=protocol.seed)["swd"]  # fmt: skip
    signals["recon_images"] = min(recon.shape[0], reference.images.shape[0])
    signals["errors"] = dict(errors)
    save_sample_grid(_to_float(samples[:64]), work / "samples.png")
    result = {
        "name": name, "latent_dir": str(latent_dir.resolve()), "vae": {**index.vae, "decoded_with": decoder or index.vae["path"]},
        "latents": {"num_samples": index.num_samples, "latent_shape": list(index.latent_shape),
                    "resolution": index.record.get("resolution"), "flip": index.flip,
                    "classes": len(index.classes) if index.classes else None,
                    "scaling_factor": index.stats["scaling_factor"], "shift_factor": index.stats["shift_factor"]},
        "protocol": protocol.to_dict(), "conditional": bool(trained.num_classes),
        "train_seconds": trained.seconds, "resumed_from_step": trained.resumed_from,
        "val_source": trained.val_source, "curve": trained.curve,
        "final_val_loss": trained.curve[-1]["loss"] if trained.curve else math.nan,
        "ema_val_loss": trained.ema_val_loss, "final_train_loss": trained.train_loss,
        "signals": signals, "samples_png": str(work / "samples.png"),
    }  # fmt: skip
    write_json(work / "result.json", result)
    return result


def _held_out(latent_dir: Path, protocol: DiTProtocol) -> Any:
    """Held-out latents in the VAE's own space (posterior means), or all of them when none are held out."""
    from klvae.data.latent_shards import LatentShardDataset

    if protocol.val_fraction > 0:
        try:
            return LatentShardDataset(
                latent_dir, "val", protocol.val_fraction, False, False, "none", protocol.seed
            )
        except DataError:
            pass
    return LatentShardDataset(latent_dir, "all", 0.0, False, False, "none", protocol.seed)


def run_benchmark(
    latent_dirs: list[str], out: str | Path, protocol: DiTProtocol, names: list[str] | None = None,
    decoders: dict[str, str] | None = None, device: str | torch.device | None = None, precision: str | None = None,
    compile: bool | None = None, inception: str | None = None, reference: str | None = None,
    num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Run the protocol on every latent directory and write the report (see module docstring).

    Args:
        latent_dirs: ``klvae-encode`` directories of the same images, one per VAE.
        out: the report directory.
        protocol: from :func:`klvae.diffusability.protocol.protocol_for`.
        names: one name per directory (default: the directory names).
        decoders: latent directory → VAE path, for directories whose recorded VAE moved.
        device: default CUDA when available.
        precision: ``bf16`` (default on GPU) or ``fp32`` (default on CPU).
        compile: ``torch.compile`` the DiT (default on GPU).
        inception: TF-Inception path, None for klvae's cache, ``"none"`` to skip gFID/KID.
        reference: real images (folder or shards) instead of the data the latents record.

    Returns:
        The report (also ``out/report.json``).
    """
    from klvae.diffusability.report import save_curves_png, summary_table, write_json

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision must be bf16 or fp32, got {precision!r}")
    compile = device.type == "cuda" if compile is None else compile
    dirs = [Path(d).expanduser() for d in latent_dirs]
    names = names or [d.name for d in dirs]
    if len(names) != len(dirs) or len(set(names)) != len(names):
        raise ConfigError(
            f"need one distinct name per latent directory, got {names} for {len(dirs)}; pass --names"
        )
    decoders = {str(Path(k).expanduser().resolve()): v for k, v in (decoders or {}).items()}
    indexes = [LatentIndex.read(d) for d in dirs]
    check_compatible(indexes)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    inception_model = None
    if inception != "none":
        from klvae.evaluation.metrics import load_inception

        try:
            inception_model = load_inception(inception, device=device)
        except FileNotFoundError as e:
            errors["gfid"] = errors["kid"] = str(e)
            log.error("gFID and KID NOT computed (%s); reporting SWD and the loss curves only", e)
    source = reference or indexes[0].record["data"]
    total = indexes[0].num_samples + indexes[0].record.get("num_skipped", 0)
    ref = _load_reference(
        source, int(indexes[0].record["resolution"]), protocol.num_samples, total, inception_model, device
    )
    results = []
    for name, d in zip(names, dirs, strict=True):
        log.info("== %s: %s", name, d)
        results.append(_run_one(name, d, protocol, out, device, precision, compile,
                                decoders.get(str(d.resolve())), ref, inception_model, num_workers, progress,
                                errors))  # fmt: skip
    save_curves_png({r["name"]: r["curve"] for r in results}, out / "curves.png")
    table = summary_table(results)
    report = {
        "protocol": protocol.to_dict(),
        "environment": {"device": str(device), "precision": precision, "compiled": compile,
                        "torch": torch.__version__, "diffusers": _version("diffusers"),
                        "python": platform.python_version()},
        "reference": {"source": source, "num_images": ref.num_images, "swd_images": ref.images.shape[0]},
        "errors": errors, "vaes": results, "curves_png": str(out / "curves.png"), "table": table.splitlines(),
    }  # fmt: skip
    write_json(out / "report.json", report)
    log.info("diffusability (%s preset, %d steps, %d samples):\n%s\nreport: %s", protocol.preset, protocol.steps,
             protocol.num_samples, table, out / "report.json")  # fmt: skip
    return report


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="klvae-diffusability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("latent_dirs", nargs="+", help="klvae-encode directories of the same images, one per VAE")
    p.add_argument("--out", required=True, help="report directory (re-run to resume)")
    p.add_argument(
        "--preset", required=True, choices=sorted(PRESETS), help="protocol size (docs/diffusability.md)"
    )
    p.add_argument("--names", nargs="+", default=None, help="one name per latent directory")
    p.add_argument(
        "--vae",
        action="append",
        default=[],
        metavar="LATENT_DIR=VAE",
        help="decode LATENT_DIR with this VAE (when the recorded path moved); repeatable",
    )
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("num-samples", int),
                       ("sampler-steps", int), ("seed", int), ("val-every", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help="override the preset's value")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None, help="bf16 (GPU default) or fp32 (CPU default)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the DiT on GPU")
    p.add_argument(
        "--inception", default=None, help="TF-Inception TorchScript (default: klvae cache); none to skip"
    )
    p.add_argument(
        "--reference", default=None, help="real images to score against (default: the encoded data)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="latent-reading processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_cli

    return run_cli("klvae-diffusability", _parser(), _run, argv)


def _run(args: argparse.Namespace) -> None:
    decoders = {}
    for item in args.vae:
        if "=" not in item:
            raise ConfigError(f"--vae takes LATENT_DIR=VAE_PATH, got {item!r}")
        key, value = item.split("=", 1)
        decoders[key] = value
    protocol = protocol_for(args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            num_samples=args.num_samples, sampler_steps=args.sampler_steps, seed=args.seed,
                            val_every=args.val_every)  # fmt: skip
    run_benchmark(args.latent_dirs, args.out, protocol, args.names, decoders, args.device, args.precision,
                  False if args.no_compile else None, args.inception, args.reference, args.num_workers,
                  not args.no_progress)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
