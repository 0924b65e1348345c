"""klvae: train the KL-regularised f=8 autoencoder of Latent/Stable Diffusion on Lightning 2."""

__version__ = "0.1.0"
