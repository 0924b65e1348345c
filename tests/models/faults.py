"""Fault injection for the training-step tests: a NaN in one optimizer's loss or gradient, on one rank, at
chosen iterations and micro-batches; and a signal sent to this process at a chosen batch.

Both are built from YAML like any klvae object (``model.target: tests.models.faults.FaultyAutoencoderKL``,
``lightning.callbacks.x.target: tests.models.faults.SignalAtBatch``), so the CLI and DDP tests inject faults
through the path users run.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from klvae.models.autoencoder import AutoencoderKL


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradients are all NaN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def inject(loss: torch.Tensor, kind: str) -> torch.Tensor:
    """``kind="loss"``: the value becomes NaN, gradients stay finite; ``"grad"``: the reverse."""
    if kind == "loss":
        return loss + float("nan")  # adding a constant: the gradient is untouched
    if kind == "grad":
        return _NaNGradient.apply(loss)
    raise ValueError(kind)


class FaultyAutoencoderKL(AutoencoderKL):
    """AutoencoderKL that makes the loss of one optimizer non-finite where ``faults`` say.

    Args:
        faults: each ``{optimizer: ae|disc, kind: loss|grad, iterations: [...], micro: [...] or null
            (every micro-batch of the round), rank: int or null (every rank)}``.
        **params: AutoencoderKL's.
    """

    def __init__(self, faults: Sequence[Mapping[str, Any]] = (), **params: Any) -> None:
        super().__init__(**params)
        self.faults = [dict(f) for f in faults]
        self.injected: list[tuple[str, int, int]] = []

    def _backward_and_step(self, optimizer: Any, loss: torch.Tensor, step: bool) -> None:
        name = "ae" if optimizer.optimizer is self.trainer.optimizers[0] else "disc"
        micro = self._micro_step % self.accumulate_grad_batches
        rank = self.trainer.global_rank
        for fault in self.faults:
            if (
                fault["optimizer"] == name
                and self.iteration in fault["iterations"]
                and (fault.get("micro") is None or micro in fault["micro"])
                and (fault.get("rank") is None or rank == fault["rank"])
            ):
                loss = inject(loss, fault["kind"])
                self.injected.append((name, self.iteration, micro))
        super()._backward_and_step(optimizer, loss, step)


class SignalAtBatch(pl.Callback):
    """Sends ``signum`` to this process at the start of training batch ``batch`` (counted from 0 in this
    launch): the handler sees it during that batch, wherever it falls in an accumulation round."""

    def __init__(self, batch: int, signum: int = int(signal.SIGTERM)) -> None:
        self.batch, self.signum = batch, signum
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)
        self.seen += 1
