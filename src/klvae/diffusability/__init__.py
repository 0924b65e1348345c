"""Is the VAE good for generation? Latent caching (``klvae-encode``: ``encode``, ``sources``) and the
diffusability benchmark (``klvae-diffusability``: a small diffusers DiT trained on the latents, ``protocol``,
``flow``, ``train``, ``signals``, ``report``, ``benchmark``). See docs/diffusability.md and docs/latents.md.

Importing this package imports nothing heavy; diffusers is imported only when a DiT is built.
"""

from klvae._lazy import lazy_exports

_EXPORTS = {
    "encode_to_shards": "klvae.diffusability.encode",
    "DiTProtocol": "klvae.diffusability.protocol",
    "PRESETS": "klvae.diffusability.protocol",
    "protocol_for": "klvae.diffusability.protocol",
    "train_dit": "klvae.diffusability.train",
    "run_benchmark": "klvae.diffusability.benchmark",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
