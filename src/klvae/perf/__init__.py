"""Performance helpers: optimisation switches, a faster LPIPS assembly, FLOP counting, benchmark utilities."""

from klvae.perf.options import Optimizations, parse_optimizations

__all__ = ["Optimizations", "parse_optimizations"]
