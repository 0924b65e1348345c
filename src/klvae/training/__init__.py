"""The ``main.py`` pipeline: flags (``cli``), config → model/data/Trainer (``launch``, ``trainer``), run
directories, loggers, the end-of-run summary and the per-optimizer DDP strategy."""

from klvae._lazy import lazy_exports

_EXPORTS = {
    "main": "klvae.training.cli",
    "prepare": "klvae.training.launch",
    "plan_trainer": "klvae.training.trainer",
    "PerOptimizerDDPStrategy": "klvae.training.ddp",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
