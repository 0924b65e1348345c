"""What every klvae DataLoader worker does first: leave stop signals to the main process.

A scheduler (SLURM, Kubernetes, a terminal's Ctrl-C) signals the whole process group. If the loader
workers died of that signal, the main process would fail with "DataLoader worker ... is killed by signal"
before it could write ``last.ckpt``. Workers therefore ignore SIGTERM, SIGUSR1 and SIGINT; the main
process saves, stops, and shuts them down through the DataLoader's normal protocol (they also exit on
their own when the main process is gone).
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every klvae DataLoader (picklable: a module-level function)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
