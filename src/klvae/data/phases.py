"""Resolution phases: train at one resolution and batch size, then switch at a given iteration.

Recent autoencoders train most of a run at low resolution and adapt at high resolution at the end
(DC-AE, Chen et al. 2024: low-resolution training, then high-resolution latent adaptation; SDXL's VAE
and the FLUX VAEs are used at 1024²). ``data.params.phases`` is that schedule::

    phases:
      - {iterations: 200000, size: 256, batch_size: 12}   # iterations 0 .. 199999
      - {size: 512, batch_size: 4}                         # from iteration 200000 to the end

Each phase sets the training crop side (or, with ``buckets``, the target whose area the buckets
approximate), the per-GPU batch size and optionally ``resize_to``. Phases count training iterations
(``AutoencoderKL.iteration``), the clock of the learning-rate schedule and of every cadence; the data
side converts them to batches with the model's ``accumulate_grad_batches``. A batch's phase is a
function of its position in the run, so a resume (whose loader position is in the checkpoint) continues
in the right phase, and the learning-rate schedule, a pure function of the iteration, is untouched by a
phase change. Validation keeps ``data.params.size`` for the whole run, so its metrics stay comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from klvae.errors import ConfigError

__all__ = ["PHASE_KEY", "Phase", "PhaseSchedule"]

# Batch key holding the index of the phase a training batch was made in (popped by DataStatsCallback).
PHASE_KEY = "_phase"

_PHASE_KEYS = ("iterations", "size", "batch_size", "resize_to")


@dataclass(frozen=True)
class Phase:
    """One phase: ``iterations`` long (None: until training ends; only the last phase) at ``size``."""

    size: int
    batch_size: int
    iterations: int | None = None
    resize_to: int | None = None


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be an int >= 1, got {value!r}")
    return value


class PhaseSchedule:
    """The phases of a run and the iteration at which each starts.

    Args:
        phases: the phases in order; every one but the last needs ``iterations``.
        configured: whether ``data.params.phases`` was given (batches then carry ``_phase``).
    """

    def __init__(self, phases: Sequence[Phase], configured: bool = True) -> None:
        if not phases:
            raise ConfigError("phases: give at least one {iterations, size, batch_size}")
        self.phases = tuple(phases)
        self.configured = configured
        starts, at = [], 0
        for i, phase in enumerate(self.phases):
            starts.append(at)
            if phase.iterations is None:
                if i != len(self.phases) - 1:
                    raise ConfigError(f"phases[{i}]: only the last phase may leave out 'iterations'")
                continue
            at += phase.iterations
        self.starts = tuple(starts)

    @classmethod
    def from_config(
        cls, config: Sequence[Mapping[str, Any]] | None, size: int, batch_size: int, resize_to: int | None
    ) -> PhaseSchedule:
        """``data.params.phases`` (None: one phase at ``size``/``batch_size``/``resize_to`` for the whole run).

        A phase's ``batch_size`` defaults to ``data.params.batch_size``; its ``resize_to`` to null.
        """
        if config is None:
            return cls([Phase(size, batch_size, None, resize_to)], configured=False)
        if not isinstance(config, Sequence) or isinstance(config, str) or not config:
            raise ConfigError(
                f"phases: expected a non-empty list of {{iterations, size, batch_size}}, got {config!r}"
            )
        phases = []
        for i, block in enumerate(config):
            where = f"phases[{i}]"
            if not isinstance(block, Mapping):
                raise ConfigError(f"{where}: expected a mapping with keys {list(_PHASE_KEYS)}, got {block!r}")
            unknown = sorted(set(block) - set(_PHASE_KEYS))
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; accepted keys are {list(_PHASE_KEYS)}")
            if "size" not in block:
                raise ConfigError(f"{where}: missing 'size' (the training resolution of this phase)")
            iterations = block.get("iterations")
            phases.append(
                Phase(
                    size=_positive_int(block["size"], f"{where}.size"),
                    batch_size=_positive_int(block.get("batch_size", batch_size), f"{where}.batch_size"),
                    iterations=None
                    if iterations is None
                    else _positive_int(iterations, f"{where}.iterations"),
                    resize_to=block.get("resize_to"),
                )
            )
        return cls(phases, configured=True)

    def __len__(self) -> int:
        return len(self.phases)

    def __getitem__(self, index: int) -> Phase:
        return self.phases[index]

    def index_at(self, iteration: int) -> int:
        """Index of the phase that trains iteration ``iteration`` (0-based; the last phase runs on)."""
        index = 0
        for i, start in enumerate(self.starts):
            if iteration >= start:
                index = i
        return index

    def index_of_batch(self, position: int, batches_per_iteration: int = 1) -> int:
        """Phase of the training batch at ``position`` (batches of this rank since the run began)."""
        return self.index_at(position // batches_per_iteration)

    def describe(self, index: int) -> str:
        """E.g. ``"phase 2/2: 512², batch 4"`` (for the progress bar and the logs)."""
        phase = self.phases[index]
        return f"phase {index + 1}/{len(self.phases)}: {phase.size}², batch {phase.batch_size}"
