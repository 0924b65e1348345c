"""Apply :class:`klvae.perf.options.Optimizations` to a model once its device is known."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from klvae.perf.options import Optimizations

__all__ = ["RegionBackend", "apply_runtime_optimizations", "graph_counts", "make_adam", "region_modules"]

log = logging.getLogger(__name__)


def region_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The compilable regions of an :class:`AutoencoderKL`-like model (missing ones are left out)."""
    loss = getattr(model, "loss", None)
    lpips_model = getattr(loss, "perceptual_loss", None)
    regions = {
        "encoder": getattr(model, "encoder", None),
        "decoder": getattr(model, "decoder", None),
        # Only the VGG trunk: the LPIPS heads are tiny, and both LPIPS code paths call the trunk.
        "lpips": getattr(lpips_model, "net", None),
        "discriminator": getattr(loss, "discriminator", None),
    }
    return {name: m for name, m in regions.items() if m is not None}


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


def graph_counts(model: nn.Module) -> dict[str, int]:
    """Graphs compiled so far per compiled region of ``model`` (empty when nothing is compiled)."""
    counts = {}
    for name, module in region_modules(model).items():
        backend = getattr(module, "_klvae_compile_backend", None)
        if backend is not None:
            counts[name] = backend.graphs
    return counts


def apply_runtime_optimizations(
    model: nn.Module,
    opts: Optimizations,
    device: torch.device,
    regions: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Convert memory formats, compile regions and set cudnn.benchmark for a run on ``device``.

    ``Module.compile()`` works in place, so parameters, state-dict keys, EMA swapping and checkpoints are
    unaffected; compilation itself happens lazily on the first call.

    Returns:
        Human-readable list of what was applied (logged by the caller).
    """
    regions = dict(region_modules(model) if regions is None else regions)
    applied: list[str] = []
    for name in opts.channels_last:
        if name in regions:
            regions[name].to(memory_format=torch.channels_last)
            applied.append(f"channels_last:{name}")
    if opts.compile_on(device):
        for name in opts.compile_regions:
            if name in regions:
                backend = RegionBackend(name, opts.compile_backend, opts.compile_mode)
                regions[name]._klvae_compile_backend = backend  # read by graph_counts
                regions[name].compile(backend=backend, dynamic=opts.compile_dynamic)
                applied.append(f"compile:{name}")
    if opts.cudnn_benchmark_on(device):
        # Autotunes conv algorithms once per input shape (once per bucket with aspect-ratio buckets).
        torch.backends.cudnn.benchmark = True
        applied.append("cudnn.benchmark")
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
