"""Data: webdataset shards and image folders -> ``{"image": float32 (B, 3, H, W) in [-1, 1], ...}`` batches."""

from klvae.data.folder import ImageFolderDataModule
from klvae.data.make_shards import write_shards
from klvae.data.stats import DataStatsCallback
from klvae.data.transforms import ImageTransform
from klvae.data.webdataset_module import WebDataModule

__all__ = ["DataStatsCallback", "ImageFolderDataModule", "ImageTransform", "WebDataModule", "write_shards"]
