"""klvae: train the KL-regularised f=8 autoencoder of Latent/Stable Diffusion on Lightning 2.

The public API (imported lazily, so ``import klvae`` is instant)::

    from klvae import InferenceVAE, load_vae            # use a VAE: any LDM/SD/SDXL/SD3/FLUX/diffusers file
    from klvae import AutoencoderKL, NetworkConfig      # train one (usually through main.py and a YAML)
    from klvae import read_vae_weights, write_vae  # move weights between formats (klvae.interop)
    from klvae import load_config, instantiate_from_config             # LDM's config vocabulary

Subpackages by audience: ``modules`` (network and loss, no Lightning), ``models`` (the LightningModule),
``data``, ``callbacks`` and ``training`` (the ``main.py`` pipeline), ``interop`` (file formats),
``evaluation`` (metrics and ``klvae-eval``), ``pretrained`` (local weight files), ``perf`` (speed switches).
"""

from klvae._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AutoencoderKL": "klvae.models.autoencoder",
    "KLAutoencoder": "klvae.modules.vae",
    "NetworkConfig": "klvae.modules.config",
    "LPIPSWithDiscriminator": "klvae.modules.losses",
    "InferenceVAE": "klvae.inference",
    "VAEWeights": "klvae.interop.formats",
    "load_vae": "klvae.interop.formats",
    "read_vae_weights": "klvae.interop.formats",
    "write_vae": "klvae.interop.formats",
    "ImageFolderDataModule": "klvae.data.folder",
    "WebDataModule": "klvae.data.webdataset_module",
    "instantiate_from_config": "klvae.util",
    "load_config": "klvae.util",
    "ConfigError": "klvae.errors",
    "DataError": "klvae.errors",
}
__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
