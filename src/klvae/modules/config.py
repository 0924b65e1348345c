"""The network's shape as one typed, validated config: LDM's ``ddconfig`` keys plus the latent interface.

YAML keeps LDM's vocabulary (``model.params.ddconfig`` with ``ch``, ``ch_mult`` ...; ``embed_dim`` beside it),
so published configs and checkpoints load unchanged. Two optional keys describe the SD3/FLUX.1 family
(Esser et al. 2024, "Scaling Rectified Flow Transformers"; black-forest-labs/flux): the same Encoder/Decoder
with ``z_channels: 16`` and no 1×1 ``quant_conv`` / ``post_quant_conv`` (diffusers' ``use_quant_conv`` /
``use_post_quant_conv`` false). Without ``quant_conv`` the encoder's moments are the posterior; without
``post_quant_conv`` the latent goes straight into the decoder, so ``embed_dim`` must equal ``z_channels``.

FLUX.2's VAE (black-forest-labs/flux2 ``src/flux2/autoencoder.py``; diffusers ``AutoencoderKLFlux2``) is the
same network with ``z_channels: 32``, its quant convs, and a ``BatchNorm2d`` over 2×2-patchified latents whose
running statistics normalise the latents for the transformer. ``ddconfig.latent_batch_norm`` describes it
(:class:`LatentBatchNormConfig`; ``{}`` takes FLUX.2's values, absent or null: no BatchNorm, as every
other VAE). It is part of the network's tensors (``bn.running_mean`` ...), so it lives in ``ddconfig``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from klvae.errors import ConfigError
from klvae.modules.model import validate_ddconfig

__all__ = ["LatentBatchNormConfig", "NetworkConfig"]

# LDM's Encoder/Decoder knobs that no published VAE changes: accepted in a ddconfig at these values only.
_FIXED_LDM_KNOBS = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False}
_INTERFACE_KEYS = ("embed_dim", "use_quant_conv", "use_post_quant_conv")
# The keys of LDM's published kl-f8 ddconfig (CompVis/latent-diffusion, autoencoder_kl_32x32x4.yaml).
_LDM_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
    "attn_resolutions", "dropout",
)  # fmt: skip


@dataclass(frozen=True)
class LatentBatchNormConfig:
    """FLUX.2's latent normaliser: ``BatchNorm2d(prod(patch_size) · embed_dim)`` over patchified latents.

    Defaults are FLUX.2's (black-forest-labs/flux2 ``AutoEncoder``: ``bn_eps`` 1e-4, ``bn_momentum`` 0.1,
    ``ps`` [2, 2], ``affine=False``; diffusers ``AutoencoderKLFlux2``: ``batch_norm_eps``,
    ``batch_norm_momentum``, ``patch_size``). The running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) always exist: they *are* the normalisation, so there is no switch for them.

    Attributes:
        patch_size: (rows, columns) of latent pixels folded into channels before normalising.
        eps: added to ``running_var`` under the square root.
        momentum: BatchNorm's running-average momentum, recorded for the tools that update the statistics
            (klvae never does: they are measured with ``klvae-latent-stats`` or kept from the source).
        affine: a learnt scale and bias after normalising (FLUX.2: none; diffusers cannot hold them).
    """

    patch_size: tuple[int, int] = (2, 2)
    eps: float = 1e-4
    momentum: float = 0.1
    affine: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> LatentBatchNormConfig:
        """Build from the YAML mapping (``ddconfig.latent_batch_norm``); ``{}`` gives FLUX.2's values.

        Raises:
            ConfigError: a key that is not a field (a typo), named.
            ValueError: an invalid value, named.
        """
        if not isinstance(params, Mapping):
            raise ValueError(
                f"ddconfig.latent_batch_norm must be a mapping ({{}} for FLUX.2's) or null, got {params!r}"
            )
        names = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ConfigError(f"ddconfig.latent_batch_norm has unknown keys {unknown}; it takes {names}")
        values = dict(params)
        if "patch_size" in values:
            patch = values["patch_size"]
            values["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return cls(**values)

    def __post_init__(self) -> None:
        patch = self.patch_size
        if not (
            isinstance(patch, tuple)
            and len(patch) == 2
            and all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)
        ):
            raise ValueError(
                f"ddconfig.latent_batch_norm.patch_size must be two positive integers, got {patch!r}"
            )
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise ValueError(f"ddconfig.latent_batch_norm.eps must be > 0, got {self.eps!r}")
        momentum = self.momentum
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0 < momentum <= 1:
            raise ValueError(f"ddconfig.latent_batch_norm.momentum must be in (0, 1], got {momentum!r}")
        if not isinstance(self.affine, bool):
            raise ValueError(f"ddconfig.latent_batch_norm.affine must be true or false, got {self.affine!r}")

    @property
    def patch_area(self) -> int:
        """Latent pixels per patch (4 for FLUX.2's 2×2)."""
        return self.patch_size[0] * self.patch_size[1]

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping (plain types)."""
        return {"patch_size": list(self.patch_size), "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine}  # fmt: skip


@dataclass(frozen=True)
class NetworkConfig:
    """Encoder/Decoder shape (LDM ``ddconfig``) plus posterior channels and which quant convs exist.

    Defaults are the published kl-f8 network (LDM / Stable Diffusion / SDXL first stage).
    """

    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_num_groups: int = 32
    gradient_checkpointing: bool = False
    # FLUX.2's BatchNorm over patchified latents (None: no BatchNorm, every VAE before FLUX.2).
    latent_batch_norm: LatentBatchNormConfig | None = None
    # The latent interface (beside ddconfig in YAML): posterior channels and the 1×1 convs around it.
    embed_dim: int = 4
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Which ddconfig keys were given (ddconfig() writes LDM's keys plus these, never defaults nobody set).
    given_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_params(
        cls,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
    ) -> NetworkConfig:
        """Build from the YAML keys (``ddconfig`` mapping, ``embed_dim``, the two optional flags).

        Raises:
            ConfigError: a ``ddconfig`` key that is not a network field (a typo), named.
            ValueError: an invalid value, named (see :meth:`validate`).
        """
        names = {f.name for f in dataclasses.fields(cls)} - {*_INTERFACE_KEYS, "given_keys"}
        unknown = sorted(set(ddconfig) - names - set(_FIXED_LDM_KNOBS))
        if unknown:
            raise ConfigError(f"ddconfig has unknown keys {unknown}; the network takes {sorted(names)}")
        for key, value in _FIXED_LDM_KNOBS.items():
            if key in ddconfig and ddconfig[key] != value:
                raise ConfigError(
                    f"ddconfig.{key}={ddconfig[key]!r} is not supported: klvae's network is LDM's with "
                    f"{key}={value} (as every published kl-f8/SDXL/SD3/FLUX VAE); remove the key"
                )
        ddconfig = {k: v for k, v in ddconfig.items() if k not in _FIXED_LDM_KNOBS}
        values = {k: tuple(v) if k in ("ch_mult", "attn_resolutions") else v for k, v in ddconfig.items()}
        if values.get("latent_batch_norm") is not None:
            values["latent_batch_norm"] = LatentBatchNormConfig.from_params(values["latent_batch_norm"])
        return cls(
            **values,
            embed_dim=embed_dim,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            given_keys=tuple(ddconfig),
        )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The one place the network's values are checked; raises ``ValueError`` naming the bad value."""
        if not self.double_z:
            raise ValueError(
                "ddconfig.double_z must be true for a KL autoencoder (the encoder emits mean and logvar)"
            )
        validate_ddconfig(
            ch=self.ch, out_ch=self.out_ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions, dropout=self.dropout, in_channels=self.in_channels,
            resolution=self.resolution, z_channels=self.z_channels, norm_num_groups=self.norm_num_groups,
        )  # fmt: skip
        if self.latent_batch_norm is not None and not isinstance(
            self.latent_batch_norm, LatentBatchNormConfig
        ):
            raise ValueError(
                f"latent_batch_norm must be a LatentBatchNormConfig or None, got {self.latent_batch_norm!r}"
            )
        if not isinstance(self.embed_dim, int) or isinstance(self.embed_dim, bool) or self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive integer, got {self.embed_dim!r}")
        for name in ("use_quant_conv", "use_post_quant_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
            if not getattr(self, name) and self.embed_dim != self.z_channels:
                raise ValueError(
                    f"{name}: false needs embed_dim == ddconfig.z_channels (got {self.embed_dim} and "
                    f"{self.z_channels}): without the 1x1 conv the latent is the encoder/decoder's own "
                    "z_channels. Set embed_dim to z_channels or keep the conv."
                )

    @property
    def downsampling(self) -> int:
        """Image side / latent side (8 for kl-f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`klvae.modules.model.Encoder` and :class:`~klvae.modules.model.Decoder`."""
        return self._network_fields()

    def ddconfig(self) -> dict[str, Any]:
        """The LDM ``ddconfig`` dict (plain types): LDM's ten published keys, plus any other key given, plus
        ``latent_batch_norm`` whenever the network has one (a FLUX.2-shaped network must say so)."""
        fields = {**self._network_fields(), "latent_batch_norm": self.latent_batch_norm}
        keys = [*_LDM_KEYS, *(k for k in self.given_keys if k not in _LDM_KEYS)]
        if self.latent_batch_norm is not None and "latent_batch_norm" not in keys:
            keys.append("latent_batch_norm")
        out = {k: list(fields[k]) if isinstance(fields[k], tuple) else fields[k] for k in keys}
        if out.get("latent_batch_norm") is not None:
            out["latent_batch_norm"] = self.latent_batch_norm.to_dict()
        return out

    def _network_fields(self) -> dict[str, Any]:
        # Encoder/Decoder arguments only: the latent BatchNorm sits outside them (KLAutoencoder.bn).
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in (*_INTERFACE_KEYS, "given_keys", "latent_batch_norm")
        }
