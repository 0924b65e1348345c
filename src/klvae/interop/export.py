"""Export a VAE (usually a klvae run checkpoint, EMA weights preferred) for the tools that consume it.

The format follows from ``--out`` (or ``--format``, a :data:`klvae.interop.formats.FORMATS` name):

* ``my-vae.safetensors`` (``ldm-safetensors``): LDM-layout flat keys ``encoder.*`` ..., what SD/SDXL/FLUX.1
  single-file loaders and ``diffusers.AutoencoderKL.from_single_file`` read.
* ``my-vae.ckpt`` (``ldm-ckpt``): ``{"state_dict": ...}``, what LDM/SD's ``AutoencoderKL.init_from_ckpt`` reads
  via ``first_stage_config``.
* ``my-vae/`` (``diffusers``): a folder with ``config.json`` (built here, offline) and
  ``diffusion_pytorch_model.safetensors`` that ``diffusers.AutoencoderKL.from_pretrained`` loads
  (``AutoencoderKLFlux2`` for a FLUX.2-shaped VAE).
* ``--format flux2-ae --out ae.safetensors``: FLUX.2's own layout (black-forest-labs/flux2 ``load_ae``).

A FLUX.2-shaped VAE normalises latents with its BatchNorm, not with factors: ``--batch-norm-stats`` fills its
statistics from ``klvae-latent-stats`` (a new VAE; never for a fine-tune of FLUX.2's, whose transformer was
trained on the published ones).

Usage::

    klvae-export logs/run/checkpoints/last.ckpt --out my-vae --latent-stats stats.json
    klvae-export logs/run/checkpoints/last.ckpt --out my-vae.safetensors
    klvae-export logs/run/checkpoints/last.ckpt --out my-flux2-vae --batch-norm-stats stats.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from klvae.interop.discriminator import discriminator_path_for, write_discriminator
from klvae.interop.formats import (
    FORMATS,
    VAEWeights,
    format_for_path,
    read_vae_weights,
    with_batch_norm_statistics,
    with_identity_quant_convs,
    write_vae,
)

__all__ = ["main", "resolve_latent_factors"]

from klvae.io.files import load_torch_file

log = logging.getLogger(__name__)

SD_SCALING_FACTOR = 0.18215


def resolve_latent_factors(
    weights: VAEWeights,
    scaling_factor: float | None,
    shift_factor: float | None,
    latent_stats: str | Path | None,
    with_shift: bool = True,
) -> tuple[float | None, float | None]:
    """Pick (scaling_factor, shift_factor): explicit values, then a ``klvae-latent-stats`` JSON, then the
    source's own record (diffusers config / earlier export). A stats file gives both (diffusers/FLUX
    normalise as ``(z - shift) * scale``); ``with_shift=False`` writes no shift unless one is given
    explicitly, for pipelines that ignore ``shift_factor`` (SD 1.x/2.x, SDXL)."""
    if latent_stats is not None:
        stats = json.loads(Path(latent_stats).read_text())
        if scaling_factor is None:
            scaling_factor = float(stats["scaling_factor"])
        if shift_factor is None and with_shift:
            shift_factor = float(stats["shift_factor"])
    if scaling_factor is None:
        scaling_factor = weights.scaling_factor
    if shift_factor is None and with_shift:
        shift_factor = weights.shift_factor
    return scaling_factor, shift_factor


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klvae-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="klvae run checkpoint, LDM/SD .ckpt, .safetensors or diffusers folder")
    writable = [name for name, fmt in FORMATS.items() if fmt.writable]
    p.add_argument(
        "--format",
        choices=("ldm", *writable),
        default=None,
        help="target format (default: from --out: .safetensors/.ckpt → LDM layout, a folder → diffusers); "
        "'ldm' picks the container from the suffix",
    )
    p.add_argument("--out", required=True, help="output file (LDM: .safetensors/.ckpt) or folder (diffusers)")
    p.add_argument("--scaling-factor", type=float, default=None, help="latent scale (1/std of latents)")
    p.add_argument(
        "--shift-factor", type=float, default=None, help="latent shift (mean), written to config.json"
    )
    p.add_argument(
        "--latent-stats", default=None, help="JSON from klvae-latent-stats (scaling/shift factors)"
    )
    p.add_argument(
        "--no-shift",
        dest="with_shift",
        action="store_false",
        help="write no shift_factor unless --shift-factor is given (SD/SDXL pipelines ignore it)",
    )
    ema = p.add_mutually_exclusive_group()
    ema.add_argument(
        "--ema", dest="use_ema", action="store_const", const=True, default=None, help="require EMA weights"
    )
    ema.add_argument(
        "--no-ema", dest="use_ema", action="store_const", const=False, help="export live (non-EMA) weights"
    )
    p.add_argument("--prefix", default="", help="ldm format: key prefix, e.g. first_stage_model.")
    p.add_argument(
        "--identity-quant-convs",
        action="store_true",
        help="write absent quant convs (SD3/FLUX.1-shaped VAEs) as exact identity 1x1 convs, for LDM/SD code "
        "whose AutoencoderKL always has them",
    )
    p.add_argument(
        "--batch-norm-stats",
        default=None,
        help="JSON from klvae-latent-stats: write its per-channel statistics of patchified latents into the "
        "latent BatchNorm of a FLUX.2-shaped VAE (a new VAE only: a FLUX.2 fine-tune keeps the published ones)",
    )
    p.add_argument(
        "--include-discriminator",
        action="store_true",
        help="also write the checkpoint's discriminator (loss.discriminator.*) beside the export "
        "(my-vae/discriminator.safetensors or my-vae.discriminator.safetensors), for model.params.disc_ckpt_path",
    )
    p.add_argument("--ddconfig", default=None, help="JSON ddconfig when the checkpoint does not record one")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_cli

    return run_cli("klvae-export", _parser(), _run, argv)


def _json_arg(flag: str, text: str) -> Any:
    from klvae.errors import ConfigError

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e}): {text[:80]!r}") from None


def _run(args: argparse.Namespace) -> None:
    from klvae.errors import ConfigError, load_user_file

    ddconfig = _json_arg("--ddconfig", args.ddconfig) if args.ddconfig else None
    if args.latent_stats is not None:
        stats_path = Path(args.latent_stats)
        if not stats_path.is_file():
            raise ConfigError(
                f"--latent-stats {args.latent_stats!r}: no such file (write it with klvae-latent-stats)"
            )
        stats = _json_arg(f"--latent-stats {args.latent_stats}", stats_path.read_text())
        if not isinstance(stats, dict) or "scaling_factor" not in stats:
            raise ConfigError(
                f"--latent-stats {args.latent_stats!r}: no 'scaling_factor' (not klvae-latent-stats output)"
            )
    weights = load_user_file(
        f"checkpoint {args.checkpoint}",
        lambda: read_vae_weights(args.checkpoint, ddconfig=ddconfig, use_ema=args.use_ema),
    )
    if args.identity_quant_convs:
        weights = with_identity_quant_convs(weights)
    if args.batch_norm_stats is not None:
        weights = load_user_file(
            f"--batch-norm-stats {args.batch_norm_stats}",
            lambda: _fill_batch_norm(weights, args.batch_norm_stats),
        )
    if weights.network.latent_batch_norm is not None:
        flags = {"--scaling-factor": args.scaling_factor, "--shift-factor": args.shift_factor,
                 "--latent-stats": args.latent_stats}  # fmt: skip
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: this VAE normalises latents with its BatchNorm (FLUX.2), not with factors; "
                "to fill a new VAE's BatchNorm pass --batch-norm-stats stats.json"
            )
    scale, shift = resolve_latent_factors(
        weights, args.scaling_factor, args.shift_factor, args.latent_stats, args.with_shift
    )
    out = Path(args.out)
    fmt = load_user_file(
        f"--out {args.out}",
        lambda: format_for_path(out) if args.format in (None, "ldm") else args.format,
    )
    if args.format == "ldm" and fmt == "diffusers":
        raise ConfigError(f"--format ldm: name a .safetensors or .ckpt file, got --out {args.out!r}")
    network = weights.network
    if fmt.startswith("ldm") and not (network.use_quant_conv and network.use_post_quant_conv):
        log.warning(
            "this VAE has no quant_conv/post_quant_conv (SD3/FLUX.1 shape): LDM/SD's AutoencoderKL always builds "
            "them and loads non-strictly, so they would stay random there; pass --identity-quant-convs for "
            "that code (diffusers and FLUX.1 read the file as it is)"
        )
    if fmt.startswith("ldm") and network.latent_batch_norm is not None:
        log.warning(
            "FLUX.2-shaped VAE in LDM layout (quant convs at the top level, bn.* kept): klvae and diffusers' key "
            "conversion read it; FLUX.2's own code reads --format flux2-ae"
        )
    if fmt == "diffusers" and scale is None and network.latent_batch_norm is None:
        raise ConfigError(
            "the diffusers config needs scaling_factor. Compute it with klvae-latent-stats and "
            f"pass --latent-stats stats.json, or pass --scaling-factor ({SD_SCALING_FACTOR} is right only for "
            "SD's VAE and decoder-only fine-tunes of it)."
        )
    if args.include_discriminator and not any(
        k.startswith("loss.discriminator.") for k in weights.loss_state_dict
    ):
        raise ConfigError(
            f"--include-discriminator: {args.checkpoint} holds no discriminator (loss.discriminator.*); only "
            "klvae and LDM training checkpoints do"
        )
    load_user_file(
        f"--out {args.out}", lambda: write_vae(weights, out, fmt, scale, shift, prefix=args.prefix)
    )
    if args.include_discriminator:
        target = discriminator_path_for(out)
        config = _discriminator_config(args.checkpoint)
        load_user_file(
            f"--out {args.out}", lambda: write_discriminator(weights.loss_state_dict, target, config)
        )
        log.info("wrote the discriminator (%s) to %s", (config or {}).get("target", "PatchGAN"), target)
    log.info(
        "exported %s weights%s from %s -> %s (scaling_factor=%s, shift_factor=%s)",
        weights.source_format, " (EMA)" if weights.used_ema else "", args.checkpoint, args.out, scale, shift,
    )  # fmt: skip


def _discriminator_config(checkpoint: str) -> dict[str, Any] | None:
    """The ``{target, params}`` of a klvae run's discriminator, from its recorded lossconfig (None: LDM's
    PatchGAN, whose shape the tensors give)."""
    path = Path(checkpoint)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    try:
        loss = (
            load_torch_file(path, mmap=True)
            .get("hyper_parameters", {})
            .get("lossconfig", {})
            .get("params", {})
        )
    except (ValueError, AttributeError):
        return None
    if loss.get("discriminator_config"):
        return dict(loss["discriminator_config"])
    shape = {"input_nc": loss.get("disc_in_channels", 3), "ndf": loss.get("disc_ndf", 64),
             "n_layers": loss.get("disc_num_layers", 3), "use_actnorm": loss.get("use_actnorm", False)}  # fmt: skip
    return {"target": "klvae.modules.discriminator.NLayerDiscriminator", "params": shape}


def _fill_batch_norm(weights: VAEWeights, stats_path: str) -> VAEWeights:
    from klvae.errors import ConfigError

    path = Path(stats_path)
    if not path.is_file():
        raise ConfigError(
            f"--batch-norm-stats {stats_path!r}: no such file (write it with klvae-latent-stats)"
        )
    stats = _json_arg(f"--batch-norm-stats {stats_path}", path.read_text())
    entry = stats.get("batch_norm") if isinstance(stats, dict) else None
    if not isinstance(entry, dict) or not {"running_mean", "running_var"} <= set(entry):
        raise ConfigError(
            f"--batch-norm-stats {stats_path!r}: no 'batch_norm' running_mean/running_var (klvae-latent-stats "
            "writes them for a VAE with ddconfig.latent_batch_norm)"
        )
    norm = weights.network.latent_batch_norm
    if norm is not None and list(entry.get("patch_size", norm.patch_size)) != list(norm.patch_size):
        raise ConfigError(
            f"--batch-norm-stats {stats_path!r}: measured with patch {entry['patch_size']}, this VAE's BatchNorm "
            f"uses {list(norm.patch_size)}"
        )
    return with_batch_norm_statistics(weights, entry["running_mean"], entry["running_var"])


if __name__ == "__main__":
    raise SystemExit(main())
