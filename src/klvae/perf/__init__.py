"""Speed switches of the training step: the ``optimizations`` block, compile regions, fused Adam, LPIPS.

Measurement code (timing, FLOP counting, the diffusers reference) lives in ``benchmarks/``, outside the package.
"""

from klvae._lazy import lazy_exports

_EXPORTS = {"Optimizations": "klvae.perf.options", "parse_optimizations": "klvae.perf.options"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
