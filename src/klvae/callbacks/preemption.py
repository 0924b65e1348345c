"""SLURM-friendly preemption: SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) write ``last.ckpt`` and stop cleanly.

SLURM sends SIGUSR1 ahead of the time limit when the job has ``#SBATCH --signal=USR1@90`` and SIGTERM on
preemption. The handler only sets a flag; the checkpoint is written at the end of the current update round
(a consistent state: with ``accumulate_grad_batches`` > 1 the round's remaining batches are trained first,
since the gradients accumulated so far are not part of a checkpoint), by every rank together, then
training stops. On SIGUSR1 inside a SLURM job
the job is requeued (``scontrol requeue``), and the requeued job resumes from the run directory
(see ``klvae.training.run_dir``). Lightning's own SLURM auto-requeue is switched off by the CLI so that exactly one
mechanism handles the signal. DataLoader workers ignore these signals (``klvae.data.workers``), so a
signal sent to the whole process group, as schedulers and terminals do, reaches the main process only.

Exit status (:attr:`PreemptionHandler.exit_code`): ``128 + signal number`` (143 for SIGTERM, 130 for
Ctrl-C, 138 for SIGUSR1), what a process killed by that signal reports to a shell or scheduler, so
retry/requeue policies that look for "terminated by a signal" keep working; 0 after SIGUSR1 when this
process requeued the SLURM job itself (the job is not failed, it continues). A second Ctrl-C stops at
once, without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from klvae.callbacks.checkpointing import IterationCheckpoint, at_round_boundary, iteration_of

__all__ = ["PreemptionHandler"]

log = logging.getLogger(__name__)


class PreemptionHandler(Callback):
    """Turns SIGUSR1/SIGTERM into "save ``last.ckpt`` after this update round, then stop".

    Args:
        checkpointer: the run's ``IterationCheckpoint`` (its ``save_last`` writes the file).
        requeue: on SIGUSR1 inside a SLURM job, run ``scontrol requeue $SLURM_JOB_ID`` after saving.
    """

    def __init__(self, checkpointer: IterationCheckpoint, requeue: bool = True) -> None:
        self.checkpointer = checkpointer
        self.requeue = requeue
        self.received: int | None = None  # the signal number, once one arrived
        self.saved_path: str | None = None
        self.requeued = False
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int | None:
        """The process exit status after a signal stopped training (see the module docstring); else None."""
        if self.received is None:
            return None
        return 0 if self.requeued else 128 + int(self.received)

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 (signal handler signature)
        # Only set a flag: a signal handler runs between two bytecodes, anywhere in a training step.
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signum
        if signum == signal.SIGINT:
            rank_zero_only(log.warning)(
                "Ctrl-C: writing last.ckpt after this batch (press again to stop now)"
            )
            return
        # Lightning's own SIGTERM handler is not chained: it would raise SIGTERMException out of the loop
        # at the next batch, skipping the orderly stop (and the loader workers' shutdown) this one does.

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Registered here, after Lightning installed its own SIGTERM handler, which we chain to.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not at_round_boundary(pl_module):
            return  # every rank is inside the same round: finish it, then save (no collective here)
        local = self.received is not None or trainer.received_sigterm
        # All ranks must agree (save_checkpoint has a barrier); SLURM may signal them at different times.
        stop = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if not stop or self.saved_path is not None:
            return
        self._save(trainer, pl_module)
        trainer.should_stop = True
        if self.received == signal.SIGUSR1 and self.requeue and trainer.is_global_zero:
            self.requeued = self._requeue()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM during validation: Lightning stops inside the validation loop, before any train batch end.
        # Weights and optimizers are consistent there; single-process only (no collectives mid-teardown).
        if (
            isinstance(exception, SIGTERMException | KeyboardInterrupt)
            and self.saved_path is None
            and trainer.world_size == 1
            and not (isinstance(exception, KeyboardInterrupt) and self.received == signal.SIGINT)
        ):
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.received is None:  # Lightning's own SIGTERM flag without ours (handler not yet installed)
            self.received = signal.SIGTERM
        name = signal.Signals(self.received).name
        saved = self.checkpointer.save_last(trainer, pl_module)
        self.saved_path = str(saved) if saved is not None else ""
        what = f"wrote {saved}" if saved is not None else "did NOT write last.ckpt (weights are NaN/inf)"
        rank_zero_only(log.info)(
            f"{name} received: {what} at iteration {iteration_of(pl_module)}; stopping. "
            f"Resume with: python main.py -t -r {self.checkpointer.dirpath.parent}"
        )

    @staticmethod
    def _requeue() -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
        if not job:
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("could not requeue SLURM job %s: %s", job, e)
            return False
        if result == 0:
            rank_zero_only(log.info)(f"requeued SLURM job {job}")
            return True
        log.warning("scontrol requeue %s failed with exit code %d", job, result)
        return False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}
