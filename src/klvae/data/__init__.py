"""Data: webdataset shards and image folders -> ``{"image": float32 (B, 3, H, W) in [-1, 1], ...}`` batches."""

from klvae._lazy import lazy_exports

_EXPORTS = {
    "DataStatsCallback": "klvae.data.stats",
    "ImageFolderDataModule": "klvae.data.folder",
    "ImageTransform": "klvae.data.transforms",
    "LatentShardDataModule": "klvae.data.latent_shards",
    "LatentShardDataset": "klvae.data.latent_shards",
    "WebDataModule": "klvae.data.webdataset_module",
    "write_shards": "klvae.data.make_shards",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
