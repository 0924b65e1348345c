"""Lightning callbacks and plugins of the training CLI. All cadences count training iterations."""

from klvae.callbacks.checkpointing import (
    AtomicCheckpointIO,
    IterationCheckpoint,
    TopKCheckpoint,
    atomic_torch_save,
    iteration_of,
    load_checkpoint,
)
from klvae.callbacks.images import ImageLogger, image_schedule_hit, make_grid
from klvae.callbacks.monitoring import IterationSeeder, MaxIterations, ThroughputMonitor
from klvae.callbacks.preemption import PreemptionHandler

__all__ = [
    "AtomicCheckpointIO",
    "ImageLogger",
    "IterationCheckpoint",
    "IterationSeeder",
    "MaxIterations",
    "PreemptionHandler",
    "ThroughputMonitor",
    "TopKCheckpoint",
    "atomic_torch_save",
    "image_schedule_hit",
    "iteration_of",
    "load_checkpoint",
    "make_grid",
]
