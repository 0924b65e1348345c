"""VAE files in and out: one safe reader (``files``), the key tables LDM ↔ diffusers (``keys``), the format
registry (``formats``: klvae run, LDM/SD ``.ckpt``, LDM-layout ``.safetensors`` incl. FLUX's ``ae.safetensors``,
diffusers folder) and ``klvae-export`` (``export``)."""

from klvae._lazy import lazy_exports

_EXPORTS = {
    "VAEWeights": "klvae.interop.formats",
    "load_vae": "klvae.interop.formats",
    "read_vae_weights": "klvae.interop.formats",
    "write_vae": "klvae.interop.formats",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
