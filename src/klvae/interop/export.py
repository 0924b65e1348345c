"""Export a VAE (usually a klvae run checkpoint, EMA weights preferred) for the tools that consume it.

* ``--format ldm``: an LDM-layout ``.safetensors`` (flat keys ``encoder.*`` ...) or ``.ckpt``
  (``{"state_dict": ...}``, what LDM/SD's ``AutoencoderKL.init_from_ckpt`` reads via ``first_stage_config``).
* ``--format diffusers``: a folder with ``config.json`` (built here, offline) and
  ``diffusion_pytorch_model.safetensors`` that ``diffusers.AutoencoderKL.from_pretrained`` loads.

Usage::

    klvae-export logs/run/checkpoints/last.ckpt --format diffusers --out my-vae --latent-stats stats.json
    klvae-export logs/run/checkpoints/last.ckpt --format ldm --out my-vae.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from klvae.interop.formats import EXPORT_META_KEY, VAEWeights, read_vae_weights
from klvae.interop.keys import diffusers_config_from_ddconfig, ldm_to_diffusers

__all__ = ["export_diffusers", "export_ldm", "main", "resolve_latent_factors"]

log = logging.getLogger(__name__)

SD_SCALING_FACTOR = 0.18215


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage; fp32 unless the caller converted on purpose.
    return {k: v.detach().contiguous().clone() for k, v in state_dict.items()}


def _export_meta(
    weights: VAEWeights, scaling_factor: float | None, shift_factor: float | None
) -> dict[str, Any]:
    return {
        "format": 1,
        "ddconfig": weights.ddconfig,
        "embed_dim": weights.embed_dim,
        "use_quant_conv": weights.use_quant_conv,
        "use_post_quant_conv": weights.use_post_quant_conv,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "source_format": weights.source_format,
        "ema": weights.used_ema,
    }


def export_ldm(
    weights: VAEWeights,
    out: str | Path,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    prefix: str = "",
) -> Path:
    """Write LDM-layout weights to ``out`` (``.safetensors`` or ``.ckpt``).

    Args:
        weights: network weights (from :func:`klvae.interop.formats.read_vae_weights`).
        out: target file; the suffix picks the container.
        scaling_factor: recorded in the metadata (LDM itself keeps it in the diffusion model's config).
        shift_factor: recorded in the metadata.
        prefix: key prefix, e.g. ``"first_stage_model."`` to splice into a full SD checkpoint.

    Returns:
        The written path.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: v for k, v in _contiguous(weights.state_dict).items()}
    meta = _export_meta(weights, scaling_factor, shift_factor)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out), metadata={EXPORT_META_KEY: json.dumps(meta)})
    elif out.suffix in (".ckpt", ".pth", ".pt"):
        # Plain containers only, so torch.load(weights_only=True) reads it back.
        torch.save({"state_dict": state, EXPORT_META_KEY: meta}, out)
    else:
        raise ValueError(f"--out {str(out)!r}: use a .safetensors or .ckpt file name for the ldm format")
    log.info("wrote %d LDM-layout tensors to %s", len(state), out)
    return out


def export_diffusers(
    weights: VAEWeights, folder: str | Path, scaling_factor: float, shift_factor: float | None = None
) -> Path:
    """Write a diffusers ``AutoencoderKL`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

    Raises:
        ValueError: the network has no diffusers equivalent (see :func:`klvae.interop.keys.check_diffusers_compatible`).
    """
    from safetensors.torch import save_file

    config = diffusers_config_from_ddconfig(
        weights.ddconfig,
        weights.embed_dim,
        scaling_factor,
        shift_factor,
        use_quant_conv=weights.use_quant_conv,
        use_post_quant_conv=weights.use_post_quant_conv,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _contiguous(ldm_to_diffusers(weights.state_dict))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "wrote diffusers AutoencoderKL (%d tensors, scaling_factor=%g) to %s",
        len(state),
        scaling_factor,
        folder,
    )
    return folder


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
    p.add_argument("--format", choices=("ldm", "diffusers"), required=True, help="target layout")
    p.add_argument("--out", required=True, help="output file (ldm: .safetensors/.ckpt) or folder (diffusers)")
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
    p.add_argument("--ddconfig", default=None, help="JSON ddconfig when the checkpoint does not record one")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors too")
    return p


def main(argv: list[str] | None = None) -> int:
    from klvae.errors import run_tool

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    return run_tool("klvae-export", lambda: _run(args), args.traceback)


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
    scale, shift = resolve_latent_factors(
        weights, args.scaling_factor, args.shift_factor, args.latent_stats, args.with_shift
    )
    if args.format == "diffusers":
        if scale is None:
            raise ConfigError(
                "the diffusers config needs scaling_factor. Compute it with klvae-latent-stats and "
                f"pass --latent-stats stats.json, or pass --scaling-factor ({SD_SCALING_FACTOR} is right only for "
                "SD's VAE and decoder-only fine-tunes of it)."
            )
        export_diffusers(weights, args.out, scale, shift)
    else:
        export_ldm(weights, args.out, scale, shift, prefix=args.prefix)
    log.info(
        "exported %s weights%s from %s -> %s (scaling_factor=%s, shift_factor=%s)",
        weights.source_format, " (EMA)" if weights.used_ema else "", args.checkpoint, args.out, scale, shift,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
