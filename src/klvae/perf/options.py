"""Speed/memory switches of the training step (``model.params.optimizations`` in the YAML).

Every switch is numerically neutral up to floating-point reordering (tests compare each against the
plain fp32 path). ``None`` means "decide from the device": on when the run is on CUDA, off elsewhere,
because torch.compile and fused Adam pay off on GPUs and only cost start-up time on CPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["Optimizations", "parse_optimizations"]
_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "inductor" generates kernels; "aot_eager" traces forward and backward the same way but runs them with
# eager kernels (seconds instead of minutes to compile: the tests' stand-in for a GPU run).
_COMPILE_BACKENDS = ("inductor", "aot_eager")


@dataclasses.dataclass(frozen=True)
class Optimizations:
    """Switches applied by :class:`klvae.models.autoencoder.AutoencoderKL`.

    Attributes:
        compile: ``torch.compile`` the modules in ``compile_regions`` (``Module.compile()``, in place, so
            state-dict keys do not change). Inductor fuses GroupNorm + SiLU and recomputes cheap
            pointwise ops in backward, which roughly halves activation memory. ``None``: on with CUDA.
        compile_mode: torch.compile ``mode`` (``"reduce-overhead"`` adds CUDA graphs). ``None``: default.
        compile_backend: ``"inductor"`` (default) or ``"aot_eager"`` (same graphs, eager kernels).
        compile_dynamic: torch.compile's ``dynamic``. ``None`` (torch's default): the first shape gets a
            static graph and a changed shape one marked dynamic; ``True``: graphs symbolic in batch size,
            height and width from the start (for aspect-ratio buckets and resolution phases: a bounded
            number of graphs, however many shapes); ``False``: one static graph per shape (dynamo runs
            a region eager after ``recompile_limit`` graphs).
        compile_regions: which regions to compile; None (default): all the model has (``encoder``,
            ``decoder``, ``lpips`` (the VGG trunk), ``discriminator``, and a loss term's backbone such as
            ``vf_backbone``; ``AutoencoderKL.compile_regions()``). Each is compiled whole (no graph breaks;
            checked in tests/test_perf.py).
        fused_adam: ``torch.optim.Adam(fused=True)`` (one kernel for all parameters). ``None``: on with CUDA.
        channels_last: regions whose weights are converted to NHWC. Empty by default: GroupNorm in NHWC
            made the autoencoder slower in earlier H100 measurements; the VGG trunk (no GroupNorm) may gain.
        lpips_target_no_grad: compute LPIPS by hand (:func:`klvae.modules.perceptual.lpips_distance`) with the
            features of the input image under ``no_grad``. Same value and gradients as ``lpips.LPIPS``.
        gradient_checkpointing: recompute each ResnetBlock in backward (~1/3 more autoencoder compute for
            much less activation memory; for 512² training). ``False`` leaves ``ddconfig``'s setting alone.
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` at fit start (fixed shapes → fastest conv
            algorithms). ``None``: on with CUDA.
    """

    compile: bool | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    compile_dynamic: bool | None = None
    compile_regions: tuple[str, ...] | None = None
    fused_adam: bool | None = None
    channels_last: tuple[str, ...] = ()
    lpips_target_no_grad: bool = False
    gradient_checkpointing: bool = False
    cudnn_benchmark: bool | None = None

    def __post_init__(self) -> None:
        for name in ("compile", "compile_dynamic", "fused_adam", "cudnn_benchmark"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"optimizations.{name} must be true, false or null (auto), got {value!r}")
        for name in ("lpips_target_no_grad", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"optimizations.{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile_mode not in _COMPILE_MODES:
            raise ValueError(
                f"optimizations.compile_mode must be one of {_COMPILE_MODES}, got {self.compile_mode!r}"
            )
        if self.compile_backend not in _COMPILE_BACKENDS:
            raise ValueError(
                f"optimizations.compile_backend must be one of {_COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        if self.compile_mode is not None and self.compile_backend != "inductor":
            raise ValueError(
                f"optimizations.compile_mode {self.compile_mode!r} needs compile_backend 'inductor', "
                f"got {self.compile_backend!r}"
            )
        for name in ("compile_regions", "channels_last"):
            regions = getattr(self, name)
            if regions is None and name == "compile_regions":
                continue
            if (
                isinstance(regions, str)
                or not isinstance(regions, Sequence)
                or not all(isinstance(r, str) for r in regions)
            ):
                raise ValueError(f"optimizations.{name} must be a list of region names, got {regions!r}")
            object.__setattr__(self, name, tuple(regions))  # names are checked against the model's regions

    @staticmethod
    def _auto(value: bool | None, device: torch.device | str) -> bool:
        return (torch.device(device).type == "cuda") if value is None else value

    def compile_on(self, device: torch.device | str) -> bool:
        return self._auto(self.compile, device)

    def fused_adam_on(self, device: torch.device | str) -> bool:
        return self._auto(self.fused_adam, device)

    def cudnn_benchmark_on(self, device: torch.device | str) -> bool:
        return self._auto(self.cudnn_benchmark, device) and torch.device(device).type == "cuda"

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (lists, not tuples) for hparams and JSON."""
        out = dataclasses.asdict(self)
        out["channels_last"] = list(self.channels_last)
        out["compile_regions"] = None if self.compile_regions is None else list(self.compile_regions)
        return out


def parse_optimizations(config: Mapping[str, Any] | Optimizations | None) -> Optimizations:
    """Build :class:`Optimizations` from a YAML mapping; an unknown key is a ``ValueError`` naming it.

    Args:
        config: ``None`` (all defaults), an :class:`Optimizations`, or a mapping of its field names.
    """
    if config is None:
        return Optimizations()
    if isinstance(config, Optimizations):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(
            f"optimizations must be a mapping of switches, got {type(config).__name__}: {config!r}"
        )
    fields = {f.name for f in dataclasses.fields(Optimizations)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown optimizations key(s) {unknown}; valid keys: {sorted(fields)}")
    return Optimizations(**dict(config))
