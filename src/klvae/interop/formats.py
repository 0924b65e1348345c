"""The VAE file formats klvae reads and writes, in one registry, and the loader built on it.

=================== ============================================================ ==============
name                what                                                         written by
=================== ============================================================ ==============
``diffusers``       diffusers ``AutoencoderKL``/``AutoencoderKLFlux2`` folder        ``klvae-export``
                    (``config.json`` + weights; a pipeline folder's ``vae/``), or
                    a diffusers-layout file
``klvae-run``       a klvae training checkpoint (EMA weights preferred)          training
``flux2-ae``        FLUX.2's own ``ae.safetensors`` (black-forest-labs/flux2):      ``klvae-export
                    LDM names, quant convs inside encoder/decoder, ``bn.*``        --format flux2-ae``
``ldm-safetensors`` LDM-layout ``.safetensors``: bare (SDXL's ``sdxl_vae``,        ``klvae-export``
                    FLUX.1's ``ae.safetensors``) or a full SD/SD3 checkpoint
``ldm-ckpt``        LDM/SD ``.ckpt``/``.pth``/``.bin``: Lightning checkpoint or     ``klvae-export``
                    bare dict, with or without ``first_stage_model.``
=================== ============================================================ ==============

Every format reads into :class:`VAEWeights` (LDM-layout tensors + the :class:`~klvae.modules.config.NetworkConfig`
they belong to), which warm start (``ckpt_path``), :class:`klvae.inference.InferenceVAE`, export and evaluation
all consume. To add a format, subclass :class:`VAEFormat` and add an instance to :data:`FORMATS`; the loader and
``klvae-export --format`` pick it up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from klvae.interop.configs import diffusers_config, network_from_diffusers_config, network_from_state_dict
from klvae.interop.keys import (
    BATCH_NORM_PREFIX,
    EMA_PREFIX,
    LOSS_PREFIX,
    diffusers_to_ldm,
    flux2_to_ldm,
    is_diffusers_layout,
    is_flux2_layout,
    is_ldm_layout,
    ldm_to_diffusers,
    ldm_to_flux2,
    network_tensors,
    strip_first_stage,
)
from klvae.io.files import (
    SAFETENSORS_SUFFIX,
    TensorFile,
    read_tensor_file,
    save_safetensors,
    save_torch_file,
    write_atomically,
)
from klvae.modules.config import LatentBatchNormConfig, NetworkConfig
from klvae.modules.vae import KLAutoencoder

__all__ = [
    "FORMATS",
    "VAEFormat",
    "VAEWeights",
    "build_vae",
    "detect_format",
    "load_vae",
    "read_vae_weights",
    "with_batch_norm_statistics",
    "with_identity_quant_convs",
    "write_vae",
]

log = logging.getLogger(__name__)

# Metadata key of files klvae-export writes: network config and latent factors (a dict in a .ckpt, JSON in
# .safetensors metadata), so the file loads with its exact network and factors.
EXPORT_META_KEY = "klvae_export"
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


@dataclass
class VAEWeights:
    """Network weights in LDM layout plus what is known about them.

    Attributes:
        state_dict: the network's tensors (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``;
            FLUX.2-shaped: ``bn.*``).
        network: the network they belong to (recorded in the file, or read from the tensors' shapes).
        source_format: the :data:`FORMATS` name it was read from.
        scaling_factor: latent scale factor when the source records one (diffusers config, export), else None.
        shift_factor: latent shift when recorded, else None.
        used_ema: whether EMA weights were taken from a run checkpoint.
        loss_state_dict: ``loss.*`` tensors (discriminator, logvar) of an LDM/klvae training checkpoint, for
            warm starts that continue the GAN; empty otherwise.
    """

    state_dict: dict[str, torch.Tensor]
    network: NetworkConfig
    source_format: str
    scaling_factor: float | None = None
    shift_factor: float | None = None
    used_ema: bool = False
    loss_state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class Source:
    """A file or folder opened once: its tensors and metadata, plus a diffusers folder's ``config.json``."""

    path: Path  # what the user gave
    file: TensorFile
    diffusers_config: dict[str, Any] | None = None

    @property
    def keys(self) -> list[str]:
        return list(self.file.tensors)


@dataclass
class Contents:
    """What a format read: network tensors (LDM layout) and what the file records about them."""

    state_dict: dict[str, torch.Tensor]
    recorded: NetworkConfig | None = None  # None: read from the shapes
    scaling_factor: float | None = None
    shift_factor: float | None = None
    used_ema: bool = False
    loss_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


class VAEFormat:
    """One file format: how to recognise it, read it and (when ``writable``) write it."""

    name: ClassVar[str]
    description: ClassVar[str]
    writable: ClassVar[bool] = False
    suffixes: ClassVar[tuple[str, ...]] = ()  # file names it writes (none: a folder)
    by_suffix: ClassVar[bool] = True  # False: written only when named (--format), never chosen from a suffix

    def detect(self, source: Source) -> bool:
        """Whether ``source`` is in this format (formats are tried in :data:`FORMATS` order)."""
        raise NotImplementedError

    def read(self, source: Source, use_ema: bool | None) -> Contents:
        raise NotImplementedError

    def write(
        self,
        weights: VAEWeights,
        out: Path,
        scaling_factor: float | None,
        shift_factor: float | None,
        prefix: str = "",
    ) -> Path:
        raise ValueError(f"format {self.name!r} cannot be written")


def _export_meta(
    weights: VAEWeights, scaling_factor: float | None, shift_factor: float | None
) -> dict[str, Any]:
    network = weights.network
    return {
        "format": 1,
        "ddconfig": network.ddconfig(),
        "embed_dim": network.embed_dim,
        "use_quant_conv": network.use_quant_conv,
        "use_post_quant_conv": network.use_post_quant_conv,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "source_format": weights.source_format,
        "ema": weights.used_ema,
    }


def _read_ldm_layout(source: Source, rename: Callable[[dict], dict] | None = None) -> Contents:
    """Network and loss tensors of an LDM-layout file (``rename``: into LDM names first), with what a klvae
    export records."""
    state = strip_first_stage(source.file.tensors)
    if rename is not None:
        state = rename(state)
    contents = Contents(network_tensors(state), loss_state_dict=_loss_tensors(state))
    meta = source.file.metadata.get(EXPORT_META_KEY)
    if isinstance(meta, Mapping):
        contents.recorded = NetworkConfig.from_params(
            meta["ddconfig"],
            meta["embed_dim"],
            meta.get("use_quant_conv", True),
            meta.get("use_post_quant_conv", True),
        )
        contents.scaling_factor, contents.shift_factor = meta.get("scaling_factor"), meta.get("shift_factor")
    return contents


def _loss_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(LOSS_PREFIX)}


class DiffusersFormat(VAEFormat):
    name = "diffusers"
    description = (
        "diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.*), or its weights file"
    )
    writable = True

    def detect(self, source: Source) -> bool:
        return source.diffusers_config is not None or is_diffusers_layout(source.keys)

    def read(self, source: Source, use_ema: bool | None) -> Contents:
        contents = Contents(diffusers_to_ldm(source.file.tensors))
        config = source.diffusers_config
        if config is not None:
            contents.recorded = network_from_diffusers_config(config)
            if (
                contents.recorded.latent_batch_norm is None
            ):  # AutoencoderKLFlux2 normalises with its BatchNorm
                contents.scaling_factor, contents.shift_factor = (
                    config.get("scaling_factor"),
                    config.get("shift_factor"),
                )
        return contents

    def write(
        self,
        weights: VAEWeights,
        out: Path,
        scaling_factor: float | None,
        shift_factor: float | None,
        prefix: str = "",
    ) -> Path:
        config = diffusers_config(weights.network, scaling_factor, shift_factor)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            ldm_to_diffusers(weights.state_dict), out / DIFFUSERS_WEIGHT_NAMES[0], {"format": "pt"}
        )
        write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        return out


class KlvaeRunFormat(VAEFormat):
    name = "klvae-run"
    description = "klvae training checkpoint (last.ckpt, iter_*.ckpt, best): EMA weights when it has them"

    def detect(self, source: Source) -> bool:
        # Training records its progress under "klvae" and its arguments (with lossconfig) as hyper_parameters;
        # an EMA copy of the network exists only in klvae runs. LDM's own checkpoints have none of these.
        meta = source.file.metadata
        hparams = meta.get("hyper_parameters")
        return not source.file.is_safetensors and (
            "klvae" in meta
            or (isinstance(hparams, Mapping) and "lossconfig" in hparams)
            or any(k.startswith(EMA_PREFIX) for k in source.keys)
        )

    def read(self, source: Source, use_ema: bool | None) -> Contents:
        tensors = source.file.tensors
        has_ema = any(k.startswith(EMA_PREFIX) for k in tensors)
        if use_ema and not has_ema:
            raise ValueError(
                f"{source.path} has no EMA weights (no 'ema.*' keys); load it with use_ema=False"
            )
        used_ema = bool(has_ema and use_ema is not False)
        contents = Contents(
            network_tensors(tensors, EMA_PREFIX if used_ema else ""),
            used_ema=used_ema,
            loss_state_dict=_loss_tensors(tensors),
        )
        hparams = source.file.metadata.get("hyper_parameters") or {}
        if hparams.get("ddconfig") is not None and hparams.get("embed_dim") is not None:
            flags = {k: hparams.get(k) is not False for k in ("use_quant_conv", "use_post_quant_conv")}
            contents.recorded = NetworkConfig.from_params(hparams["ddconfig"], hparams["embed_dim"], **flags)
        return contents


class LdmLayoutFormat(VAEFormat):
    """LDM's own tensor names in one container; the two subclasses differ only in the container."""

    writable = True
    safetensors: ClassVar[bool]
    save: ClassVar[Callable[..., Path]]  # (tensors, path, metadata) -> path

    def detect(self, source: Source) -> bool:
        return source.file.is_safetensors == self.safetensors and is_ldm_layout(source.keys)

    def read(self, source: Source, use_ema: bool | None) -> Contents:
        return _read_ldm_layout(source)

    def write(
        self,
        weights: VAEWeights,
        out: Path,
        scaling_factor: float | None,
        shift_factor: float | None,
        prefix: str = "",
    ) -> Path:
        state = {prefix + k: v for k, v in weights.state_dict.items()}
        return type(self).save(
            state, out, {EXPORT_META_KEY: _export_meta(weights, scaling_factor, shift_factor)}
        )


class Flux2AeFormat(VAEFormat):
    """FLUX.2's own autoencoder file (black-forest-labs/flux2 ``load_ae``: ``load_state_dict(strict=True)``).

    LDM's names except that its Encoder owns ``quant_conv`` and its Decoder ``post_quant_conv``
    (``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``), plus the latent BatchNorm ``bn.*``. Written only
    when asked for (``--format flux2-ae``): an ``.safetensors`` name otherwise means ``ldm-safetensors``.
    """

    name = "flux2-ae"
    description = (
        "FLUX.2's own ae.safetensors (black-forest-labs/flux2): quant convs inside encoder/decoder, bn.*"
    )
    writable = True
    suffixes = (SAFETENSORS_SUFFIX,)
    by_suffix = False

    def detect(self, source: Source) -> bool:
        return is_flux2_layout(source.keys)

    def read(self, source: Source, use_ema: bool | None) -> Contents:
        return _read_ldm_layout(source, rename=flux2_to_ldm)

    def write(
        self,
        weights: VAEWeights,
        out: Path,
        scaling_factor: float | None,
        shift_factor: float | None,
        prefix: str = "",
    ) -> Path:
        network = weights.network
        if not (network.use_quant_conv and network.use_post_quant_conv) or network.latent_batch_norm is None:
            raise ValueError(
                "FLUX.2's AutoEncoder always has quant_conv, post_quant_conv and the latent BatchNorm; this "
                f"network has use_quant_conv={network.use_quant_conv}, use_post_quant_conv="
                f"{network.use_post_quant_conv}, latent_batch_norm={network.latent_batch_norm}"
            )
        if prefix:
            raise ValueError("prefix applies to the LDM layouts only, not to FLUX.2's ae.safetensors")
        meta = {EXPORT_META_KEY: _export_meta(weights, scaling_factor, shift_factor)}
        return save_safetensors(ldm_to_flux2(weights.state_dict), out, meta)


class LdmSafetensorsFormat(LdmLayoutFormat):
    name = "ldm-safetensors"
    description = "LDM-layout .safetensors: bare VAE (SDXL sdxl_vae, FLUX.1 ae) or full SD/SD3 checkpoint"
    suffixes = (SAFETENSORS_SUFFIX,)
    safetensors = True
    save = staticmethod(save_safetensors)


class LdmCkptFormat(LdmLayoutFormat):
    name = "ldm-ckpt"
    description = "LDM/SD torch checkpoint (.ckpt/.pth/.pt/.bin), {'state_dict': ...} or bare, any prefix"
    suffixes = (".ckpt", ".pth", ".pt", ".bin")
    safetensors = False
    save = staticmethod(save_torch_file)  # {"state_dict": ...}: what LDM's AutoencoderKL.init_from_ckpt reads


# Tried in this order: a folder or diffusers names first, then a klvae run (it records itself), then FLUX.2's
# nested quant convs (also LDM-like names), then LDM layout.
FORMATS: dict[str, VAEFormat] = {
    f.name: f
    for f in (DiffusersFormat(), KlvaeRunFormat(), Flux2AeFormat(), LdmSafetensorsFormat(), LdmCkptFormat())
}


def _open(path: Path) -> Source:
    if not path.is_dir():
        return Source(path, read_tensor_file(path))
    folder = path
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a full diffusers pipeline folder
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is a folder without config.json: not a diffusers VAE folder")
    weights = next((folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has config.json but none of {list(DIFFUSERS_WEIGHT_NAMES)}")
    try:
        diffusers_config = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None
    return Source(path, read_tensor_file(weights), diffusers_config)


def detect_format(source: Source) -> VAEFormat:
    """The first :data:`FORMATS` entry that recognises ``source``.

    Raises:
        ValueError: none does (the message lists a few keys and the formats tried).
    """
    for fmt in FORMATS.values():
        if fmt.detect(source):
            return fmt
    keys = source.keys
    raise ValueError(
        f"{source.path}: unrecognised VAE file ({len(keys)} tensors, e.g. {keys[:4]}). klvae reads: "
        + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values())
    )


def read_vae_weights(
    path: str | Path, ddconfig: Mapping[str, Any] | None = None, use_ema: bool | None = None
) -> VAEWeights:
    """Read VAE weights from any :data:`FORMATS` file or folder, in LDM layout.

    Args:
        path: a file (``.ckpt``/``.pth``/``.bin``/``.safetensors``) or a diffusers folder.
        ddconfig: LDM network config overriding what the file records or its shapes imply (needed only for
            bare state dicts whose widths are not multiples of 32, or a nominal resolution other than 256).
        use_ema: for run checkpoints with ``ema.*`` weights: None takes them when present, True requires
            them, False takes the live weights.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: unknown format, unsafe pickle, EMA requested but absent, a record that contradicts the
            tensors, or the network cannot be inferred.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint {str(path)!r} does not exist")
    source = _open(path)
    fmt = detect_format(source)
    contents = fmt.read(source, use_ema)
    if not contents.state_dict:
        raise ValueError(f"{path} ({fmt.name}) holds no autoencoder tensors (encoder.*, decoder.*)")
    _complete_batch_norm(contents.state_dict)
    from_tensors = network_from_state_dict(
        contents.state_dict, ddconfig=ddconfig if ddconfig is not None else _ddconfig_of(contents.recorded)
    )
    if contents.recorded is not None:
        _check_record(path, contents.recorded, from_tensors)
    log.info("read %s weights from %s%s", fmt.name, path, " (EMA)" if contents.used_ema else "")
    return VAEWeights(
        contents.state_dict,
        from_tensors,
        fmt.name,
        contents.scaling_factor,
        contents.shift_factor,
        contents.used_ema,
        contents.loss_state_dict,
    )


def _complete_batch_norm(state: dict[str, torch.Tensor]) -> None:
    """Add ``bn.num_batches_tracked`` (0) where only the statistics were saved.

    diffusers' FLUX.2 conversion copies ``bn.running_mean``/``bn.running_var`` alone, and torch's BatchNorm
    accepts a state dict without the counter; it changes no output (only a momentum-free BatchNorm reads it).
    """
    mean, count = BATCH_NORM_PREFIX + "running_mean", BATCH_NORM_PREFIX + "num_batches_tracked"
    if mean in state and count not in state:
        state[count] = torch.zeros((), dtype=torch.long)


def _ddconfig_of(network: NetworkConfig | None) -> dict[str, Any] | None:
    # With norm_num_groups even when the record did not spell it out: shapes cannot tell it.
    return None if network is None else {**network.ddconfig(), "norm_num_groups": network.norm_num_groups}


def _check_record(path: Path, recorded: NetworkConfig, actual: NetworkConfig) -> None:
    """The tensors decide embed_dim, the quant convs and the latent BatchNorm's shape; a file whose own record
    disagrees is damaged. (The BatchNorm's eps and momentum are not in the tensors: a given ddconfig sets them.)"""

    def shape(norm: LatentBatchNormConfig | None) -> tuple[tuple[int, int], bool] | None:
        return None if norm is None else (norm.patch_size, norm.affine)

    for name in ("embed_dim", "use_quant_conv", "use_post_quant_conv", "latent_batch_norm"):
        said, has = getattr(recorded, name), getattr(actual, name)
        if (shape(said) != shape(has)) if name == "latent_batch_norm" else said != has:
            raise ValueError(
                f"{path}: its config says {name}={said} but its tensors have {name}={has}; fix the config "
                "(e.g. config.json) to match the weights"
            )


def write_vae(
    weights: VAEWeights,
    out: str | Path,
    format: str | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    prefix: str = "",
) -> Path:
    """Write ``weights`` in a writable :data:`FORMATS` format (by default chosen from ``out``'s suffix).

    Args:
        weights: from :func:`read_vae_weights` (or built from a model's state dict).
        out: target file, or folder for ``diffusers``.
        format: a :data:`FORMATS` name; None: ``.safetensors`` → ldm-safetensors, ``.ckpt``/``.pth``/``.pt``/``.bin``
            → ldm-ckpt, no suffix → diffusers.
        scaling_factor, shift_factor: the latent factors (diffusers' config.json needs ``scaling_factor``;
            LDM-layout files record both in their metadata). None for a VAE with a latent BatchNorm (FLUX.2).
        prefix: LDM layouts: key prefix, e.g. ``"first_stage_model."`` to splice into a full SD checkpoint.

    Raises:
        ValueError: unknown or read-only format, a suffix that fits no format, a network the format
            cannot express (e.g. attention in the levels for diffusers), or factors for a latent BatchNorm VAE.
    """
    out = Path(out)
    if format is None:
        format = format_for_path(out)
    if format not in FORMATS or not FORMATS[format].writable:
        writable = [n for n, f in FORMATS.items() if f.writable]
        raise ValueError(f"cannot write format {format!r}; writable formats: {writable}")
    fmt = FORMATS[format]
    if fmt.suffixes and not out.name.endswith(fmt.suffixes):
        raise ValueError(f"{str(out)!r}: a {format} file is named *{'/*'.join(fmt.suffixes)}")
    if prefix and format == "diffusers":
        raise ValueError("prefix applies to the LDM layouts only, not to a diffusers folder")
    if weights.network.latent_batch_norm is not None and (scaling_factor, shift_factor) != (None, None):
        raise ValueError(
            f"this VAE normalises latents with its BatchNorm (FLUX.2), not with scaling_factor={scaling_factor}/"
            f"shift_factor={shift_factor}: pass neither (new statistics: with_batch_norm_statistics)"
        )
    written = fmt.write(weights, out, scaling_factor, shift_factor, prefix)
    log.info("wrote %s (%s, %d tensors, scaling_factor=%s, shift_factor=%s)", written, format,
             len(weights.state_dict), scaling_factor, shift_factor)  # fmt: skip
    return written


def format_for_path(out: Path) -> str:
    """The writable format a file name implies (see :func:`write_vae`)."""
    if not out.suffix:
        return "diffusers"
    # The longest matching ending wins: "vae.fp16.ckpt" belongs to a format naming ".fp16.ckpt" over ".ckpt".
    matches = [(len(sfx), name) for name, fmt in FORMATS.items() if fmt.writable and fmt.by_suffix
               for sfx in fmt.suffixes if out.name.endswith(sfx)]  # fmt: skip
    if matches:
        return max(matches)[1]
    raise ValueError(f"{str(out)!r}: name a .safetensors or .ckpt file (LDM layout), or a folder (diffusers)")


def with_identity_quant_convs(weights: VAEWeights) -> VAEWeights:
    """The same VAE with its absent quant convs written as identity 1×1 convs (weight I, bias 0).

    For code whose network always has them: LDM's and SD's ``AutoencoderKL`` (CompVis/latent-diffusion) build
    ``quant_conv``/``post_quant_conv`` unconditionally and ``init_from_ckpt`` loads non-strictly, so an SD3/
    FLUX.1-shaped file would leave them random there. The result is exact: an identity 1×1 conv returns its
    input (absent convs imply ``embed_dim == z_channels``). Returns ``weights`` itself when both exist.
    """
    network = weights.network
    if network.use_quant_conv and network.use_post_quant_conv:
        return weights
    like = weights.state_dict["decoder.conv_in.weight"]

    def identity(channels: int) -> dict[str, torch.Tensor]:
        eye = torch.eye(channels, dtype=like.dtype).reshape(channels, channels, 1, 1)
        return {"weight": eye, "bias": torch.zeros(channels, dtype=like.dtype)}

    state = dict(weights.state_dict)
    if not network.use_quant_conv:
        state.update({f"quant_conv.{k}": v for k, v in identity(2 * network.embed_dim).items()})
    if not network.use_post_quant_conv:
        state.update({f"post_quant_conv.{k}": v for k, v in identity(network.z_channels).items()})
    with_convs = dataclasses.replace(network, use_quant_conv=True, use_post_quant_conv=True)
    return dataclasses.replace(weights, state_dict=state, network=with_convs)


def with_batch_norm_statistics(weights: VAEWeights, running_mean: Any, running_var: Any) -> VAEWeights:
    """The same VAE with new latent BatchNorm statistics (FLUX.2-shaped networks only).

    ``running_mean``/``running_var`` are per channel of the patchified latents (C·p·q values, in
    :func:`klvae.modules.latent_norm.patchify`'s channel order), as ``klvae-latent-stats`` measures them
    (its ``batch_norm`` entry). The counter ``num_batches_tracked`` is kept.

    Raises:
        ValueError: the network has no latent BatchNorm, or the statistics have the wrong length, a
            non-finite value or a negative variance.
    """
    norm = weights.network.latent_batch_norm
    if norm is None:
        raise ValueError(
            "this VAE has no latent BatchNorm to fill; a FLUX.2-shaped network sets ddconfig.latent_batch_norm"
        )
    like = weights.state_dict[BATCH_NORM_PREFIX + "running_mean"]
    state = dict(weights.state_dict)
    for name, values in (("running_mean", running_mean), ("running_var", running_var)):
        tensor = torch.as_tensor(values, dtype=torch.float64)
        if tensor.shape != like.shape:
            raise ValueError(
                f"batch-norm {name} has {tensor.numel()} values; this VAE's BatchNorm has {like.numel()} "
                f"(embed_dim {weights.network.embed_dim} x patch {norm.patch_size[0]}x{norm.patch_size[1]})"
            )
        if not torch.isfinite(tensor).all() or (name == "running_var" and (tensor < 0).any()):
            raise ValueError(f"batch-norm {name} has non-finite or negative values")
        state[BATCH_NORM_PREFIX + name] = tensor.to(like.dtype)
    return dataclasses.replace(weights, state_dict=state)


def build_vae(weights: VAEWeights) -> KLAutoencoder:
    """Build a :class:`KLAutoencoder` for ``weights.network`` and load them strictly (eval mode, no grad).

    Raises:
        ValueError: missing/unexpected keys or shape mismatches, each named.
    """
    model = KLAutoencoder(weights.network)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights.state_dict))
    unexpected = sorted(set(weights.state_dict) - set(own))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:8]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:8]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[:4]})")
        raise ValueError(
            f"{weights.source_format} weights do not match the network {weights.network}: "
            + "; ".join(parts)
            + ". Pass the right ddconfig."
        )
    model.load_state_dict(weights.state_dict, strict=True)
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | Path, ddconfig: Mapping[str, Any] | None = None, use_ema: bool | None = None
) -> KLAutoencoder:
    """Load any supported VAE file or folder into klvae's network, strictly. See :func:`read_vae_weights`.

    Returns:
        :class:`KLAutoencoder` in eval mode with gradients off; ``encode(x)`` takes (B, 3, H, W) in [-1, 1].
    """
    return build_vae(read_vae_weights(path, ddconfig, use_ema))
