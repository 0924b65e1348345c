"""Lightning callbacks and plugins of the training CLI. All cadences count training iterations."""

from klvae._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        (
            "AtomicCheckpointIO",
            "IterationCheckpoint",
            "TopKCheckpoint",
            "iteration_of",
        ),
        "klvae.callbacks.checkpointing",
    ),  # fmt: skip
    **dict.fromkeys(("ImageLogger", "image_schedule_hit", "make_grid"), "klvae.callbacks.images"),
    **dict.fromkeys(("IterationSeeder", "MaxIterations", "ThroughputMonitor"), "klvae.callbacks.monitoring"),
    "PreemptionHandler": "klvae.callbacks.preemption",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
