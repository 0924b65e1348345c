"""Learning-rate warm-up and decay, counted in training iterations (``AutoencoderKL.iteration``).

LDM's kl-f8 trained at a constant learning rate, which stays the default. The options here are the usual
ones of later recipes: a linear warm-up (LDM's ``LambdaLinearScheduler`` for its diffusion models, the
diffusers training scripts' ``--lr_warmup_steps``), then constant, cosine or linear decay to
``min_factor`` of the base rate at ``total_iterations``.

The factor is a pure function of the iteration, so a resumed run continues on the same curve with no
scheduler state to save, and ``trainer.global_step`` (two optimizer steps per batch) never enters it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LRSchedule"]

_DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class LRSchedule:
    """lr(iteration) = base lr · :meth:`factor` (iteration).

    Args:
        warmup_iterations: linear ramp from ``1 / warmup_iterations`` to 1 over this many iterations
            (0: no warm-up).
        decay: after the warm-up, ``"constant"`` (LDM), ``"cosine"`` or ``"linear"`` down to ``min_factor``.
        total_iterations: iteration at which the decay reaches ``min_factor`` (needed for cosine/linear);
            after it the factor stays at ``min_factor``.
        min_factor: final fraction of the base learning rate.
    """

    warmup_iterations: int = 0
    decay: str = "constant"
    total_iterations: int | None = None
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_iterations, int) or self.warmup_iterations < 0:
            raise ValueError(
                f"lr_schedule.warmup_iterations must be an int >= 0, got {self.warmup_iterations!r}"
            )
        if self.decay not in _DECAYS:
            raise ValueError(f"lr_schedule.decay must be one of {_DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError(f"lr_schedule.min_factor must be in [0, 1], got {self.min_factor!r}")
        if self.decay != "constant":
            total = self.total_iterations
            if not isinstance(total, int) or total <= self.warmup_iterations:
                raise ValueError(
                    f"lr_schedule.decay={self.decay!r} needs total_iterations, an int greater than "
                    f"warmup_iterations ({self.warmup_iterations}), got {total!r}; e.g. lightning.max_iterations"
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> LRSchedule:
        """Build from the ``model.params.lr_schedule`` mapping (None: constant, no warm-up)."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"lr_schedule: unknown key(s) {unknown}; accepted keys are {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**config)

    @property
    def is_constant(self) -> bool:
        return self.warmup_iterations == 0 and self.decay == "constant"

    def factor(self, iteration: int) -> float:
        """Multiplier of the base learning rate for the update made at ``iteration`` (0-based)."""
        if iteration < self.warmup_iterations:
            return (iteration + 1) / self.warmup_iterations
        if self.decay == "constant":
            return 1.0
        assert self.total_iterations is not None  # checked in __post_init__
        span = self.total_iterations - self.warmup_iterations
        progress = min(1.0, (iteration - self.warmup_iterations) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_factor + (1.0 - self.min_factor) * shape
