"""Performance helpers: optimisation switches, a faster LPIPS assembly, FLOP counting, benchmark utilities."""

from klvae._lazy import lazy_exports

_EXPORTS = {"Optimizations": "klvae.perf.options", "parse_optimizations": "klvae.perf.options"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
