"""The LightningModule (``AutoencoderKL``) and its training helpers: EMA and the learning-rate schedule."""

from klvae._lazy import lazy_exports

_EXPORTS = {
    "AutoencoderKL": "klvae.models.autoencoder",
    "LRSchedule": "klvae.models.lr_schedule",
    "ModuleEMA": "klvae.models.ema",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
