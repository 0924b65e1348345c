"""Apply :class:`klvae.perf.options.Optimizations` to a model once its device is known."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from klvae.perf.options import Optimizations

__all__ = ["AppliedOptimizations", "RegionBackend", "apply_runtime_optimizations", "make_adam"]

log = logging.getLogger(__name__)


class RegionBackend:
    """torch.compile backend of one region: counts the graphs it is asked to compile, then delegates.

    Every graph is a compile (seconds to minutes) and a region has a recompile limit after which dynamo
    silently runs it eager, so the count per region is what a run must keep small (logged per graph,
    asserted in tests). ``graphs`` counts forward graphs; AOT autograd's backward belongs to each.
    """

    def __init__(self, region: str, backend: str, mode: str | None) -> None:
        self.region, self.graphs = region, 0
        if backend == "inductor":
            # What torch.compile(backend="inductor", mode=mode) builds internally.
            self._compile = torch._TorchCompileInductorWrapper(mode, None, None)
        else:
            self._compile = torch._dynamo.lookup_backend(backend)

    def __getattr__(self, name: str) -> object:
        # Dynamo asks backends for optional hooks (get_compiler_config, reset, ...): the real backend's.
        if name.startswith("__") or name == "_compile":
            raise AttributeError(name)
        return getattr(self._compile, name)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        self.graphs += 1
        log.info("torch.compile: graph %d of region %s", self.graphs, self.region)
        limit = torch._dynamo.config.recompile_limit
        if self.graphs == limit:
            # Dynamo's own message is one warning among many; running eager silently costs speed and memory.
            log.warning(
                "torch.compile: region %s has compiled %d graphs; after recompile_limit (%d) recompilations "
                "dynamo runs it eager (slower, more memory). Input shapes keep changing: with aspect-ratio "
                "buckets or resolution phases set model.params.optimizations.compile_dynamic: true",
                self.region, self.graphs, limit,
            )  # fmt: skip
        return self._compile(gm, example_inputs)


@dataclass
class AppliedOptimizations:
    """What :func:`apply_runtime_optimizations` did.

    Attributes:
        descriptions: human-readable list (logged by the caller).
        backends: region name → its :class:`RegionBackend` (graph counts), for every compiled region.
    """

    descriptions: list[str] = field(default_factory=list)
    backends: dict[str, RegionBackend] = field(default_factory=dict)

    def graph_counts(self) -> dict[str, int]:
        """Graphs compiled so far per compiled region (empty when nothing is compiled)."""
        return {name: backend.graphs for name, backend in self.backends.items()}


def apply_runtime_optimizations(
    regions: Mapping[str, nn.Module], opts: Optimizations, device: torch.device
) -> AppliedOptimizations:
    """Convert memory formats, compile regions and set cudnn.benchmark for a run on ``device``.

    ``Module.compile()`` works in place, so parameters, state-dict keys, EMA swapping and checkpoints are
    unaffected; compilation itself happens lazily on the first call.

    Args:
        regions: the model's compilable regions by name (``AutoencoderKL.compile_regions()``).
        opts: the switches; ``compile_regions`` None means every region in ``regions``.
        device: where the run happens (the auto switches follow it).

    Raises:
        ValueError: ``compile_regions`` or ``channels_last`` names a region the model does not have.
    """
    applied = AppliedOptimizations()
    for field_name in ("compile_regions", "channels_last"):
        names = getattr(opts, field_name) or ()
        unknown = [n for n in names if n not in regions]
        if unknown:
            raise ValueError(
                f"optimizations.{field_name}: unknown region(s) {unknown}; this model has {sorted(regions)}"
            )
    for name in opts.channels_last:
        regions[name].to(memory_format=torch.channels_last)
        applied.descriptions.append(f"channels_last:{name}")
    if opts.compile_on(device):
        for name in opts.compile_regions if opts.compile_regions is not None else regions:
            backend = RegionBackend(name, opts.compile_backend, opts.compile_mode)
            applied.backends[name] = backend
            regions[name].compile(backend=backend, dynamic=opts.compile_dynamic)
            applied.descriptions.append(f"compile:{name}")
    if opts.cudnn_benchmark_on(device):
        # Autotunes conv algorithms once per input shape (once per bucket with aspect-ratio buckets).
        torch.backends.cudnn.benchmark = True
        applied.descriptions.append("cudnn.benchmark")
    return applied


def make_adam(
    params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float], fused: bool
) -> torch.optim.Adam:
    """Adam with LDM's hyper-parameters; ``fused=True`` updates all tensors in one kernel (CUDA)."""
    params = list(params)
    if fused and not all(p.is_floating_point() for p in params):
        raise ValueError("optimizations.fused_adam needs floating-point parameters; set it to false")
    # fused=None (not False) lets torch pick its foreach implementation when fused is off.
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if fused else None)
