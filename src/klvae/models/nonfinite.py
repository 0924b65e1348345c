"""The non-finite guard: an update whose loss or gradient is NaN/inf is skipped and counted, on every rank alike.

Three rules make the decision safe under DDP, accumulation and loss scaling without a host sync per step:

1. **A non-finite loss poisons its own gradients** (:meth:`NonFiniteGuard.poison_if_nonfinite`): after each
   micro-batch's backward, one gradient element of the optimizer that loss belongs to becomes NaN when the
   loss is not finite (a device ``where``; finite losses add an exact 0). The decision then rests on the
   gradients alone, and the gradients are what the ranks all-reduce (``klvae.training.ddp``): a NaN loss on
   one rank reaches every rank's gradients, so every rank skips the same update, and a NaN in the first
   micro-batch of an accumulation round stays in the accumulated gradient. A loss whose *value* is NaN but
   whose gradients are finite (the adaptive GAN weight's detached value, a logged-only term) is caught too.
   Under ``16-mixed`` the GradScaler's own inf check sees the same NaN, so it skips the fused or plain
   optimizer step that the guard counts as skipped (the scaler writes its own ``found_inf`` into fused
   optimizers, replacing any flag set before).
2. **One verdict per update** (:meth:`NonFiniteGuard.judge`): the total norm of the (all-reduced, unscaled)
   gradients is finite or it is not. Identical gradients give the identical verdict on every rank.
3. **One streak per optimizer**: a healthy discriminator update does not hide an autoencoder that has not
   stepped for days (the streak counts that optimizer's updates in a row, whatever the other one does).

The counters live on the device (read on the host every ``max_in_a_row`` iterations, by :meth:`check`) and go
into the checkpoint (:meth:`counters` / :meth:`load_counters`), so ``train/skipped_nonfinite`` counts the run,
not one launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from klvae.errors import TrainingDivergedError

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError"]


class NonFiniteTrainingError(TrainingDivergedError):
    """Too many updates in a row had a non-finite loss or gradient: the run has diverged."""


class NonFiniteGuard(nn.Module):
    """Per-optimizer skip counters and the stop rule of the non-finite guard (see the module docstring).

    Args:
        names: one name per optimizer, in the order of ``configure_optimizers`` (used in messages and logs).
        max_in_a_row: this many skipped updates in a row of one optimizer stop the run.

    Buffers (device, not in the state dict; :meth:`counters` puts them in the checkpoint):
        skipped: (n,) updates skipped so far, per optimizer.
        streak: (n,) current run of skipped updates, per optimizer.
        worst: (n,) longest run since the run started, per optimizer (what :meth:`check` reads).
        last_bad: (n,) whether each optimizer's latest update was skipped (EMA follows it).
    """

    def __init__(self, names: Sequence[str], max_in_a_row: int) -> None:
        super().__init__()
        if not isinstance(max_in_a_row, int) or isinstance(max_in_a_row, bool) or max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_in_a_row must be an integer >= 1, got {max_in_a_row!r}")
        self.names = tuple(names)
        self.max_in_a_row = max_in_a_row
        n = len(self.names)
        for name in ("skipped", "streak", "worst"):
            self.register_buffer(name, torch.zeros(n, dtype=torch.long), persistent=False)
        self.register_buffer("last_bad", torch.zeros(n, dtype=torch.bool), persistent=False)

    @staticmethod
    @torch.no_grad()
    def poison_if_nonfinite(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
        """Make one gradient element of ``params`` NaN when ``loss`` is not finite (call after its backward).

        ``params`` are the parameters of the optimizer the loss trains; the first one's gradient is used
        (created as zeros if the backward gave it none, as the all-reduce would).
        """
        if not params:
            return
        first = params[0]
        if first.grad is None:
            first.grad = torch.zeros_like(first)
        nan_or_zero = torch.where(torch.isfinite(loss.detach()).all(), 0.0, float("nan"))
        first.grad.view(-1)[:1].add_(nan_or_zero.to(first.grad.dtype))

    @torch.no_grad()
    def judge(self, index: int, grad_norm: torch.Tensor) -> torch.Tensor:
        """Record optimizer ``index``'s update with this total gradient norm; returns ``bad`` (0-dim bool).

        No host sync: every counter update is a device op.
        """
        bad = ~torch.isfinite(grad_norm)
        streak = (self.streak[index] + 1) * bad
        self.streak[index] = streak
        self.worst[index] = torch.maximum(self.worst[index], streak)
        self.skipped[index] += bad.long()
        self.last_bad[index] = bad
        return bad

    def total_skipped(self) -> torch.Tensor:
        """Skipped updates of all optimizers together (a device scalar, for logging)."""
        return self.skipped.sum()

    def check(self, iteration: int) -> None:
        """Raise once an optimizer skipped ``max_in_a_row`` updates in a row (one host sync per call)."""
        worst = self.worst.tolist()
        for name, streak in zip(self.names, worst, strict=True):
            if streak >= self.max_in_a_row:
                skipped = ", ".join(
                    f"{n} {s}" for n, s in zip(self.names, self.skipped.tolist(), strict=True)
                )
                raise NonFiniteTrainingError(
                    f"{streak} {name} updates in a row had a non-finite loss or gradient (last checked at "
                    f"iteration {iteration}; skipped so far: {skipped}): training has diverged. Lower "
                    "model.params.learning_rate (or base_learning_rate), set model.params.gradient_clip_val, "
                    "use bf16-mixed instead of 16-mixed, or resume from an earlier checkpoint."
                )

    def counters(self) -> dict[str, list[int]]:
        """Plain ints for the checkpoint (``weights_only``-safe)."""
        return {name: getattr(self, name).tolist() for name in ("skipped", "streak", "worst")}

    @torch.no_grad()
    def load_counters(self, state: dict[str, list[int]]) -> None:
        for name, values in state.items():
            buffer = getattr(self, name)
            buffer.copy_(torch.as_tensor(values, dtype=buffer.dtype))
